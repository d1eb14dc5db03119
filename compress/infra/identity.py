"""Names and fingerprints: a model name made safe for a folder, and the identity of a model's weight files."""

from __future__ import annotations

import re
from pathlib import Path


def slug(name: str) -> str:
    """A short, filesystem-safe name for a model argument: 'google-bert/bert-base-uncased' -> 'bert-base-uncased'."""
    return re.sub(r"[^\w.-]+", "-", Path(name.rstrip("/")).name).strip("-") or "model"


def weights_identity(path: str) -> list:
    # name, size and mtime of every file: cheap to compute, and changes whenever the weights do
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())
