"""The Python API: steps as functions of config groups that return their results, and the flags defined once."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

import compress
from compress.api import (DataConfig, DistillConfig, LossConfig, OutputConfig, PruneConfig, RuntimeConfig,
                          TrackingConfig, TrainingConfig)
from compress.options import commands, groups

PACKAGE = Path(compress.__file__).parent


def test_distill_returns_its_result_with_every_final_metric(tiny_teacher, tiny_data, workdir) -> None:
    """`import compress; compress.distill(...)`: the folder, the metrics (retention the ratio of the two scores, as
    compress.json holds them), the MLflow run with those metrics, and the lineage."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    result = compress.distill(DistillConfig(teacher=str(tiny_teacher), layers=2), DataConfig(data=str(tiny_data)),
                              training=TrainingConfig(epochs=1), runtime=RuntimeConfig(latency_reps=1),
                              tracking=TrackingConfig(tracking=uri), output=OutputConfig(output="student"))
    m = result.metrics
    assert Path(result.output) == Path("student") and (workdir / "student" / "model.safetensors").exists()
    assert m["retention"] == pytest.approx(m["student_score"] / m["teacher_score"])
    assert m["compression"] == pytest.approx(m["teacher_params"] / m["student_params"])
    assert {"latency_ms", "speedup", "student_mb", "teacher_mb"} <= set(m)
    assert json.loads((workdir / "student" / "compress.json").read_text()) == json.loads(json.dumps(result.lineage))
    assert result.lineage["command"] == "distill" and result.lineage["teacher"] == str(tiny_teacher)
    logged = MlflowClient(uri).get_run(result.run_id).data
    assert logged.metrics["retention"] == pytest.approx(m["retention"])
    assert logged.params["epochs"] == "1" and logged.params["lr"] == "0.0001"  # distill's default, by its flag name


def test_prune_takes_groups_and_its_defaults_are_the_commands(tiny_teacher, tiny_data, workdir) -> None:
    """A group left out takes the command's default: prune recovers for 2 epochs unless told (here 0: no training)."""
    result = compress.prune(PruneConfig(model=str(tiny_teacher), heads=0.5), DataConfig(data=str(tiny_data)),
                            training=TrainingConfig(epochs=0), runtime=RuntimeConfig(latency_reps=1),
                            tracking=TrackingConfig(tracking=f"sqlite:///{workdir / 'mlflow.db'}"))
    assert result.metrics["heads_kept_fraction"] == 0.5 and result.metrics["flops_ratio"] < 1
    assert result.lineage["pruning"]["heads"] == 0.5
    assert commands.default_group("prune", "training") == TrainingConfig(epochs=2)
    assert commands.default_group("share", "training") == TrainingConfig(epochs=3)
    assert commands.default_group("finetune", "training") == TrainingConfig(lr=5e-5)


def test_the_flags_and_the_groups_say_the_same() -> None:
    """Flat flags -> groups: every flag lands in its field, a renamed one (recover_epochs) in training.epochs, and
    an unknown one is refused."""
    made = commands.to_groups("prune", {"model": "m", "recover_epochs": 0, "lr": 1e-3, "heads": 0.25,
                                        "precision": "bf16-mixed", "task": "sst2", "resume": True})
    assert made["step"] == PruneConfig(model="m", heads=0.25)
    assert made["training"] == TrainingConfig(epochs=0, lr=1e-3)
    assert made["runtime"] == RuntimeConfig(precision="bf16-mixed")
    assert made["data"] == DataConfig(task="sst2") and made["output"] == OutputConfig(resume=True)
    assert made["loss"] == LossConfig()
    with pytest.raises(TypeError, match="no flag alpha_attn"):  # prune has no attention loss
        commands.to_groups("prune", {"model": "m", "alpha_attn": 1.0})
    with pytest.raises(TypeError, match="needs --model"):
        commands.to_groups("prune", {})


@pytest.mark.parametrize("command", sorted(commands.COMMANDS))
def test_every_flag_has_one_help_line_in_help(command, capsys) -> None:
    """--help shows every flag of the command with the text of its one definition."""
    from compress.cli.main import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag in commands.COMMANDS[command].flags:
        assert f"--{flag} " in shown
        words = " ".join(commands.flag_help(command, flag).split())
        assert words[:40] in shown, (flag, words)


def test_no_training_flag_is_documented_twice() -> None:
    """Each field's docstring is written once in compress/ (the commands used to repeat 24 of them four times)."""
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    for cls in (DataConfig, TrainingConfig, LossConfig, RuntimeConfig, TrackingConfig, OutputConfig):
        for name, doc in groups.field_docs(cls).items():
            first = doc[:60]  # as it starts: enough words to be that one text
            hits = sum(" ".join(text.split()).count(first) for text in sources.values())
            assert hits == 1, f"{cls.__name__}.{name}: {first!r} is written {hits} times"


def test_no_function_takes_more_than_ten_parameters() -> None:
    """Grouped configs, not flat flags, below the CLI: the widest signature outside compress/cli is 10."""
    widest = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                widest.append((len(names), f"{path.relative_to(PACKAGE)}:{node.name}"))
    assert max(widest)[0] <= 10, sorted(widest)[-3:]


def test_no_call_site_reads_compress_json_for_a_metric() -> None:
    """Steps compose through their results: nothing in compress/ or experiments/ parses compress.json's metrics."""
    roots = [PACKAGE, PACKAGE.parent / "experiments"]
    pattern = re.compile(r"compress\.json.*\)\s*\)?\s*\[\s*[\"']metrics[\"']\]|lineage\[[\"']metrics[\"']\]")
    found = [str(p) for root in roots for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert not found, found


def test_api_functions_take_groups() -> None:
    """Each step's parameters are config groups (and hooks), never flat flags."""
    for name in ("distill", "finetune", "prune", "share", "evaluate", "export", "bench", "search"):
        params = inspect.signature(getattr(compress.api, name)).parameters
        assert len(params) <= 8, name
        assert all(p.name in ("step", "data", "loss", "training", "runtime", "tracking", "output", "hooks")
                   for p in params.values()), (name, list(params))
