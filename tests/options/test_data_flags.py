"""The data flags of every command that reads --data: --quoting, and --max_length whose default follows the models."""

from __future__ import annotations

import pytest
from helpers import run_main

from compress.options.commands import COMMANDS, flag_defaults, to_groups
from compress.search.space import step_flags

READS_DATA = sorted(name for name, spec in COMMANDS.items() if "data" in spec.flags)


def test_the_commands_that_read_data() -> None:
    assert READS_DATA == ["auto", "distill", "evaluate", "export", "finetune", "prune", "search", "share"]


@pytest.mark.parametrize("command", READS_DATA)
def test_each_takes_quoting_and_leaves_max_length_to_the_models(command: str, monkeypatch) -> None:
    defaults = flag_defaults(command)
    assert defaults["quoting"] == "auto"
    assert defaults.get("max_length") is None  # search has no --max_length: its space or the step's default sets it
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_main([command, "--help"])
    assert code == 0, err
    assert "--quoting QUOTING" in out and "auto (a .csv is csv" in out
    if "max_length" in defaults:
        assert "(default: the smaller of 128 and the" in out


def test_search_passes_quoting_to_every_step_and_never_searches_it() -> None:
    assert all("quoting" not in flags for flags in step_flags().values())
    groups = to_groups("search", {"teacher": "t", "space": {}, "data": "d", "quoting": "csv"})
    assert groups["data"].quoting == "csv"
