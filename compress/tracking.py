"""MLflow: where runs go, what every run is tagged with, and the final metrics every command logs.

The store defaults to sqlite under ./mlruns (MLflow 3 refuses the bare file store), with artifacts beside it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from compress.errors import CompressError

DEFAULT_TRACKING = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "compress"


def resolve_tracking(uri: str) -> str:
    """Make a relative sqlite path absolute. MLflow caches one engine per URI string, so the same relative URI
    used from two working directories would otherwise keep writing to the first one's database."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


# MLflow's database and server stores; its file store refuses to start (STACK.md), so a bare path is no store.
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# Each tool's first tables. Both create an alembic_version table, so that one tells neither apart.
MLFLOW_TABLES = {"experiments", "runs"}
OPTUNA_TABLES = {"studies", "version_info"}


def sqlite_tables(db: Path, flag: str) -> set[str]:
    """The tables of an existing SQLite file, read without writing a byte: MLflow's alembic and Optuna's RDBStorage
    both add their tables to any database they are pointed at before finding it is the other's, so a wrong store is
    told apart here, read-only, first."""
    import contextlib
    import sqlite3

    try:  # as_uri quotes a '?' or '#' in the path, which the file: URI would otherwise read as its own
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise CompressError(f"{flag}: cannot read {db} as an SQLite database ({err})") from None


def check_tracking(uri: str) -> None:
    """A store MLflow can open, checked before any work rather than when the run opens: a known scheme, and for
    sqlite a folder that can be made and a file that is MLflow's database, an empty one, or not there yet."""
    from compress.outputs import check_folder

    check_store_kind(uri)
    db = sqlite_file(uri)
    if db is not None:
        check_folder(db.parent, "--tracking")


def check_store_kind(uri: str) -> None:
    """The part of check_tracking that needs no folder to write in: a known scheme, and an existing sqlite file that
    is MLflow's database (or empty). Every client opens through mlflow_client, which checks this far first, since
    export --run and bench --run read a store they never write to."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else uri
    if scheme not in STORE_SCHEMES:
        raise CompressError(f"--tracking {uri}: not an MLflow store; use sqlite:///PATH, a database URI "
                            "(postgresql://USER@HOST/DB) or a tracking server (http://HOST:PORT)")
    db = sqlite_file(uri)
    if db is None:
        return
    try:
        if db.is_dir():
            raise CompressError(f"--tracking {uri}: {db} is a folder; name the database file")
        if not db.is_file() or not db.stat().st_size:
            return  # MLflow makes a new one
        with db.open("rb") as f:
            header = f.read(16)
    except OSError:  # a folder we may not look into: check_folder names the problem where the run writes
        return
    if header != b"SQLite format 3\x00":
        raise CompressError(f"--tracking {uri}: {db} is not an SQLite database")
    tables = sqlite_tables(db, f"--tracking {uri}")
    if tables and not tables & MLFLOW_TABLES:
        if tables & OPTUNA_TABLES:
            raise CompressError(f"--tracking {uri}: an Optuna study database, not an MLflow store (use it as "
                                "search's --storage)")
        raise CompressError(f"--tracking {uri}: {db} holds another application's tables "
                            f"({', '.join(sorted(tables)[:4])}), not an MLflow store; name a new file")


def mlflow_client(uri: str):
    """An MlflowClient on `uri`, after check_store_kind: MLflow's alembic adds its tables to whatever database it
    opens, an Optuna study's included, before finding it is not its own."""
    check_store_kind(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _prepare_store(uri: str) -> str | None:
    """Check the store, create the sqlite file's folder and pick an artifact folder beside it; None lets the server
    decide."""
    check_tracking(uri)
    db = sqlite_file(uri)
    if db is None:
        return None
    db.parent.mkdir(parents=True, exist_ok=True)  # check_tracking found it can be made
    return (db.parent / "artifacts").resolve().as_uri()


def git_commit() -> str:
    """The commit of the compress checkout that ran, or 'unknown' for an installed wheel."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_tags(device: str, command: str) -> dict[str, str]:
    import torch
    import transformers

    return {
        "compress.command": command,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "host": platform.node(),
    }


def make_logger(uri: str, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None):
    """Lightning's MLFlowLogger on our store. Always given a tracking_uri: its import-time default crashes."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = resolve_tracking(uri)
    artifacts = _prepare_store(uri)
    logger = MLFlowLogger(
        experiment_name=experiment, run_name=run_name, tracking_uri=uri, tags=tags, run_id=run_id,
        artifact_location=artifacts, log_model=False,
    )
    _ = logger.experiment  # create the run now, so its id exists before training starts
    return logger


def log_final(logger, metrics: dict[str, float], params: dict[str, object] | None = None,
              artifact_dir: str | None = None, artifact_path: str = "model") -> None:
    client, run_id = logger.experiment, logger.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    if artifact_dir:
        client.log_artifacts(run_id, artifact_dir, artifact_path)
