"""Stops by signal as exceptions: SIGTERM raises Terminated except inside a Lightning fit (Lightning stops that at the
next batch), and CtrlC remembers a Ctrl-C and absorbs a second one while the first is handled."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import pytest
from helpers import FAST, callbacks_for_runs, mlflow_runs, run_main, sqlite_uri, track

from compress.infra.errors import Terminated
from compress.infra.signals import CtrlC, lightning_fit, sigterm_raises, stops_held_between_trials, stops_raise


def _deliver(sig: int) -> None:
    signal.raise_signal(sig)  # the handler has run (in this, the main thread) when it returns, or raised from it


def test_sigterm_raises_terminated_outside_a_fit_and_leaves_a_fit_to_lightning() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), sigterm_raises():
            _deliver(signal.SIGTERM)
        with sigterm_raises():
            ours, lightnings = signal.getsignal(signal.SIGTERM), []
            with lightning_fit():
                # Lightning's handler, in its loop, calls ours after its own and stops the fit at the next batch
                signal.signal(signal.SIGTERM, lambda signum, frame: [lightnings.append(signum), ours(signum, frame)])
                _deliver(signal.SIGTERM)
                signal.signal(signal.SIGTERM, ours)  # Lightning's teardown puts ours back
            assert lightnings == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(Terminated), sigterm_raises(), lightning_fit():  # before or after Lightning's loop
            _deliver(signal.SIGTERM)
        with sigterm_raises(), lightning_fit(alone=False):  # DDP's ranks: Lightning's to stop them together
            _deliver(signal.SIGTERM)
        with sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
        assert issubclass(Terminated, KeyboardInterrupt)  # so every Ctrl-C handler closes its work alike
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_between_trials_waits_for_the_next_trial_or_the_end() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), sigterm_raises(), stops_held_between_trials():
            _deliver(signal.SIGTERM)  # held: Optuna's bookkeeping goes on
            with stops_raise():  # the next trial starts with it
                pytest.fail("the trial ran")
        # one after the last check is not dropped, nor is one that came while optimize failed on an error
        with pytest.raises(Terminated), sigterm_raises(), stops_held_between_trials():
            _deliver(signal.SIGTERM)
        with pytest.raises(Terminated) as stop, sigterm_raises(), stops_held_between_trials():
            _deliver(signal.SIGTERM)
            raise RuntimeError("database is locked")
        assert isinstance(stop.value.__context__, RuntimeError)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_while_the_first_is_handled_is_absorbed() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell's tests ignore SIGINT
    try:
        with CtrlC() as ctrl_c:
            with pytest.raises(KeyboardInterrupt):
                _deliver(signal.SIGINT)
            _deliver(signal.SIGINT)  # during the cleanup: no second KeyboardInterrupt
            assert ctrl_c.pressed
            with pytest.raises(KeyboardInterrupt):
                ctrl_c.stop_if_pressed()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("stop", "code", "status"), [(KeyboardInterrupt, 130, "KILLED"),
                                                       (RuntimeError("out of memory"), None, "FAILED")])
def test_a_stop_or_error_after_fit_closes_the_run_as_killed_or_failed(stop, code, status, tiny_teacher, tiny_data,
                                                                     workdir, monkeypatch) -> None:
    """Lightning marks the MLflow run FINISHED when fit ends; a Ctrl-C or a crash while the student was then scored,
    timed or saved left a FINISHED run with no model."""

    def latency_ms(*args, **kwargs):
        raise stop

    monkeypatch.setattr("compress.models.measure.latency_ms", latency_ms)  # run_training imports it when it runs
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", *FAST, *track(workdir)]
    if code is None:
        with pytest.raises(RuntimeError, match="out of memory"):
            run_main(args)
    else:
        assert run_main(args)[0] == code
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs] == [status]


@contextmanager
def ctrl_c_inside_the_next_query():
    """A Ctrl-C between an MLflow query and the fetch of its rows, as a user's press can land: the statement is left
    unfinished, and SQLite keeps the connection's lock while it lives."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def cut(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            event.remove(Engine, "after_cursor_execute", cut)
            raise KeyboardInterrupt

    event.listen(Engine, "after_cursor_execute", cut)
    try:
        yield
    finally:
        if event.contains(Engine, "after_cursor_execute", cut):
            event.remove(Engine, "after_cursor_execute", cut)


@pytest.mark.parametrize("where", ["in fit", "after fit"])
def test_a_ctrl_c_inside_an_mlflow_query_leaves_no_lock_for_closing_the_run(where, tiny_teacher, tiny_data, workdir,
                                                                            monkeypatch) -> None:
    """The close as KILLED waited SQLite's 20 s busy timeout on the lock the cut query left, failed, and left the run
    RUNNING (in fit, Lightning's own close as FAILED waited first)."""
    import lightning.pytorch as pl
    from mlflow import MlflowClient

    def query_cut_short(*args, **kwargs):
        with ctrl_c_inside_the_next_query():
            MlflowClient(sqlite_uri(workdir)).search_experiments()

    class CutInFit(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            query_cut_short()

    if where == "after fit":
        monkeypatch.setattr("compress.models.measure.latency_ms", query_cut_short)
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", *FAST, *track(workdir)]
    with callbacks_for_runs(*([CutInFit()] if where == "in fit" else [])):
        code, _, err = run_main(args)
    assert code == 130 and "left open" not in err, err[-2000:]
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs] == ["KILLED"]


def test_a_third_ctrl_c_or_a_second_sigterm_quits_a_stop_that_does_not_finish(tmp_path) -> None:
    """After a first stop, a cleanup can hang: MLflow's client retries a tracking server that died for about four
    minutes. A Ctrl-C absorbed every time, or a SIGTERM ignored while Lightning shut down, left kill -9 the only way
    out."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from compress.infra.signals import CtrlC, sigterm_raises\n"
        "with sigterm_raises(), CtrlC():\n"
        "    try:\n"
        "        print('ready', flush=True); time.sleep(30)\n"
        "    except BaseException as stop:\n"
        "        print('stopping', type(stop).__name__, flush=True)\n"
        "        time.sleep(30)  # a cleanup that does not finish\n"
    )
    for first, then, code, said in ((signal.SIGINT, [signal.SIGINT, signal.SIGINT], 130, "press Ctrl-C again"),
                                    (signal.SIGTERM, [signal.SIGTERM], 143, "terminated (SIGTERM) again")):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
        try:
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(first)
            assert proc.stdout.readline().split()[0] == "stopping"
            heard = []
            for sig in then[:-1]:
                proc.send_signal(sig)
                heard.append(proc.stderr.readline())
                while heard[-1] and "still stopping" not in heard[-1]:  # the handler took it: now the next press
                    heard.append(proc.stderr.readline())
            proc.send_signal(then[-1])
            proc.wait(timeout=10)
        finally:
            proc.kill()
        err = "".join(heard) + proc.stderr.read()
        assert proc.returncode == code and said in err and "Traceback" not in err, err


@pytest.mark.parametrize(("then", "teardown"), [("ImportError", False), ("RuntimeError", True), ("del", True),
                                               ("sys.exit", True), ("finished", True), ("except ImportError", True)])
def test_a_ctrl_c_that_did_not_stop_where_it_landed_still_stops_in_one_line(then, teardown) -> None:
    """A Ctrl-C during a pybind11 extension's import comes out as ImportError("initialization failed"); Lightning's
    import of torchmetrics took that for "not installed" and went on, and the next import of SciPy's HiGHS module
    failed with a traceback ('type "ObjSense" is already registered') and exit 1. After an import cut short, the
    interpreter's teardown is skipped (CPython aborted on matplotlib's half-made ft2font there), not the exit
    handlers; not after a Ctrl-C inside a library's `except ImportError:` fallback. One that landed in a
    weakref callback of importlib's was dropped, and `compress share` ran to the end and exited 0."""
    import subprocess
    import sys

    script = (
        "import atexit, os, signal, sys\n"
        "from compress.cli import main as cli\n"
        "class ModuleLock:\n"
        "    def __del__(self):\n"
        "        signal.raise_signal(signal.SIGINT)  # raised in a __del__: Python reports it and drops it\n"
        "def boom(then: str = 'ImportError') -> None:\n"
        "    if then in ('del', 'finished'):\n"
        "        if then == 'del':\n"
        "            ModuleLock()\n"
        "        from compress.engine.trainer import quiet_libraries\n"
        "        quiet_libraries()  # each command's first step once its libraries are loaded\n"
        "        if then == 'finished':  # dropped after the last step that could stop\n"
        "            ModuleLock()\n"
        "            return\n"
        "        print('went on', file=sys.stderr)\n"
        "        return\n"
        "    if then == 'sys.exit':  # Lightning outside fit: a Ctrl-C becomes sys.exit(1)\n"
        "        try:\n"
        "            signal.raise_signal(signal.SIGINT)\n"
        "        except KeyboardInterrupt:\n"
        "            sys.exit(1)\n"
        "    if then == 'except ImportError':  # a Ctrl-C in a library's fallback cuts no import short\n"
        "        try:\n"
        "            import no_such_module_here  # noqa: F401\n"
        "        except ImportError:\n"
        "            signal.raise_signal(signal.SIGINT)\n"
        "    try:\n"
        "        try:\n"
        "            signal.raise_signal(signal.SIGINT)  # lands in an extension's module init\n"
        "        except KeyboardInterrupt as cut:\n"
        "            raise ImportError('initialization failed') from cut  # what pybind11 makes of it\n"
        "    except ImportError:\n"
        "        pass  # a library's 'not installed'\n"
        "    raise {'ImportError': ImportError, 'RuntimeError': RuntimeError}[then]('the next import failed')\n"
        "cli.COMMANDS['boom'] = boom\n"
        "atexit.register(lambda: print('exit handlers ran', file=sys.stderr))\n"
        "class Teardown:\n"
        "    def __del__(self, write=os.write):  # as the interpreter shuts down and clears __main__\n"
        "        write(2, b'teardown ran\\n')\n"
        "kept = Teardown()\n"
        "cli.main(sys.argv[1:])\n"
    )
    done = subprocess.run(  # preexec_fn: a background shell runs the tests with Ctrl-C ignored
        [sys.executable, "-c", script, "boom", "--then", then], capture_output=True, text=True, timeout=120,
        check=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert lines[0] == ("compress: interrupted as it finished; what it wrote is complete" if then == "finished" else
                        "compress: interrupted; rerun with --resume to continue from the last checkpoint")
    assert lines[1:] == ["exit handlers ran", *(["teardown ran"] if teardown else [])], done.stderr


def test_a_second_sigterm_in_a_fit_with_other_ranks_is_not_quit_now() -> None:
    """A scheduler signals the whole process group and rank 0's Lightning passes the stop on, so each DDP rank gets
    SIGTERM twice; the second quit the rank at once (os._exit, mid-step) and left the others in a collective."""
    import subprocess
    import sys

    script = (
        "import signal\n"
        "from compress.infra.signals import lightning_fit, sigterm_raises, sigterm_received\n"
        "with sigterm_raises(), lightning_fit(alone=False):\n"
        "    signal.raise_signal(signal.SIGTERM)  # the handler has run when it returns\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    print('stopping with Lightning', sigterm_received())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "stopping with Lightning True"), done.stderr[-2000:]


def test_a_stop_after_fit_resumes_from_the_end_of_fit(tiny_teacher, tiny_data, workdir, monkeypatch) -> None:
    """A stop while the student was scored, timed or saved threw the training away when no timed checkpoint had
    been written yet (a short fit): --resume trained again from the start. Now it resumes from the checkpoint taken
    when fit ended, trains no step, and writes the model an uninterrupted run writes."""
    import compress.models.measure

    real = compress.models.measure.latency_ms

    def stopped_once(*args, **kwargs):
        monkeypatch.setattr(compress.models.measure, "latency_ms", real)
        raise KeyboardInterrupt

    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "2", *FAST, *track(workdir)]
    assert run_main([*args, "--output", "whole"])[0] == 0
    monkeypatch.setattr(compress.models.measure, "latency_ms", stopped_once)
    assert run_main([*args, "--output", "cut"])[0] == 130
    assert [p.name.endswith("-end.ckpt") for p in (workdir / "cut.partial" / "checkpoints").iterdir()] == [True]
    code, _, err = run_main([*args, "--output", "cut", "--resume"])
    assert code == 0 and "resuming from cut.partial/checkpoints/step" in err and "-end.ckpt" in err, err[-2000:]
    assert "Epoch 0" not in err and "Epoch 1" not in err  # no training: fit was done
    whole, cut = (workdir / name / "model.safetensors" for name in ("whole", "cut"))
    assert cut.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("hook", ["setup", "on_train_end", "on_fit_end"])
def test_a_sigterm_anywhere_in_fit_stops_the_command(hook, tiny_teacher, tiny_data, workdir) -> None:
    """Lightning listens for SIGTERM only from the start of its loop to its teardown, and stops only at a batch with
    another after it. A SIGTERM while the data and model were set up, in the last batch, or while Lightning tore
    down was dropped: the fit ran all its epochs, and the command exited 0 as if never stopped (a search worker
    went on to its next trial, and its parent killed it with the trial left running)."""
    import lightning.pytorch as pl

    batches = []

    class TermAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            batches.append(trainer.global_step)

    def send(self, trainer, *args, **kwargs) -> None:
        if trainer.state.fn == "fit":  # not the evaluation after fit
            os.kill(os.getpid(), signal.SIGTERM)

    setattr(TermAt, hook, send)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell's tests ignore SIGINT
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "3", *FAST, *track(workdir)]
    try:
        with callbacks_for_runs(TermAt()):
            code, _, err = run_main(args)
        # Lightning ignores Ctrl-C while it shuts a fit down, and put it back only from inside its loop
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, sigint)
    assert code == 143, err[-2000:]
    assert err.rstrip().splitlines()[-1] == ("compress: terminated (SIGTERM); rerun with --resume to continue from "
                                             "the last checkpoint"), err[-2000:]
    assert not list(workdir.glob("outputs/*/model.safetensors"))  # nothing written that looks finished
    if hook == "setup":  # before the first batch: nothing trained
        assert batches == []
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs] == ["KILLED"]
    code, _, err = run_main([*args, "--resume"])  # and it goes on as it says
    assert code == 0 and len(list(workdir.glob("outputs/*/model.safetensors"))) == 1, err[-2000:]


def test_a_ctrl_c_dropped_during_a_fit_stops_the_command_as_the_fit_ends(tiny_teacher, tiny_data, workdir) -> None:
    """Python drops a KeyboardInterrupt raised in a __del__ (Lightning's loop frees objects with them each batch):
    the fit trained on, and the command finished and exited 0, the Ctrl-C forgotten."""
    import lightning.pytorch as pl

    class Freed:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    class CtrlCInADel(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 1:
                Freed()

    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell's tests ignore SIGINT
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "2", *FAST, *track(workdir)]
    try:
        with callbacks_for_runs(CtrlCInADel()):
            code, _, err = run_main(args)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert code == 130 and "Exception ignored" not in err, err[-2000:]
    assert err.rstrip().splitlines()[-1] == ("compress: interrupted; rerun with --resume to continue from the last "
                                             "checkpoint"), err[-2000:]
    assert not list(workdir.glob("outputs/*/model.safetensors"))  # nothing written that looks finished
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs] == ["KILLED"]
    code, _, err = run_main([*args, "--resume"])
    assert code == 0 and len(list(workdir.glob("outputs/*/model.safetensors"))) == 1, err[-2000:]
