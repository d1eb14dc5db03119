"""compress ui: the MLflow UI (or optuna-dashboard) on compress's store, on 127.0.0.1, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT

from compress.cli.main import main
from compress.infra.tracking import REVIEW_METRICS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def answers(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


def start_ui(args: list[str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """`compress ui ARGS` in a subprocess; returns once it has printed its URL (its stdout lines so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "compress", "ui", *args], cwd=cwd, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = []
    deadline = time.monotonic() + 150
    while not any("Ctrl-C" in line for line in lines):
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"compress ui exited ({proc.wait()}): {proc.stderr.read()[-2000:]}")
        lines.append(line.strip())
        assert time.monotonic() < deadline
    return proc, lines


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        code = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("compress ui did not stop within 40 s of Ctrl-C")
    return code, proc.stderr.read()


# A distill run's final metrics, as engine.run logs them
FINAL = {"student_score": 0.9, "teacher_score": 0.95, "retention": 0.947, "student_params": 1_234_567,
         "student_mb": 4.7, "latency_ms": 2.5, "teacher_latency_ms": 7.5, "speedup": 3.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A compress-layout MLflow store (sqlite + artifacts beside it) with one experiment, tagged as compress tags
    its own, and one distill run logged as engine.run logs it: the task's data, its final metrics, its model folder
    as a logged model; and one more artifact."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from compress.data.tasks import TaskData
    from compress.infra.tracking import _prepare_store, log_final, log_task_data, tag_experiment

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("compress-ui-test", artifact_location=_prepare_store(uri))
    tag_experiment(client, exp)
    run = client.create_run(exp, run_name="distill L3 T=4")
    logger = SimpleNamespace(experiment=client, run_id=run.info.run_id)  # what tracking reads of Lightning's logger
    task = TaskData(name="tiny-news", train_texts=[("a",), ("b",), ("c",)], train_labels=[0, 1, 0],
                    dev_texts=[("d",), ("e",)], dev_labels=[1, 0], label_names=["x", "y"], metric="accuracy",
                    fingerprint="f", flags={"data": str(root)})
    log_task_data(logger, task)
    (root / "student").mkdir()
    (root / "student" / "config.json").write_text("{}")
    log_final(logger, FINAL, artifact_dir=str(root / "student"), model=("student-L3", "distill"), task=task)
    (root / "pareto_front.csv").write_text("trial,score\n0,0.9\n")
    client.log_artifact(run.info.run_id, str(root / "pareto_front.csv"))
    client.set_terminated(run.info.run_id)
    return root


@pytest.fixture(scope="module")
def mlflow_ui(store):
    """`compress ui` on the store, started once for the module's tests (MLflow takes 10-20 s to answer), with what
    it printed (its URL line, then one line per experiment); stopped with Ctrl-C after them, which must stop it and
    its workers cleanly."""
    port = free_port()
    proc, lines = start_ui(["--port", str(port)], cwd=store)  # the default --tracking: ./mlruns/mlflow.db
    base = f"http://127.0.0.1:{port}"
    try:
        lines += [proc.stdout.readline().strip() for _ in range(2)]  # compress-ui-test and Default
        yield base, lines
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "stopped" in err and "Traceback" not in err
    assert not answers(base + "/health")


def search_runs(base: str, exp_id: str) -> list[dict]:
    return json.loads(urllib.request.urlopen(urllib.request.Request(
        base + "/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [exp_id]}).encode(),
        headers={"Content-Type": "application/json"}), timeout=10).read())["runs"]


def test_ui_answers_health_and_lists_the_experiment(mlflow_ui):
    base, printed = mlflow_ui
    assert f"MLflow UI on sqlite:///mlruns/mlflow.db: {base}  (Ctrl-C stops it)" in printed
    assert get(base + "/health") == b"OK"
    found = json.loads(get(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=compress-ui-test"))
    exp_id = found["experiment"]["experiment_id"]
    # the runs table in the Model training view, in compress's columns (test_the_pages_a_user_reviews_...)
    assert (f"experiment compress-ui-test: {base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=compress") in printed
    run_id = search_runs(base, exp_id)[0]["info"]["run_id"]
    # the artifact is served to the UI from the store's artifact folder
    assert get(f"{base}/get-artifact?path=pareto_front.csv&run_uuid={run_id}") == b"trial,score\n0,0.9\n"
    assert get(base + "/").startswith(b"<!doctype html>") or b"<html" in get(base + "/")[:200].lower()


def test_ui_dashboard_serves_the_studies(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    (tmp_path / "mlruns").mkdir()
    study = optuna.create_study(study_name="tiny-search", storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 100.0], params={}, distributions={}))
    port = free_port()
    proc, lines = start_ui(["--dashboard", "--storage", storage, "--port", str(port)], cwd=tmp_path)
    try:
        assert lines[-1] == f"optuna-dashboard on {storage}: http://127.0.0.1:{port}  (Ctrl-C stops it)"
        assert b"tiny-search" in get(f"http://127.0.0.1:{port}/api/studies")
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_ui_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["ui"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and err.startswith("compress: error: --tracking sqlite:///mlruns/mlflow.db: no such "
                                                   "database") and "\n" not in err
    assert err.endswith("run compress from the folder holding mlruns/, or pass --tracking"), err
    with pytest.raises(SystemExit):  # a path in full: where compress runs is not the matter
        main(["ui", "--tracking", f"sqlite:///{tmp_path}/other/mlflow.db"])
    assert capsys.readouterr().err.strip().endswith("mlflow.db); check the path --tracking names")
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["ui", "--port", str(port)])
    assert f"--port {port}: already in use" in capsys.readouterr().err


def test_a_port_a_stopped_ui_left_in_time_wait_is_free():
    """A UI stopped with Ctrl-C (and compress's own health probe) leaves connections in TIME-WAIT for a minute: the
    port looked busy, and `compress ui` could not be restarted. A listener still makes it busy."""
    from compress.infra.errors import CompressError
    from compress.cli.ui import HOST, _check_port

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(CompressError, match=f"--port {port}: already in use"):
            _check_port(port)
        client = socket.create_connection((HOST, port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first, as a stopped server does: its port goes to TIME-WAIT
        client.close()
    _check_port(port)


@pytest.fixture
def chromium() -> str:
    """The Chromium executable. Skipped where it is not installed, except under CI (.ci/run sets
    COMPRESS_TEST_CHROMIUM=required and installs it)."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("COMPRESS_TEST_CHROMIUM") == "required":
            pytest.fail("COMPRESS_TEST_CHROMIUM=required, but headless Chromium is not installed (apt-get install "
                        "chromium)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return found


def page_text(dom: str) -> str:
    """The text a user reads on a page Chromium rendered: its markup, scripts and styles dropped, spaces collapsed."""
    import html
    import re

    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_the_pages_a_user_reviews_render_in_headless_chromium(chromium, mlflow_ui, tmp_path):
    """The link `compress ui` prints opens the runs table in the Model training view (not MLflow 3's GenAI overview
    of traces), with the review metrics as columns, first; the run's page lists its logged model and its datasets.
    Both screenshots stay in the test's tmp_path (pytest keeps the last three sessions'), for a person to look at."""
    base, printed = mlflow_ui
    # the background-networking flags stop Chromium reaching for Google's hosts, which this machine refuses; wide
    # enough that the metric columns are drawn beside the assistant panel MLflow opens on a first visit
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1920,1080", "--virtual-time-budget=15000"]

    def render(url: str, shot: Path) -> str:
        """The page's DOM once its JavaScript has run, and its screenshot, from one Chromium run."""
        dom = subprocess.run([*browser, f"--screenshot={shot}", "--dump-dom", url], check=True, timeout=120,
                             capture_output=True, text=True).stdout
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # not a blank page
        return dom

    url = next(line.split(": ", 1)[1] for line in printed if line.startswith("experiment compress-ui-test"))
    exp_id = url.split("/experiments/")[1].split("/")[0]
    table = render(url, tmp_path / "runs-table.png")
    text = page_text(table)
    # the Model training view: its page is Runs and its side bar has the Model registry; not the GenAI overview
    assert "<title>Runs - Experiment" in table and "Model registry" in text, text[:600]
    assert "Send your first trace" not in text and "Overview" not in text
    assert "You're viewing a shared view" in text  # compress's columns, from the experiment's view tag
    # the review metrics are drawn as columns (the grid writes its headers in no set order), and the run's row holds
    # their values first, in REVIEW_METRICS' order
    header = text.split("Run Name Created Metrics", 1)[1].split("Hide run", 1)[0].split()
    assert set(REVIEW_METRICS) <= set(header), header
    assert "distill L3 T=4 " in text and "0.9 0.947 1234567 4.7 2.5 3 student-L3" in text, text[:1500]
    assert "tiny-news train" in text and "tiny-news dev" in text  # the Dataset column

    run_id = search_runs(base, exp_id)[0]["info"]["run_id"]
    page = page_text(render(f"{base}/#/experiments/{exp_id}/runs/{run_id}", tmp_path / "run-page.png"))
    assert "Logged models (1)" in page and "student-L3" in page and "Ready" in page, page[:1500]
    assert "Datasets tiny-news train" in page
