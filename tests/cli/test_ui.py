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


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A compress-layout MLflow store (sqlite + artifacts beside it) with one experiment, one run, one artifact."""
    from mlflow import MlflowClient

    from compress.infra.tracking import _prepare_store

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("compress-ui-test", artifact_location=_prepare_store(uri))
    run = client.create_run(exp, run_name="distill L3 T=4")
    client.log_metric(run.info.run_id, "student_score", 0.9)
    (root / "pareto_front.csv").write_text("trial,score\n0,0.9\n")
    client.log_artifact(run.info.run_id, str(root / "pareto_front.csv"))
    client.set_terminated(run.info.run_id)
    return root


def test_ui_answers_health_lists_the_experiment_and_stops_on_ctrl_c(store):
    port = free_port()
    proc, lines = start_ui(["--port", str(port)], cwd=store)  # the default --tracking: ./mlruns/mlflow.db
    base = f"http://127.0.0.1:{port}"
    try:
        assert f"MLflow UI on sqlite:///mlruns/mlflow.db: {base}  (Ctrl-C stops it)" in lines
        assert get(base + "/health") == b"OK"
        found = json.loads(get(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=compress-ui-test"))
        exp_id = found["experiment"]["experiment_id"]
        printed = lines + [proc.stdout.readline().strip() for _ in range(2)]  # compress-ui-test and Default
        assert f"experiment compress-ui-test: {base}/#/experiments/{exp_id}/runs" in printed
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            base + "/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [exp_id]}).encode(),
            headers={"Content-Type": "application/json"}), timeout=10).read())["runs"]
        run_id = runs[0]["info"]["run_id"]
        # the artifact is served to the UI from the store's artifact folder
        assert get(f"{base}/get-artifact?path=pareto_front.csv&run_uuid={run_id}") == b"trial,score\n0,0.9\n"
        assert get(base + "/").startswith(b"<!doctype html>") or b"<html" in get(base + "/")[:200].lower()
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "stopped" in err and "Traceback" not in err
    assert not answers(base + "/health")


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


def test_the_experiment_page_renders_in_headless_chromium(chromium, store, tmp_path):
    """The page a user opens from `compress ui`'s printed link lists the run by name, and screenshots non-blank."""
    port = free_port()
    proc, lines = start_ui(["--port", str(port)], cwd=store)
    shot = tmp_path / "experiment.png"
    # the background-networking flags stop Chromium reaching for Google's hosts, which this machine refuses
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900", "--virtual-time-budget=15000"]
    try:
        printed = lines + [proc.stdout.readline().strip() for _ in range(2)]
        url = next(line.split(": ", 1)[1] for line in printed if line.startswith("experiment compress-ui-test"))
        dom = subprocess.run([*browser, "--dump-dom", url], check=True, timeout=120, capture_output=True,
                             text=True).stdout
        subprocess.run([*browser, f"--screenshot={shot}", url], check=True, timeout=120, capture_output=True)
    finally:
        stop(proc)
    assert "distill L3 T=4" in dom  # the runs table, rendered by the UI's JavaScript
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # not a blank page
