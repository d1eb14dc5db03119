"""Checks on where a command will write, made before any work (light: no torch, so commands call it first)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from compress.infra.errors import CompressError


# What marks a folder as an earlier output that --overwrite may replace: every command writes one of these.
MODEL_MARKERS = ("config.json", "compress.json", "model.safetensors", "model.onnx")
# A model's own files, which a results file must not take the place of.
MODEL_FILES = (*MODEL_MARKERS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def check_output(output: str | Path, flag: str = "--output", keep: tuple = ()) -> Path:
    """Refuse an output that cannot become a folder before any work is done (and before an MLflow run opens): a
    path that is a file (which --overwrite must not replace: it is not a model), one whose parent cannot be
    created or written, one with no name of its own, such as / or .. , and one that is or holds a path in `keep`
    (the models, store and cache the run reads), which --overwrite would delete."""
    if str(output) == "":
        raise CompressError(f"{flag}: empty; leave the flag out for the default folder")
    path = Path(os.path.normpath(output))  # "x/../out" is out: no x is made on the way
    if path.name in ("", ".", ".."):
        raise CompressError(f"{flag} {output}: name a new folder, not {output}")
    if path.exists() and not path.is_dir():
        raise CompressError(f"{flag} {output}: is a file, not a model folder; choose another path")
    _check_folder(path.parent, flag, output)
    here = path.resolve()  # through links too: an alias of the model is the model
    for other in keep:
        if other is not None:
            there = Path(other).resolve()
            if there == here or there.is_relative_to(here):
                raise CompressError(f"{flag} {output}: holds {other}, which this run reads; choose another folder")
    return path


def check_overwrite(output: Path, overwrite: bool, flag: str = "--output") -> None:
    """An existing output needs --overwrite, which replaces an earlier output, never a folder of something else."""
    if not output.exists():
        return
    if not overwrite:
        raise CompressError(f"{flag} {output}: already exists; pass --overwrite to replace it or choose another")
    if output.is_dir() and not output.is_symlink() and any(output.iterdir()) and not any(
            (output / name).exists() for name in MODEL_MARKERS):
        raise CompressError(f"{flag} {output}: --overwrite replaces an earlier output, and this folder holds none "
                            f"({', '.join(MODEL_MARKERS)}); choose another path")


def check_folder(path: str | Path, flag: str) -> Path:
    """A folder the run will create or add to (a cache): not a file, and creatable and writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CompressError(f"{flag} {path}: is a file; give a folder")
    _check_folder(folder, flag, path)
    return folder


def check_file_output(path: str, flag: str) -> Path:
    """A results file: not a folder, in a folder that can be made and written, checked before the work whose
    results it holds rather than after."""
    file = Path(path)
    if file.is_dir():
        raise CompressError(f"{flag} {path}: is a folder; give a file name")
    if file.name in MODEL_FILES and (file.parent / "config.json").exists():
        raise CompressError(f"{flag} {path}: is one of a model's own files; give another file name")
    if file.exists():  # only an earlier result is replaced, never data or anything else that is not JSON
        try:
            json.loads(file.read_text())
        except (OSError, ValueError):
            raise CompressError(f"{flag} {path}: exists and is not an earlier JSON result; give another file "
                                "name") from None
    _check_folder(file.parent, flag, path)
    return file


def _check_folder(folder: Path, flag: str, given) -> None:
    """That `folder` can be created and written, found by doing it: permission bits do not tell root, and /proc
    lets no one make folders. What this made is removed again, so a run refused later leaves nothing behind."""
    folder = Path(os.path.abspath(folder))  # "x/.." must not leave an x behind
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CompressError(f"{flag} {given}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CompressError(f"{flag} {given}: cannot create {folder} ({err.strerror})") from None
    try:  # a folder made in it, not os.access: root may "write" in /proc and /sys, which refuse every new entry
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=folder))
        writable = True
    except OSError:
        writable = False
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


def share_like_open(*files: Path) -> None:
    """Give files the mode open() would have (0666 less the umask). safetensors >= 0.8.1 writes through a 0600
    temporary file (safetensors issue 782), so model.safetensors alone would be readable only by whoever trained it,
    unlike the config.json beside it: a colleague, a serving user or a container's non-root user could not load it."""
    mask = os.umask(0)
    os.umask(mask)
    for file in files:
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)
