"""Every place a command writes, checked together before any work: the MLflow store, the teacher cache and --output.

Apart from paths.py because it needs the stores (tracking.py), which need paths.py's folder checks.
"""

from __future__ import annotations

from pathlib import Path

from compress.infra.paths import check_folder, check_output
from compress.infra.tracking import check_tracking, resolve_tracking, sqlite_file


def check_run_paths(output: str | Path | None, *, reads: tuple = (), tracking: str | None = None,
                    cache: str | None = None) -> Path | None:
    """Every place a command writes, checked before any work: the MLflow store, the teacher cache, and --output,
    which must not be or hold what the run reads (`reads`, the store, the cache), since --overwrite deletes it."""
    store = None
    if tracking is not None:
        uri = resolve_tracking(tracking)
        check_tracking(uri)
        store = sqlite_file(uri)
    if cache is not None:
        check_folder(cache, "--teacher_cache")
    local = [r for r in reads if r is not None and Path(r).exists()]  # a hub name is no folder to protect
    return None if output is None else check_output(output, keep=(*local, store, cache))
