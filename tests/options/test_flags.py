"""The one table of flag bounds (compress.flags): it names only real flags, covers every numeric flag that search can
set, and each command refuses a value outside it in one line, before any model is loaded."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from helpers import error_lines, run_main

from compress.cli.main import COMMANDS
from compress.infra.errors import CompressError
from compress.options.bounds import BOUNDS, CHOICES, check, check_devices
from compress.search.space import step_flags

def _command_flags() -> set[str]:
    return {name for fn in COMMANDS.values() for name in inspect.signature(fn).parameters}


def test_every_bound_is_a_real_flag() -> None:
    assert set(BOUNDS) <= _command_flags()
    assert set(CHOICES) <= _command_flags()
    from compress.pruning import CRITERIA

    assert tuple(CRITERIA) == CHOICES["criterion"]  # the scores prune has, one for each word it takes


def test_every_numeric_flag_search_can_set_has_a_bound() -> None:
    """search checks a space against this table; a flag missing from it would fail trial after trial instead."""
    numeric = {name for flags in step_flags().values() for name, default in flags.items()
               if isinstance(default, (int, float)) and not isinstance(default, bool)}
    assert numeric <= set(BOUNDS), numeric - set(BOUNDS)


@pytest.mark.parametrize(("name", "good", "bad", "message"), [
    ("heads", 0.0, 1.0, "--heads 1: must be in [0, 1) (the fraction to remove)"),
    ("warmup", 0.99, -0.1, "--warmup -0.1: must be in [0, 1) (a fraction of the training steps)"),
    ("recover_epochs", 0, -1, "--recover_epochs -1: must be at least 0 (0 skips recovery)"),
    ("lr", 1e-9, 0.0, "--lr 0: must be > 0"),
    ("alpha_kd", 0.0, -0.5, "--alpha_kd -0.5: must be >= 0 (a loss weight)"),
    ("max_length", 8, 8193, "--max_length 8193: must be between 8 and 8192 (tokens per example)"),
    ("embedding", 2, 1, "--embedding 1: must be at least 2"),
    ("seed", 4294967295, 4294967296, "--seed 4294967296: must be between 0 and 4294967295"),  # NumPy's range
    ("seed", 0, -1, "--seed -1: must be between 0 and 4294967295"),
    ("lr", 1e300, float("inf"), "--lr inf: must be a finite number"),  # 1e309 parses as inf, which is > 0
    ("temperature", 1e300, float("nan"), "--temperature nan: must be a finite number"),
    ("max_train", 10**400, 0, "--max_train 0: must be at least 1"),  # an int past float's range: no OverflowError
])
def test_a_bound_takes_its_edge_and_refuses_past_it(name: str, good: float, bad: float, message: str) -> None:
    check(name, good)
    check(name, None)  # unset: the command's default applies
    with pytest.raises(CompressError) as info:
        check(name, bad)
    assert str(info.value) == message


@pytest.mark.parametrize("devices", ["auto", 1, 4, -1, "2", "-1", "0,1", "0,", "[0, 1]", "1,3"])
def test_devices_lightning_accepts(devices) -> None:
    check_devices(devices)


@pytest.mark.parametrize("devices", [0, "0", -2, "0,0", "a", "", ",", "1.5"])
def test_devices_lightning_refuses(devices) -> None:
    with pytest.raises(CompressError, match=rf"^--devices {devices}: give a count of at least 1"):
        check_devices(devices)


@pytest.mark.parametrize(("command", "flags", "line"), [
    ("distill", ["--teacher_epochs", "0"], "--teacher_epochs 0: must be at least 1"),
    ("distill", ["--teacher_lr", "-1"], "--teacher_lr -1: must be > 0"),
    ("distill", ["--devices", "0"], "--devices 0: give a count of at least 1"),
    ("finetune", ["--devices", "-3"], "--devices -3: give a count of at least 1"),
    # device indices with the CPU accelerator: a TypeError from Lightning's Trainer
    ("finetune", ["--accelerator", "cpu", "--devices", "0,1"], "--accelerator cpu --devices 0,1 --strategy auto "
                                                               "--precision 32-true: `devices` selected with"),
    ("prune", ["--heads", "0.5", "--recover_epochs", "-1"], "--recover_epochs -1: must be at least 0 (0 skips"),
    ("prune", ["--heads", "0.5", "--devices", "0"], "--devices 0: give a count"),
    ("share", ["--calibration", "0"], "--calibration 0: must be at least 1"),
    ("prune", ["--heads", "0.5", "--criterion", "foo"], "--criterion foo: use taylor, magnitude or random"),
    ("share", ["--init", "zero"], "--init zero: use mean, first or regmean"),
    ("distill", ["--accelerator", "tpu"], "--accelerator tpu: use auto, cpu or cuda"),
    ("export", ["--max_length", "4"], "--max_length 4: must be between 8 and 8192"),
    ("evaluate", ["--latency_seq", "0"], "--latency_seq 0: must be at least 1"),
])
def test_each_command_refuses_an_out_of_range_flag_first(command: str, flags: list[str], line: str,
                                                         tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    model = ["--teacher" if command == "distill" else "--model", tiny_teacher]
    data = [] if command == "export" else ["--data", tiny_data]
    code, out, err = run_main([command, *model, *data, *flags, "--output", "out"] if command != "evaluate" else
                              [command, *model, *data, *flags])
    assert code == 1 and "Traceback" not in err and out == "", err
    (got,) = error_lines(err)
    assert got.startswith(f"compress: error: {line}"), got
    assert sorted(p.name for p in workdir.iterdir()) == []  # no output, no MLflow store, no teacher cache
