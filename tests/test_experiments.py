"""Every YAML under experiments/ parses against the command its first line names, so shipped configs never rot."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from compress.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted({p.relative_to(ROOT).as_posix() for ext in ("yaml", "yml")
                  for p in ROOT.glob(f"experiments/**/*.{ext}")})
HEADER = re.compile(r"# compress (\S+) --config (\S+)")


def test_experiments_ship_configs() -> None:
    assert CONFIGS, "no YAML under experiments/"
    assert "experiments/distill_bbc_news.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_parses_against_its_command(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the header's path is relative to the repository root
    text = (ROOT / path).read_text()
    match = HEADER.fullmatch(text.splitlines()[0].strip())
    assert match, f"{path}: the first line must be '# compress <command> --config {path}'"
    command, config = match.groups()
    assert config == path, f"{path}: its header names {config}"
    assert command in COMMANDS, f"{path}: unknown command {command!r} (known: {', '.join(COMMANDS)})"

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as info:
            main([command, "--config", config, "--print_config"])
    assert info.value.code in (0, None), err.getvalue()
    printed = yaml.safe_load(out.getvalue())
    given = yaml.safe_load(text)
    assert isinstance(given, dict) and given, f"{path} sets nothing"
    for key, value in given.items():
        assert key in printed, f"{path}: {key} is not a flag of compress {command}"
        assert printed[key] == value, f"{path}: {key} = {value!r} was read as {printed[key]!r}"
