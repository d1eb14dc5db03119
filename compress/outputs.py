"""Checks on where a command will write, made before any work (light: no torch, so commands call it first)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compress.errors import CompressError


def check_output(output: str | Path, flag: str = "--output") -> Path:
    """Refuse an output that cannot become a folder before any work is done (and before an MLflow run opens): a
    path that is a file (which --overwrite must not replace: it is not a model), one whose parent cannot be
    created or written, and one with no name of its own, such as / or .. ."""
    if str(output) == "":
        raise CompressError(f"{flag}: empty; leave the flag out for the default folder")
    path = Path(output)
    if path.name in ("", ".", ".."):
        raise CompressError(f"{flag} {output}: name a new folder, not {output}")
    if path.exists() and not path.is_dir():
        raise CompressError(f"{flag} {output}: is a file, not a model folder; choose another path")
    _check_folder(path.parent, flag, output)
    return path


def check_file_output(path: str, flag: str) -> Path:
    """A results file: not a folder, in a folder that can be made and written, checked before the work whose
    results it holds rather than after."""
    file = Path(path)
    if file.is_dir():
        raise CompressError(f"{flag} {path}: is a folder; give a file name")
    _check_folder(file.parent, flag, path)
    return file


def _check_folder(folder: Path, flag: str, given) -> None:
    """That `folder` can be created and written, found by doing it: permission bits do not tell root, and /proc
    lets no one make folders. What this made is removed again, so a run refused later leaves nothing behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CompressError(f"{flag} {given}: cannot create {folder} ({err.strerror})") from None
    writable = os.access(folder, os.W_OK | os.X_OK)
    for p in made:
        try:
            p.rmdir()
        except OSError:  # something else wrote there meanwhile; it is theirs to keep
            break
    if not writable:
        raise CompressError(f"{flag} {given}: cannot write in {folder}")


def write_json(file: Path, data: dict) -> None:
    """Write whole or not at all: a reader never finds half a file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(file)
