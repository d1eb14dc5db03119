"""compress.json beside a saved model: the command, task, metrics and sources that made it."""

from __future__ import annotations

import json
from pathlib import Path


def write_lineage(folder: Path, lineage: dict) -> None:
    """compress.json: where the model came from and what it scored, for model cards and `--run` lookups."""
    (folder / "compress.json").write_text(json.dumps(lineage, indent=2, default=str))


def read_lineage(folder: str | Path) -> dict:
    path = Path(folder) / "compress.json"
    return json.loads(path.read_text()) if path.exists() else {}
