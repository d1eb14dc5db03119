"""MLflow: where runs go, what every run is tagged with, and the final metrics every command logs.

What each run logs beside them (its data as dataset inputs, its model as a logged model) and how its experiment is
tagged are what MLflow 3's UI needs to open on training runs, with compress's metrics as the runs table's columns.

The store defaults to sqlite under ./mlruns (MLflow 3 refuses the bare file store), with artifacts beside it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from compress.infra.errors import CompressError

DEFAULT_TRACKING = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "compress"
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"  # Optuna's studies, beside the MLflow store


def resolve_tracking(uri: str) -> str:
    """Make a relative sqlite path absolute. MLflow caches one engine per URI string, so the same relative URI
    used from two working directories would otherwise keep writing to the first one's database."""
    db = sqlite_file(uri)
    if db is None or db.is_absolute():
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).set(database=str(db.resolve())).render_as_string(hide_password=False)


# MLflow's database and server stores; MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set, so a
# bare path is no store.
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# Database servers, and the driver each needs as pip names it: SQLAlchemy 2.1 opens postgresql:// with psycopg 3,
# so the long-standing advice, psycopg2, leaves "Failed to import DB access module".
SERVER_DRIVERS = {"postgresql": "psycopg[binary]", "mysql": "mysqlclient", "mssql": "pyodbc"}
CONNECT_TIMEOUT_S = 10  # a server that never answers is reported, not waited on


def check_spelling(url: str, flag: str) -> None:
    """postgres:// is how Heroku and libpq write it; SQLAlchemy, and so MLflow and Optuna, no longer read it."""
    if scheme_of(url) == "postgres":
        raise CompressError(f"{flag} {shown(url)}: write postgresql://, not postgres:// (SQLAlchemy dropped that "
                            "spelling)")


def without_login(url: str) -> str:
    """`url` with its user:password@ taken out (urllib sends none; MLflow takes them from its own variables)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def scheme_of(url: str) -> str:
    """postgresql for postgresql+psycopg://..., sqlite for sqlite:///..., the whole text when it has no scheme."""
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else url


def shown(url: str) -> str:
    """`url` with its password hidden, as user:PASSWORD@ or as libpq's ?password=: for what is printed, logged to
    MLflow or saved beside a model."""
    import re
    from urllib.parse import urlsplit

    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def sqlite_file(uri: str) -> Path | None:
    """The file a sqlite URI opens, as SQLAlchemy (so MLflow and Optuna) reads it: the path ends at a '?', which
    starts the query, and is percent-decoded. Read as plain text, `sqlite:////d/x?y/ml.db` named a file that does
    not exist while MLflow opened /d/x, another application's database, past every check. None for in-memory."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        db = make_url(uri).database
    except ArgumentError:
        return None
    return Path(db) if db and db != ":memory:" else None


# Each tool's first tables. Both create an alembic_version table, so that one tells neither apart.
MLFLOW_TABLES = {"experiments", "runs"}
OPTUNA_TABLES = {"studies", "version_info"}
# Per tool: its tables, what its database is called, the flag that takes it, and the tables that mark it as the
# wrong store for the other tool's flag (an MLflow store whose creation was cut short may hold alembic_version alone).
STORE_KINDS = {
    "mlflow": (MLFLOW_TABLES, "an MLflow store", "--tracking", MLFLOW_TABLES | {"alembic_version"}),
    "optuna": (OPTUNA_TABLES, "an Optuna study database", "search's --storage", OPTUNA_TABLES),
}
# What an older compress (or a mistyped flag) left: one tool's tables added to the other's database. Each keeps its
# schema revision in the one alembic_version table, so neither can open it again.
BOTH_TOOLS = ("the database holds both an Optuna study and MLflow's tables, which cannot share one database (each "
              "keeps its schema revision in alembic_version); name a new database for each")


def check_kind(url: str, flag: str, mine: str) -> None:
    """Refuse a database that is not `mine` ("mlflow" or "optuna"), read-only and before the tool opens it: MLflow's
    alembic and Optuna's RDBStorage each add their tables to any database they are given, the other's included, and
    only then fail on its schema revision. Empty, not there yet, or a tracking server: nothing to refuse."""
    tables = store_tables(url, flag)
    if not tables:
        return
    own, name, _, _ = STORE_KINDS[mine]
    _, their_name, their_flag, their_signs = STORE_KINDS["optuna" if mine == "mlflow" else "mlflow"]
    if tables & MLFLOW_TABLES and tables & OPTUNA_TABLES:
        raise CompressError(f"{flag} {shown(url)}: {BOTH_TOOLS}")
    if tables & own:
        return
    if tables & their_signs:
        raise CompressError(f"{flag} {shown(url)}: {their_name}, not {name} (use it as {their_flag})")
    raise CompressError(f"{flag} {shown(url)}: the database holds another application's tables "
                        f"({other_tables(tables)}), not {name}; name a new database")


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


def where_to_look(uri: str) -> str:
    """Where a finished run's line tells the user to open the store: a server in the browser, else compress ui."""
    if uri.startswith(("http://", "https://")):
        return shown(uri)
    if shown(uri) != uri:
        return "compress ui --tracking with this URL and its password"
    return f"compress ui --tracking {uri}"


def server_tables(url: str, flag: str) -> set[str]:
    """The tables of a database on a server (its default schema), read without writing, like sqlite_tables: MLflow
    and Optuna add their tables to a PostgreSQL database of the other's just as they do to a sqlite file."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    scheme = scheme_of(url)
    timeout = {"mssql": {"timeout": CONNECT_TIMEOUT_S}}.get(scheme, {"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=timeout)
    except ImportError as err:  # the dialect's driver is not installed
        raise CompressError(f"{flag} {shown(url)}: no driver for {scheme} is installed ({err}); pip install "
                            f"'{SERVER_DRIVERS[scheme]}'") from None
    except sqlalchemy.exc.ArgumentError as err:  # NoSuchModuleError too: a driver SQLAlchemy does not know
        raise CompressError(f"{flag} {shown(url)}: not a database URL ({err})") from None
    try:
        with engine.connect() as con:
            tables = set(sqlalchemy.inspect(con).get_table_names())
            if scheme == "postgresql" and not tables:
                _check_can_create(con, url, flag)
            return tables
    except sqlalchemy.exc.DBAPIError as err:
        said = " ".join(str(err.orig).split())  # the driver's reason, on one line
        hint = "; create it first (e.g. createdb)" if "database" in said and "does not exist" in said else ""
        raise CompressError(f"{flag} {shown(url)}: cannot use the database: {said}{hint}") from None
    finally:
        engine.dispose()


def _check_can_create(con, url: str, flag: str) -> None:
    """An empty PostgreSQL database the tool must create its tables in: a schema to create them in (a search_path
    naming no schema that exists leaves none), and the right to. PostgreSQL 15 took CREATE on schema public from
    every user but the database's owner, so a user made for the store gets "permission denied for schema public"
    from the tool's first CREATE TABLE, as a traceback."""
    import sqlalchemy

    user, schema, can = con.execute(sqlalchemy.text(
        "SELECT current_user, current_schema(), has_schema_privilege(current_schema(), 'CREATE')")).one()
    if schema is None:
        raise CompressError(f"{flag} {shown(url)}: no schema to create tables in (the search_path names none that "
                            "exists); create the schema, or correct options=-csearch_path")
    if not can:
        raise CompressError(f"{flag} {shown(url)}: user {user} may not create tables in schema {schema} (since "
                            f"PostgreSQL 15 only the database's owner may by default); GRANT CREATE ON SCHEMA {schema} "
                            f"TO {user}, or create the database with OWNER {user}")


def check_server_answers(uri: str) -> None:
    """A tracking server that is down is one line within seconds: MLflow's client retries each request with backoff
    for about four minutes, then prints a traceback. Only silence is refused; an HTTP error (a login, a proxy) is an
    answer, and MLflow reports what it means."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    try:
        urlsplit(uri).port  # noqa: B018 -- raises ValueError for a port that is not a number
        with urllib.request.urlopen(without_login(uri).rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        if err.code != 404:
            return
        raise CompressError(f"--tracking {shown(uri)}: something answers there, but not an MLflow tracking server "
                            "(GET /health: 404); check the host, port and path") from None
    except (OSError, ValueError) as err:  # URLError is an OSError; a timeout too
        reason = getattr(err, "reason", err)
        raise CompressError(f"--tracking {shown(uri)}: no MLflow tracking server answers there ({reason}); start one "
                            "(mlflow server) or correct the URL") from None


def store_tables(url: str, flag: str) -> set[str] | None:
    """The tables of the database `url` names, read-only; None where there is nothing to read yet (a sqlite file
    not made, an empty one) or it is no database (a tracking server)."""
    scheme = scheme_of(url)
    if scheme in SERVER_DRIVERS:
        return server_tables(url, flag)
    db = sqlite_file(url)
    if db is None:
        return None
    try:
        if db.is_dir():
            raise CompressError(f"{flag} {url}: {db} is a folder; name the database file")
        if not db.is_file() or not db.stat().st_size:
            return None  # the tool makes a new one
        with db.open("rb") as f:
            header = f.read(16)
    except OSError:  # a folder we may not look into: check_folder names the problem where the run writes
        return None
    if header != b"SQLite format 3\x00":
        raise CompressError(f"{flag} {url}: {db} is not an SQLite database")
    return sqlite_tables(db, f"{flag} {url}")


def other_tables(tables: set[str]) -> str:
    return ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")


def check_tracking(uri: str) -> None:
    """A store MLflow can open, checked before any work rather than when the run opens: a known scheme, and for
    sqlite a folder that can be made and a file that is MLflow's database, an empty one, or not there yet."""
    from compress.infra.paths import check_folder

    check_store_kind(uri)
    db = sqlite_file(uri)
    if db is not None:
        check_folder(db.parent, "--tracking")


def check_store_kind(uri: str) -> None:
    """The part of check_tracking that needs no folder to write in: a known scheme, and a database (sqlite file or
    server) that is MLflow's, empty, or not there yet. Every client opens through mlflow_client, which checks this
    far first, since export --run and bench --run read a store they never write to."""
    check_spelling(uri, "--tracking")
    if scheme_of(uri) not in STORE_SCHEMES:
        raise CompressError(f"--tracking {shown(uri)}: not an MLflow store; use sqlite:///PATH, a database URI "
                            "(postgresql://USER@HOST/DB) or a tracking server (http://HOST:PORT)")
    if scheme_of(uri) in ("http", "https"):
        check_server_answers(uri)
        return
    check_kind(uri, "--tracking", "mlflow")


def for_mlflow(uri: str) -> str:
    """The URI to hand MLflow, and its settings for compress. A tracking server's user:password@ moves into MLflow's
    own MLFLOW_TRACKING_USERNAME/PASSWORD, so that no URL MLflow prints or raises carries the password; MLflow's
    "View run ... at URL" lines stay off stdout (where search prints its table), since compress prints where each
    run went itself."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if scheme_of(uri) not in ("http", "https"):
        return uri
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return without_login(uri)


def mlflow_client(uri: str):
    """An MlflowClient on `uri`, after check_store_kind: MLflow's alembic adds its tables to whatever database it
    opens, an Optuna study's included, before finding it is not its own."""
    check_store_kind(uri)
    uri = for_mlflow(uri)
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


def git_commit(package: Path = Path(__file__).parent.parent) -> str:  # the compress package, not infra/
    """The commit of the compress checkout that ran, with "-dirty" when its package code differs from that commit
    (the run is then not reproducible from it), or "unknown" where compress is not a git checkout: an installed
    wheel, including one in a virtualenv inside the user's own repository, whose commit would otherwise be taken."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=5, check=False)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:  # not tracked here: not our checkout
            return "unknown"
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip()
        return head.stdout.strip() + ("-dirty" if changed else "")
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
    from lightning.pytorch.loggers import MLFlowLogger

    uri = resolve_tracking(uri)
    artifacts = _prepare_store(uri)
    logger = MLFlowLogger(
        experiment_name=experiment, run_name=run_name, tracking_uri=for_mlflow(uri), tags=tags, run_id=run_id,
        artifact_location=artifacts, log_model=False,
    )
    _ = logger.experiment  # create the run now, so its id exists before training starts
    client = _client_of(logger)
    if client is not None:
        tag_experiment(client, logger.experiment_id)
    return logger


def log_final(logger, metrics: dict[str, float], params: dict[str, object] | None = None,
              artifact_dir: str | None = None, artifact_path: str = "model", model: tuple[str, str] | None = None,
              task=None) -> str | None:
    """Log a run's final metrics, params and model folder; return the id of its logged model.

    `model` (name, type: the output folder and the command) makes the folder an MLflow 3 logged model, the run's
    output, so the run's page lists it and its metrics attach to it; the scores measured on `task`'s dev rows are
    tied to that dataset. The logged model is external: its weights are the run's `artifact_path` folder, uploaded
    once, which export --run reads, not a second copy hundreds of MB large."""
    client, run_id = _client_of(logger), logger.run_id
    if client is None:  # a DDP rank other than 0: Lightning's stand-in logs nothing
        return None
    model_id = _logged_model(client, run_id, *model, artifact_path) if model else None
    dev = task_dataset(task, "dev") if task is not None else None
    client.log_batch(run_id, metrics=[_metric(key, value, model_id, dev) for key, value in metrics.items()])
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    if artifact_dir:
        client.log_artifacts(run_id, artifact_dir, artifact_path)
    if model_id:
        from mlflow.entities import LoggedModelOutput

        client.finalize_logged_model(model_id, "READY")  # its weights are uploaded: it can be used now
        outputs = client.get_run(run_id).outputs
        if model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:  # MLflow refuses twice
            client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    return model_id


def _client_of(logger):
    """The MlflowClient of a Lightning MLFlowLogger, or None on a DDP rank other than 0, where Lightning hands out a
    stand-in whose every method returns None (and, on --resume, a run id all the same)."""
    from mlflow import MlflowClient

    return logger.experiment if isinstance(logger.experiment, MlflowClient) else None


# MLflow 3 opens an experiment on its GenAI pages (traces, an assistant), where a training run's metrics are nowhere.
# MLflow 3 UIs without a GenAI / Model training switch choose by the experiment's kind tag. 3.18's has the switch
# and ignores the tag; the switch is per browser and starts on GenAI, and a link sets it with
# ?workflowType=machine_learning (experiment_link).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# What a compression user compares runs by: the student's score and its retention of the teacher's, its size, and its
# latency (p50) and speed-up over the teacher. The runs table shows no metric until it is chosen, and the chosen
# columns live in each browser; a shared view (a tag the link names with ?viewStateShareKey) is the one place a store
# can choose them.
REVIEW_METRICS = ("student_score", "retention", "student_params", "student_mb", "latency_ms", "speedup")
VIEW_KEY = "compress"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The metrics scored on the dev rows, tied to that dataset on the logged model; sizes and latencies depend on no data.
SCORED_ON_DEV = ("student_score", "teacher_score", "retention")


def review_view() -> str:
    """The shared view compress's experiments open in: the review metrics first, then the model and the datasets
    (columns as the UI names them, attributes.`Models` and metrics.`student_score`)."""
    import json

    columns = [f"metrics.`{key}`" for key in REVIEW_METRICS] + ["attributes.`Models`", "attributes.`Dataset`"]
    # the default width cuts "student_params" short
    return json.dumps({"selectedColumns": columns, "columnOrder": columns,
                       "columnWidths": {"metrics.`student_params`": 140}})


def tag_experiment(client, experiment_id: str) -> None:
    """Mark an experiment as model training, unless its owner chose a kind, and give it compress's runs-table view."""
    from mlflow.exceptions import MlflowException

    tags = client.get_experiment(experiment_id).tags
    wanted = {VIEW_TAG: review_view()} | ({} if EXPERIMENT_KIND in tags else {EXPERIMENT_KIND: MODEL_TRAINING})
    for key, value in wanted.items():
        if tags.get(key) == value:
            continue
        try:
            client.set_experiment_tag(experiment_id, key, value)
        except MlflowException:
            # Search's workers start their runs at once, and the sqlite store's tag write is a plain INSERT: the
            # loser of that race finds the tag set by the winner, which is all this wanted.
            if key not in client.get_experiment(experiment_id).tags:
                raise


def experiment_link(base: str, experiment_id: str, tags: dict[str, str]) -> str:
    """The URL of an experiment's runs table in the Model training view, in compress's columns where the experiment
    has them: a link naming a view it lacks makes the UI fall back to its GenAI overview, with an error."""
    view = f"&viewStateShareKey={VIEW_KEY}" if VIEW_TAG in tags else ""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{view}"


def task_dataset(task, split: str):
    """One split ("train" or "dev") of a task (compress.data's TaskData) as an MLflow dataset: named for the task
    and split, with a digest of its rows and labels, the folder it was read from (else the task's name), its
    columns, and its row and label counts."""
    import hashlib
    import json

    from mlflow.entities import Dataset

    texts, labels = (task.train_texts, task.train_labels) if split == "train" else (task.dev_texts, task.dev_labels)
    digest = hashlib.sha256(json.dumps([texts, labels], ensure_ascii=False).encode()).hexdigest()[:12]
    folder = task.flags.get("data")
    source_type, source = ("local", {"uri": str(Path(folder).resolve())}) if folder else (
        "code", {"tags": {"compress.task": task.name}})
    fields = len(texts[0]) if texts else 1
    text = ["text"] if fields == 1 else [f"text_{i + 1}" for i in range(fields)]
    schema = [{"type": "string", "name": name, "required": True} for name in text]
    schema.append({"type": "long", "name": "label", "required": True})
    return Dataset(name=f"{task.name} {split}", digest=digest, source_type=source_type, source=json.dumps(source),
                   schema=json.dumps({"mlflow_colspec": schema}),
                   profile=json.dumps({"num_rows": len(labels), "num_labels": task.num_labels}))


def log_task_data(logger, task) -> None:
    """Log a task's train and dev rows as the run's dataset inputs (contexts training and eval). MLflow keeps one of
    each per run, so a resumed run logs them again harmlessly."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = _client_of(logger)
    if client is None:
        return
    from mlflow.exceptions import MlflowException

    inputs = [DatasetInput(task_dataset(task, split), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for split, context in (("train", "training"), ("dev", "eval"))]
    try:
        client.log_inputs(logger.run_id, datasets=inputs)
    except MlflowException:
        # Search's workers log the same rows at once: the store adds a dataset it lacks with a plain INSERT, so the
        # loser of that race fails on the unique key. Once more, the dataset exists and only the run's input is added.
        client.log_inputs(logger.run_id, datasets=inputs)


def _logged_model(client, run_id: str, name: str, model_type: str, artifact_path: str) -> str:
    """The id of the run's logged model, created (PENDING until its weights are uploaded) unless a resumed run made
    it already. MLflow refuses / : . % and quotes in its name."""
    import re

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    experiment_id = client.get_run(run_id).info.experiment_id
    made = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1)
    if made:
        return made[0].model_id
    name = re.sub(r"[/:.%\"']+", "-", name).strip("-") or "model"
    tags = {MLFLOW_MODEL_IS_EXTERNAL: "true", "compress.weights": f"runs:/{run_id}/{artifact_path}"}
    return client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags,
                                      model_type=model_type).model_id


def _metric(key: str, value: float, model_id: str | None, dev):
    import time

    from mlflow.entities import Metric

    scored = dev is not None and key in SCORED_ON_DEV
    return Metric(key, float(value), int(time.time() * 1000), 0, model_id=model_id,
                  dataset_name=dev.name if scored else None, dataset_digest=dev.digest if scored else None)
