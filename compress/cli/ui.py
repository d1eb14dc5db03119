"""compress ui: the MLflow UI on compress's runs (or optuna-dashboard on its search studies), on 127.0.0.1.

Starts the server as a child in its own session, waits until it answers, prints the URL, and stops it on Ctrl-C
(or SIGTERM): SIGTERM to the server's parent stops its workers; what is left after 15 s is killed as a group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.tracking import DEFAULT_STORAGE
from compress.search.study import check_storage
from compress.infra.tracking import DEFAULT_TRACKING, check_tracking, experiment_link, shown, sqlite_file

HOST = "127.0.0.1"  # local only: reach it from elsewhere through an SSH tunnel, not by opening the port
START_TIMEOUT_S = 180  # MLflow answers after about 13 s on an idle machine; a busy one takes longer


def _sqlite_file(uri: str, flag: str) -> Path | None:
    """The database file of a sqlite URI, checked to exist (a typo or another folder would show an empty UI)."""
    path = sqlite_file(uri)
    if path is None:
        return None
    if not path.exists():
        # the default store is relative to where compress runs; a path given in full is a typo or another machine's
        hint = (f"check the path {flag} names" if path.is_absolute() else
                f"run compress from the folder holding mlruns/, or pass {flag}")
        raise CompressError(f"{flag} {uri}: no such database ({path.resolve()}); {hint}")
    return path


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the servers bind: the TIME-WAIT connections a stopped UI (and our health probe) leave for a minute do
        # not make the port busy; a listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            raise CompressError(f"--port {port}: already in use on {HOST}; pass another --port") from None


def _executable(name: str) -> str:
    """The console script installed beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group is empty: everything has exited
        pass


def _stop(proc: subprocess.Popen) -> None:
    """TERM to the server's whole session (its parent, uvicorn, any job runner), then KILL whatever outlives it.

    MLflow 3.17's parent forwards TERM to uvicorn only: its job-runner processes, when enabled, stay behind as
    orphans, so the group is signalled, not just the parent.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _experiments(base: str) -> list[tuple[str, str, dict[str, str]]]:
    """(name, id, tags) of the store's experiments, through the server's REST API."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=50", timeout=10) as r:
            return [(e["name"], e["experiment_id"], {t["key"]: t.get("value", "") for t in e.get("tags", [])})
                    for e in json.load(r).get("experiments", [])]
    except (OSError, ValueError, KeyError):
        return []


def ui(
    tracking: str = DEFAULT_TRACKING,
    port: int | None = None,
    dashboard: bool = False,
    storage: str = DEFAULT_STORAGE,
) -> None:
    """Open the MLflow UI on compress's runs, or optuna-dashboard on its search studies, until Ctrl-C.

    Binds to 127.0.0.1 only. The link printed for each experiment opens its runs table in MLflow's Model training
    view, with the student's score, retention, parameters, MB, latency and speed-up as its columns. Search studies
    read best there as a parent run per study with one nested run per trial; open the parent's pareto_front.png.

    Args:
        tracking: MLflow tracking URI whose runs to show (default: sqlite under ./mlruns, where every command logs).
        port: port to listen on (default: 5000 for MLflow, 8080 for the dashboard).
        dashboard: start optuna-dashboard on --storage instead of the MLflow UI.
        storage: Optuna storage URL holding the search studies, for --dashboard.
    """
    if tracking.startswith(("http://", "https://")) and not dashboard:
        raise CompressError(f"--tracking {shown(tracking)}: that is already a tracking server; open it in a browser")
    port = port if port is not None else (8080 if dashboard else 5000)
    if not 1 <= port <= 65535:
        raise CompressError(f"--port {port}: must be between 1 and 65535")
    base = f"http://{HOST}:{port}"
    extra_env = {}
    if dashboard:
        if "://" not in storage:
            raise CompressError(f"--storage {storage}: an RDB URL such as {DEFAULT_STORAGE}")
        _sqlite_file(storage, "--storage")
        check_storage(storage)  # optuna-dashboard would add Optuna's tables to an MLflow store
        cmd = [_executable("optuna-dashboard"), "--host", HOST, "--port", str(port)]
        what, health = f"optuna-dashboard on {shown(storage)}", base + "/"
    else:
        db = _sqlite_file(tracking, "--tracking")
        # here, not 15 s later in the server's log: an unknown scheme, or another tool's database it would write to
        check_tracking(tracking)
        # the store goes by environment, not argv, where `ps` would show a password in it to every user
        cmd = [_executable("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1"]
        extra_env["MLFLOW_BACKEND_STORE_URI"] = tracking
        if db is not None:  # compress's layout: artifacts beside the database (tracking._prepare_store)
            cmd += ["--artifacts-destination", (db.parent / "artifacts").resolve().as_uri()]
        what, health = f"MLflow UI on {shown(tracking)}", base + "/health"
    _check_port(port)

    log = Path(tempfile.mkstemp(prefix="compress-ui-", suffix=".log")[1])
    secret = None
    if dashboard:  # the storage goes in a file only this user can read (mkstemp's 0600), not in argv, where `ps`
        secret = Path(tempfile.mkstemp(prefix="compress-dashboard-", suffix=".toml")[1])  # shows a password to all
        secret.write_text(f"[optuna_dashboard]\nstorage = {json.dumps(storage)}\n")  # a JSON string is TOML's too
        cmd += ["--from-config", str(secret)]
    # MLflow's job runner (8 processes for GenAI jobs and trace rollups) does nothing for compress's runs
    env = os.environ | {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                        **extra_env}
    # its own session: the terminal's Ctrl-C reaches only us, and we stop the server and its workers in order
    with log.open("w") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        except FileNotFoundError:
            for left in (log, secret):
                if left is not None:
                    left.unlink(missing_ok=True)
            raise CompressError(f"{cmd[0]} is not installed: pip install "
                                + ("optuna-dashboard" if dashboard else "mlflow")) from None

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting {what} (usually 10-20 s) ...", file=sys.stderr, flush=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(health):
            if proc.poll() is not None:
                raise CompressError(f"{cmd[0]} exited with code {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise CompressError(f"{cmd[0]} did not answer {health} within {START_TIMEOUT_S} s: {_tail(log)}")
            time.sleep(0.5)
        print(f"{what}: {base}  (Ctrl-C stops it)", flush=True)
        if not dashboard:
            for name, exp_id, tags in _experiments(base):
                # the runs table in the Model training view: MLflow 3's experiment landing page is its GenAI
                # overview (traces), empty here
                print(f"  experiment {name}: {experiment_link(base, exp_id, tags)}", flush=True)
        proc.wait()
        raise CompressError(f"{cmd[0]} stopped by itself (exit code {proc.returncode}): {_tail(log)}")
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        _stop(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.unlink(missing_ok=True)
        if secret is not None:
            secret.unlink(missing_ok=True)
    print("stopped", file=sys.stderr)
