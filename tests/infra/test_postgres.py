"""Past one machine: a search's study and its MLflow runs on a live PostgreSQL server (the `postgres` fixture), as
workers on many machines would share them. Each tool's database is told apart read-only before either opens it, a
server that cannot be used is one line, and a password in a URL is never printed, logged or saved."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import error_lines, run_main, run_search
from compress.search.study import check_storage
from compress.infra.tracking import check_tracking, shown, where_to_look

SECRET = "s3cret-pw"  # the server trusts localhost, so any password connects; it must appear nowhere
QUICK = {"epochs": 1, "latency_reps": 1, "max_train": 64, "batch_size": 32}


def test_a_password_is_hidden_wherever_a_url_is_shown() -> None:
    assert shown(f"postgresql://me:{SECRET}@db.example:5432/runs") == "postgresql://me:***@db.example:5432/runs"
    assert shown("postgresql+psycopg://me@db/runs") == "postgresql+psycopg://me@db/runs"
    assert shown("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
    assert shown(f"https://me:{SECRET}@mlflow.example") == "https://me:***@mlflow.example"
    assert shown(f"postgresql://me@db/runs?sslmode=require&password={SECRET}&connect_timeout=3") == (
        "postgresql://me@db/runs?sslmode=require&password=***&connect_timeout=3")  # libpq's other way to give it
    assert where_to_look("sqlite:///m.db") == "compress ui --tracking sqlite:///m.db"
    assert SECRET not in where_to_look(f"postgresql://me:{SECRET}@db/runs")
    assert where_to_look("http://mlflow.example:5000") == "http://mlflow.example:5000"
    # an interrupted run's record (OUTPUT.partial/run.json) keeps the store it logs to, without the password
    from types import SimpleNamespace

    from compress.engine.run import _input_identity

    kept = _input_identity(SimpleNamespace(fingerprint="f"), {}, f"postgresql://me:{SECRET}@db/runs")
    assert kept == {"data": "f", "tracking": "postgresql://me:***@db/runs"}


def test_the_postgres_spelling_gets_a_hint_without_the_password(workdir, tiny_teacher, tiny_data) -> None:
    url = f"postgres://me:{SECRET}@db.example/x"
    for flag in ("--storage", "--tracking"):
        code, _, err = run_main(["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}",
                                 flag, url])
        assert code == 1 and error_lines(err) == [f"compress: error: {flag} postgres://me:***@db.example/x: write "
                                                  "postgresql://, not postgres:// (SQLAlchemy dropped that spelling)"]


def test_two_workers_share_a_postgresql_study_and_log_to_a_postgresql_mlflow_store(postgres, workdir, tiny_teacher,
                                                                                  tiny_data, capsys) -> None:
    from mlflow import MlflowClient
    from optuna import load_study

    storage, tracking = postgres.create("study_two"), postgres.url(postgres.create("runs_two").rsplit("/", 1)[1],
                                                                   password=SECRET)
    result = run_search(teacher=str(tiny_teacher), data=str(tiny_data), trials=2, workers=2, study="pg",
                        storage=storage, tracking=tracking, space={"layers": [1, 2], **QUICK})
    printed = capsys.readouterr()
    study = load_study(study_name="pg", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # two processes, one study on the server

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("compress").experiment_id], max_results=100)
    parent = client.get_run(result.parent_run_id)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    steps = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {t.info.run_id for t in trials}]
    assert len(trials) == 2 and len(steps) == 2 and parent.data.metrics["trials_complete"] == 2
    # each tool's tables in its own database only
    assert "runs" in postgres.tables("runs_two") and "studies" not in postgres.tables("runs_two")
    assert "studies" in postgres.tables("study_two") and "runs" not in postgres.tables("study_two")

    # the password: not printed, not in MLflow's params or tags, not in the study, not beside the models
    lineage = [json.loads(p.read_text()) for p in Path(result.front[0]["model"]).parent.parent.rglob("compress.json")]
    kept = [printed.out, printed.err, json.dumps(study.user_attrs), json.dumps(lineage)]
    kept += [json.dumps([r.data.params, r.data.tags]) for r in runs]
    assert lineage and all(SECRET not in text for text in kept)
    assert "postgres:***@localhost" in printed.err and lineage[0]["tracking"] == shown(tracking)


def test_each_tools_postgresql_database_is_refused_as_the_others_and_left_alone(postgres, workdir, tiny_teacher,
                                                                               tiny_data) -> None:
    import optuna
    from mlflow import MlflowClient

    mlflow_db, optuna_db = postgres.create("mlflow_kind"), postgres.create("optuna_kind")
    MlflowClient(mlflow_db).create_experiment("compress")
    optuna.create_study(storage=optuna_db, study_name="s")
    before = {db: postgres.tables(db) for db in ("mlflow_kind", "optuna_kind")}

    code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--tracking", optuna_db])
    assert code == 1 and error_lines(err) == [f"compress: error: --tracking {optuna_db}: an Optuna study database, "
                                              "not an MLflow store (use it as search's --storage)"], err[-2000:]
    code, _, err = run_main(["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}",
                             "--storage", mlflow_db, "--tracking", f"sqlite:///{workdir}/m.db"])
    assert code == 1 and error_lines(err) == [f"compress: error: --storage {mlflow_db}: an MLflow store, not an "
                                              "Optuna study database (use it as --tracking)"], err[-2000:]
    # before, MLflow's alembic added 5 tables to the study's database and Optuna 14 to MLflow's
    assert {db: postgres.tables(db) for db in ("mlflow_kind", "optuna_kind")} == before
    assert not (workdir / "outputs").exists() and not (workdir / "mlruns").exists()


def test_a_server_that_cannot_be_used_is_one_line(postgres, workdir, tiny_teacher, tiny_data) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("localhost", 0))
        closed = s.getsockname()[1]
    search = ["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}"]
    for flag, url, said in [
        ("--storage", f"postgresql://postgres:{SECRET}@localhost:{closed}/x", "Connection refused"),
        ("--storage", postgres.url("no_such_db"), 'database "no_such_db" does not exist; create it first'),
        ("--tracking", postgres.url("no_such_db"), 'database "no_such_db" does not exist; create it first'),
    ]:
        code, _, err = run_main([*search, flag, url])
        (line,) = error_lines(err)
        assert code == 1 and "Traceback" not in err, err[-2000:]
        assert line.startswith(f"compress: error: {flag} {shown(url)}: cannot use the database: ") and said in line
        assert SECRET not in err


def test_an_empty_database_the_tables_cannot_be_created_in_is_one_line(postgres, workdir, tiny_teacher,
                                                                        tiny_data) -> None:
    """PostgreSQL 15 lets only a database's owner create tables in schema public, and a search_path can name no
    schema that exists: either way each tool's first CREATE TABLE was a traceback."""
    owner = postgres.create("not_mine")
    postgres.sql("not_mine", "CREATE ROLE tester LOGIN")
    guest, nowhere = owner.replace("postgres@", "tester@"), owner + "?options=-csearch_path%3Dnosuch"
    search = ["search", "--teacher", tiny_teacher, "--data", tiny_data, "--space", "{layers: [1]}"]
    for flag, url, said in [
        ("--storage", guest, ": user tester may not create tables in schema public (since PostgreSQL 15 only the "
                             "database's owner may by default); GRANT CREATE ON SCHEMA public TO tester, or create "
                             "the database with OWNER tester"),
        ("--tracking", guest, ": user tester may not create tables in schema public"),
        ("--storage", nowhere, ": no schema to create tables in (the search_path names none that exists)"),
        ("--tracking", nowhere, ": no schema to create tables in (the search_path names none that exists)"),
    ]:
        code, _, err = run_main([*search, flag, url])
        (line,) = error_lines(err)
        assert code == 1 and "Traceback" not in err, err[-2000:]
        assert line.startswith(f"compress: error: {flag} {url}{said}"), line
    assert postgres.tables("not_mine") == []
    postgres.sql("not_mine", "GRANT CREATE ON SCHEMA public TO tester")  # what the line says to do
    check_tracking(guest)
    check_storage(guest)


def test_a_run_interrupted_before_passwords_were_hidden_still_resumes(tmp_path) -> None:
    """Its run.json holds the store as typed; compared as kept now (hidden), the same store was refused as another,
    and the refusal printed the password."""
    from compress.infra.errors import CompressError
    from compress.engine.state import RunState

    partial = tmp_path / "out.partial"
    partial.mkdir()
    typed = f"postgresql://me:{SECRET}@db/runs"
    (partial / "run.json").write_text(json.dumps({"run_id": "r", "params": {"lr": 1}, "inputs": {"tracking": typed}}))
    state = RunState(tmp_path / "out", resume=True, overwrite=False)
    state.check_resume({"lr": 1}, {"tracking": shown(typed)})
    with pytest.raises(CompressError, match=r"logs to --tracking postgresql://me:\*\*\*@db/runs, not ") as refused:
        state.check_resume({"lr": 1}, {"tracking": "postgresql://me:***@elsewhere/runs"})
    assert SECRET not in str(refused.value)
