"""Where runs and studies go, and the paths users type: each tool's database refused as the other's store, read-only
and before anything writes; a --config that is not text; a model's size counted once in an exported folder; and a
leading ~ in any path flag (quoted, or from a config file) expanded as the shell would."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import error_lines, run_main, sqlite_uri

from compress.cli import main as cli
from compress.infra.errors import CompressError
from compress.models.measure import weights_mb
from compress.search.study import check_storage
from compress.infra.tracking import check_tracking
from compress.cli.ui import ui


@pytest.fixture(scope="module")
def optuna_db(tmp_path_factory) -> Iterator[Path]:
    """A study database as `compress search` leaves it."""
    import optuna

    # quiet for this module, and put back after it: search's tests read Optuna's INFO lines ("Trial 0 finished")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path_factory.mktemp("optuna") / "optuna.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    yield db
    optuna.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """An MLflow store as any compress run leaves it."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment("compress")
    return db


def other_app_db(folder: Path) -> Path:
    db = folder / "app.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE customers (id INTEGER)")
    con.close()
    return db


def copy(db: Path, folder: Path) -> tuple[Path, str]:
    """A copy of the database to point the command at, and its digest to prove the command left it alone."""
    mine = Path(shutil.copy(db, folder / db.name))
    return mine, hashlib.sha256(mine.read_bytes()).hexdigest()


def refused(args: list, *wanted: str) -> str:
    """The command exits 1 with one error line holding every `wanted` text, and no traceback."""
    code, _, err = run_main(args)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert all(w in lines[0] for w in wanted), lines[0]
    return lines[0]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """compress ui must refuse before it starts a server: starting one is the failure (and would cost 15 s)."""
    real = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        # only the servers: a library's own helper (matplotlib runs fc-list the first time it builds its font cache)
        if Path(str(cmd[0])).name in ("mlflow", "optuna-dashboard"):
            raise AssertionError(f"compress ui started {cmd[0]}")
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)


# --- 1. an Optuna database as --tracking, an MLflow store as --storage ----------------------------------------------

@pytest.mark.parametrize("command", ["distill", "export", "export-run", "bench-run", "ui"])
def test_tracking_refuses_an_optuna_study_database_and_leaves_it_alone(command: str, optuna_db: Path,
                                                                       tiny_teacher: Path, tiny_data: Path,
                                                                       workdir: Path, no_server) -> None:
    db, digest = copy(optuna_db, workdir)
    uri = f"sqlite:///{db}"
    args = {"distill": ["distill", "--teacher", tiny_teacher, "--data", tiny_data],
            "export": ["export", "--model", tiny_teacher, "--format", "hf"],
            # these two read the run from the store before checking anything else of theirs
            "export-run": ["export", "--run", "0123456789abcdef"],
            "bench-run": ["bench", "--model", tiny_teacher, "--run", "0123456789abcdef"],
            "ui": ["ui"]}[command]
    line = refused([*args, "--tracking", uri], f"--tracking {uri}", "an Optuna study database",
                   "search's --storage")
    assert line.startswith("compress: error: --tracking")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # MLflow added no tables to it
    assert not (workdir / "outputs").exists()


def test_a_search_refused_for_its_tracking_leaves_no_folder_behind(optuna_db: Path, tiny_teacher: Path,
                                                                    tiny_data: Path, workdir: Path) -> None:
    (workdir / "elsewhere").mkdir()
    db, _ = copy(optuna_db, workdir / "elsewhere")
    refused(["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}", "--tracking",
             f"sqlite:///{db}"], "an Optuna study database")
    assert sorted(p.name for p in workdir.iterdir()) == ["elsewhere"]  # the default --storage's mlruns/ was made first


def test_search_storage_refuses_an_mlflow_store_and_leaves_it_alone(mlflow_db: Path, tiny_teacher: Path,
                                                                    tiny_data: Path, workdir: Path) -> None:
    db, digest = copy(mlflow_db, workdir)
    uri = f"sqlite:///{db}"
    refused(["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}", "--storage", uri,
             *["--tracking", sqlite_uri(workdir)]], f"--storage {uri}", "an MLflow store", "--tracking")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # Optuna added no tables to it
    assert not (workdir / "mlruns").exists() and not (workdir / "outputs").exists()


def test_dashboard_storage_refuses_an_mlflow_store(mlflow_db: Path, workdir: Path, no_server) -> None:
    db, digest = copy(mlflow_db, workdir)
    refused(["ui", "--dashboard", "--storage", f"sqlite:///{db}"], "--storage", "an MLflow store")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_another_applications_database_is_neither_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{other_app_db(tmp_path)}"
    with pytest.raises(CompressError, match=r"--tracking .*another application's tables \(customers\)"):
        check_tracking(uri)
    with pytest.raises(CompressError, match=r"--storage .*another application's tables \(customers\)"):
        check_storage(uri)


def test_each_store_takes_its_own_database_an_empty_file_or_a_new_one(optuna_db: Path, mlflow_db: Path,
                                                                      tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    for new in (tmp_path / "empty.db", tmp_path / "new" / "x.db"):
        check_tracking(f"sqlite:///{new}")
        assert check_storage(f"sqlite:///{new}") == new
    check_tracking(f"sqlite:///{mlflow_db}")
    assert check_storage(f"sqlite:///{optuna_db}") == optuna_db
    assert not (tmp_path / "new").exists()  # checked, not made


def test_a_store_that_is_not_sqlite_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("not a database, " * 8)
    with pytest.raises(CompressError, match=r"--storage .*notes.db is not an SQLite database"):
        check_storage(f"sqlite:///{text}")
    with pytest.raises(CompressError, match=r"--tracking .*notes.db is not an SQLite database"):
        check_tracking(f"sqlite:///{text}")
    torn = tmp_path / "torn.db"  # SQLite's header, then no database
    torn.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    for check, flag in ((check_storage, "--storage"), (check_tracking, "--tracking")):
        with pytest.raises(CompressError, match=rf"^{flag} .*torn.db: cannot read .* as an SQLite database"):
            check(f"sqlite:///{torn}")


# --- 2. compress ui checks --tracking before it starts a server -----------------------------------------------------

def test_ui_refuses_an_unknown_tracking_scheme_before_starting(no_server) -> None:
    # ui itself, not only the CLI's check of every --tracking: a script calling ui() gets the same line
    with pytest.raises(CompressError, match=r"^--tracking bogus://x: not an MLflow store"):
        ui(tracking="bogus://x")


def test_ui_refuses_an_optuna_database_as_tracking(optuna_db: Path, no_server) -> None:
    with pytest.raises(CompressError, match=r"^--tracking .*an Optuna study database"):
        ui(tracking=f"sqlite:///{optuna_db}")


def test_cli_ui_with_an_unknown_scheme_is_one_line(no_server) -> None:
    refused(["ui", "--tracking", "bogus://x"], "--tracking bogus://x", "not an MLflow store")


# --- 3. a --config that is not text ---------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["command", "top-level", "equals"])
def test_a_config_that_is_not_utf8_is_one_line(where: str, workdir: Path) -> None:
    binary = workdir / "bin.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 2)
    args = {"command": ["distill", "--config", binary, "--print_config"],
            "top-level": ["--config", binary, "distill", "--teacher", "t"],
            "equals": ["distill", f"--config={binary}", "--teacher", "t"]}[where]
    refused(args, f"--config {binary}", "not UTF-8")


# --- 4. a model's size, not its folder's ----------------------------------------------------------------------------

def test_weights_mb_counts_the_measured_model_only(tiny_teacher: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_teacher, tmp_path / "export"))
    weights = (folder / "model.safetensors").stat().st_size
    (folder / "model.onnx").write_bytes(b"o" * 3 * weights)  # what export --format hf,onnx,int8 writes beside it
    (folder / "model.int8.onnx").write_bytes(b"i" * weights)
    (folder / "pytorch_model.bin").write_bytes(b"b" * weights)  # a hub repo's duplicate; transformers loads safetensors
    (folder / "training_args.bin").write_bytes(b"t" * 100)
    assert weights_mb(folder) == weights / 1e6
    assert weights_mb(folder / "model.onnx") == 3 * weights / 1e6
    (folder / "model.onnx.data").write_bytes(b"d" * 10)  # external data of a graph over 2 GB
    assert weights_mb(folder / "model.onnx") == (3 * weights + 10) / 1e6
    (folder / "model.safetensors").unlink()
    assert weights_mb(folder) == weights / 1e6  # no safetensors: the .bin weights, not training_args.bin


def test_evaluate_reports_the_size_of_the_model_in_an_exported_folder(tiny_teacher: Path, tiny_data: Path,
                                                                      workdir: Path) -> None:
    folder = Path(shutil.copytree(tiny_teacher, workdir / "export"))
    weights = (folder / "model.safetensors").stat().st_size
    (folder / "model.onnx").write_bytes(b"o" * 3 * weights)
    (folder / "model.int8.onnx").write_bytes(b"i" * weights)
    code, out, err = run_main(["evaluate", "--model", folder, "--data", tiny_data, "--latency_reps", "1",
                               "--latency_batch", "1", "--latency_seq", "8"])
    assert code == 0, err[-3000:]
    assert json.loads(out)["mb"] == weights / 1e6


# --- 5. ~ in path flags ---------------------------------------------------------------------------------------------

@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every command replaced by a spy with its signature (so the parser is the real one) that records its values."""
    seen: dict = {"signature": lambda name: inspect.signature(cli.COMMANDS[name]).parameters}
    for name, command in cli.COMMANDS.items():
        def spy(*, _name=name, **values):
            seen[_name] = values

        monkeypatch.setitem(cli.COMMANDS, name, functools.wraps(command)(spy))
    return seen


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


@pytest.mark.parametrize("command, args, expanded", [
    ("distill", ["--teacher", "~/t", "--student", "~/s", "--data", "~/d", "--output", "~/o",
                 "--teacher_cache", "~/cache", "--teacher_device_map", "~/map.json"],
     {"teacher": "t", "student": "s", "data": "d", "output": "o", "teacher_cache": "cache",
      "teacher_device_map": "map.json"}),
    ("finetune", ["--model", "~/m", "--data", "~/d", "--output", "~/o"], {"model": "m", "data": "d", "output": "o"}),
    ("evaluate", ["--model", "~/m", "--data", "~/d", "--json_out", "~/r.json"],
     {"model": "m", "data": "d", "json_out": "r.json"}),
    ("export", ["--model", "~/m", "--data", "~/d", "--output", "~/o"], {"model": "m", "data": "d", "output": "o"}),
    ("bench", ["--model", "~/a", "--model", "~/b.onnx", "--json", "~/b.json"],
     {"model": ["a", "b.onnx"], "json": "b.json"}),
    ("prune", ["--model", "~/m", "--data", "~/d", "--output", "~/o", "--teacher_cache", "~/c"],
     {"model": "m", "data": "d", "output": "o", "teacher_cache": "c"}),
    ("share", ["--model", "~/m", "--data", "~/d", "--output", "~/o", "--teacher_cache", "~/c"],
     {"model": "m", "data": "d", "output": "o", "teacher_cache": "c"}),
    ("search", ["--teacher", "~/t", "--space", "~/space.yaml", "--data", "~/d", "--output", "~/o"],
     {"teacher": "t", "space": "space.yaml", "data": "d", "output": "o"}),
])
def test_a_leading_tilde_in_every_path_flag_is_the_home_folder(command: str, args: list[str], expanded: dict,
                                                              home: Path, calls: dict) -> None:
    uri = "sqlite:///~/mlflow.db"
    uris = ["--tracking", uri] if "tracking" in calls["signature"](command) else []
    code, _, err = run_main([command, *args, *uris])
    assert code == 0, err
    values = calls[command]
    for name, rel in expanded.items():
        assert values[name] == ([str(home / r) for r in rel] if isinstance(rel, list) else str(home / rel))
    assert values.get("tracking", uri) == uri  # a URI, not a path: left as given


def test_a_tilde_in_a_config_file_is_the_home_folder(home: Path, calls: dict, tmp_path: Path) -> None:
    config = tmp_path / "distill.yaml"
    config.write_text("teacher: ~/t\ndata: ~/data\noutput: ~/o\n")
    code, _, err = run_main(["distill", "--config", config])
    assert code == 0, err
    assert calls["distill"]["data"] == str(home / "data") and calls["distill"]["output"] == str(home / "o")


def test_search_space_given_inline_is_left_alone(home: Path, calls: dict) -> None:
    code, _, err = run_main(["search", "--teacher", "t", "--data", "d", "--space", "{layers: [1, 2]}"])
    assert code == 0, err
    assert calls["search"]["space"] == {"layers": [1, 2]}


def test_data_and_output_under_tilde_run_for_real(tiny_teacher: Path, tiny_data: Path, home: Path,
                                                  workdir: Path) -> None:
    """End to end: --data ~/data used to fail 'does not exist', and --json_out ~/r.json to write ./~/r.json."""
    shutil.copytree(tiny_data, home / "data")
    code, _, err = run_main(["evaluate", "--model", tiny_teacher, "--data", "~/data", "--json_out", "~/r.json",
                             "--latency_reps", "1", "--latency_batch", "1", "--latency_seq", "8"])
    assert code == 0, err[-3000:]
    assert (home / "r.json").is_file() and not (workdir / "~").exists()


def test_export_never_opens_a_store_its_model_names_that_is_now_another_tools(optuna_db: Path) -> None:
    """A model's compress.json names the store its run was logged in; if that file is now an Optuna database, the
    model card goes without the run's metrics rather than MLflow writing its tables into it."""
    from compress.exporting.registry import source_run_info

    before = hashlib.sha256(optuna_db.read_bytes()).hexdigest()
    assert source_run_info("0" * 32, [f"sqlite:///{optuna_db}"]) == {}
    assert hashlib.sha256(optuna_db.read_bytes()).hexdigest() == before


# --- an MLflow tracking server as --tracking, the README's way to share runs past one machine ---------------------

@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a free port, keeping records in sqlite and artifacts in a folder of its own."""
    import os
    import socket
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/store.db",
                             "--artifacts-destination", (root / "artifacts").as_uri()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    try:
        yield {"url": url, "artifacts": root / "artifacts"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_a_tracking_server_takes_the_runs_and_their_artifacts(tracking_server, tiny_teacher, tiny_data, tmp_path,
                                                               monkeypatch) -> None:
    """Distil on one "machine", export the run's model on another that has only the server's URL: the model comes
    through the server, and neither folder gets an mlruns/."""
    from mlflow import MlflowClient

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    monkeypatch.chdir(here)
    # the server asks for no login and ignores one; a user:password@ in the URL must show nowhere all the same
    with_login = tracking_server["url"].replace("http://", "http://me:s3cret-pw@")
    code, out, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", "--layers",
                               "1", "--latency_reps", "1", "--tracking", with_login, "--output", "s"])
    assert code == 0, err[-2000:]
    lineage = (here / "s" / "compress.json").read_text()
    assert "s3cret-pw" not in out + err + lineage and "me:***@" in err
    assert "View run" not in out  # MLflow's own lines: compress says where the run went, on stderr
    run_id = json.loads(lineage)["mlflow_run_id"]
    assert (tracking_server["artifacts"] / "1" / run_id / "artifacts" / "model" / "model.safetensors").is_file()
    monkeypatch.chdir(there)
    code, _, err = run_main(["export", "--run", run_id, "--tracking", tracking_server["url"], "--format", "hf",
                             "--output", "e", "--register", "tiny-student"])
    assert code == 0, err[-2000:]
    assert (there / "e" / "model.safetensors").read_bytes() == (here / "s" / "model.safetensors").read_bytes()
    client = MlflowClient(tracking_server["url"])
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name = 'tiny-student'")] == ["1"]
    assert not (here / "mlruns").exists() and not (there / "mlruns").exists()


def test_a_url_where_no_tracking_server_answers_is_one_line(tracking_server, tiny_teacher, tiny_data,
                                                             workdir) -> None:
    for url, said in ((f"{tracking_server['url']}/nope", "something answers there, but not an MLflow tracking server "
                                                          "(GET /health: 404)"),
                      ("http://127.0.0.1:abc", "no MLflow tracking server answers there (Port could not be cast")):
        code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--tracking", url])
        (line,) = error_lines(err)
        assert code == 1 and line.startswith(f"compress: error: --tracking {url}: {said}"), err[-2000:]
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_a_tracking_server_that_is_down_is_one_line_in_seconds(tiny_teacher, tiny_data, workdir) -> None:
    """MLflow's client retried for about four minutes, then printed a traceback."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--output", "s"],
                 ["export", "--run", "0123456789abcdef", "--format", "hf"],
                 ["bench", "--model", tiny_teacher, "--run", "0123456789abcdef"]):
        code, _, err = run_main([*args, "--tracking", url])
        (line,) = error_lines(err)
        assert code == 1 and line.startswith(f"compress: error: --tracking {url}: no MLflow tracking server answers "
                                             "there ("), err[-2000:]
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written


@pytest.mark.parametrize("flag", ["--tracking", "--storage"])
def test_a_sqlite_path_is_read_as_sqlalchemy_reads_it(flag: str, optuna_db: Path, mlflow_db: Path, workdir: Path,
                                                      tiny_teacher: Path, tiny_data: Path) -> None:
    """SQLAlchemy ends the path at a '?' (the query) and percent-decodes it. Read as plain text, the check looked at
    a file that did not exist while MLflow (or Optuna) opened the other tool's database and added its tables."""
    other, _ = copy(mlflow_db if flag == "--storage" else optuna_db, workdir)
    (workdir / f"{other.name}?x").mkdir()
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    uri = f"sqlite:///{workdir}/{other.name}?x/new.db"
    if flag == "--tracking":
        args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--tracking", uri]
        wanted = "an Optuna study database"
    else:
        args = ["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}", "--storage", uri,
                "--tracking", sqlite_uri(workdir)]
        wanted = "an MLflow store"
    refused(args, f"{flag} {uri}", wanted)
    assert hashlib.sha256(other.read_bytes()).hexdigest() == digest
    assert check_tracking(f"sqlite:///{workdir}/a%20b.db") is None and not (workdir / "a b.db").exists()
    from compress.infra.tracking import resolve_tracking, sqlite_file

    assert sqlite_file(f"sqlite:///{workdir}/a%20b.db?timeout=5") == workdir / "a b.db"
    assert sqlite_file(resolve_tracking("sqlite:///rel%20dir/m.db?timeout=5")) == workdir / "rel dir" / "m.db"


def test_a_database_holding_both_tools_tables_is_refused_as_either(optuna_db: Path, tmp_path: Path) -> None:
    """What an older compress left when MLflow added its tables to a study database: both tools then failed on
    the other's alembic revision with tracebacks."""
    both, _ = copy(optuna_db, tmp_path)
    with sqlite3.connect(both) as con:
        con.execute("CREATE TABLE experiments (id INTEGER)")
        con.execute("CREATE TABLE runs (id INTEGER)")
    con.close()
    for check, flag in ((check_tracking, "--tracking"), (check_storage, "--storage")):
        with pytest.raises(CompressError, match=rf"^{flag} .*: the database holds both an Optuna study and MLflow's "
                                                r"tables, which cannot share one database"):
            check(f"sqlite:///{both}")
