"""Stops by signal, made exceptions at a point where they can be handled: SIGTERM raises errors.Terminated (a
KeyboardInterrupt, so every Ctrl-C handler closes its work the same way), and a Ctrl-C is remembered, so one that
Python dropped still stops a search.

Inside a Lightning fit's loop, SIGTERM is Lightning's: it stops at the next batch boundary (recipe.fit_or_stop makes
that Terminated too). Lightning calls a handler that was there before it, so ours does nothing while its loop runs.
Between a search's trials, inside Optuna's bookkeeping, a stop waits for the next trial to start or the last to close.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

from compress.infra.errors import Terminated

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

_fitting = threading.Event()
_fit_alone = threading.Event()  # the fit runs in this process alone: no launcher, no other ranks
_stopping = threading.Event()  # a first SIGTERM or Ctrl-C arrived; the work is closing down
_sigterm_seen = threading.Event()
_ctrl_c_seen = threading.Event()  # a Ctrl-C came since the command began, raised where it landed or not
_holding = threading.Event()  # a search is between its trials, in Optuna's bookkeeping: a stop waits for a trial
_held: list[type[KeyboardInterrupt]] = []  # the stop that waits: Terminated or KeyboardInterrupt


@contextmanager
def lightning_fit(alone: bool = True):
    """Mark a trainer.fit as running: a SIGTERM then is Lightning's to stop at the next batch, or ours to raise
    before and after Lightning's loop. A fit with other processes (DDP's ranks, ddp_spawn's workers) is left to
    Lightning throughout: raised here, one rank stopped while the others waited for it in a collective, and
    ddp_spawn's main process said "terminated" while its workers trained on.

    Lightning sets Ctrl-C to be ignored when it shuts a fit down for one and puts it back only if its loop had
    started; the handler from before the fit is put back here, so that a search's second and third Ctrl-C still
    work and a later command in the same process still takes a Ctrl-C."""
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    _fitting.set()
    if alone:
        _fit_alone.set()
    try:
        yield
    finally:
        _fitting.clear()
        _fit_alone.clear()
        if main and sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def release_frames(stop: BaseException | None) -> None:
    """Free what the frames a stop cut short still hold, through its whole chain, before the work is closed down.
    A Ctrl-C between a SQLite query and the fetch of its rows leaves the statement unfinished in a cursor one of
    those frames holds; SQLAlchemy closes the connection, but SQLite keeps a connection with an unfinished statement
    open, lock and all, until the statement goes. Closing the MLflow run (as KILLED) then waited SQLite's 20 s busy
    timeout and failed, and so did every later write of the process: a search ran its remaining trials' closes at
    20 s each. Frames still running are left alone (traceback.clear_frames skips them)."""
    import traceback

    seen, chain = set(), [stop]
    while chain:
        error = chain.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        chain += [error.__cause__, error.__context__]


class _QuietWhileStopping(logging.Filter):
    """MLflow logs a full traceback for each write that finds SQLite locked, which a write cut by the stop leaves it
    (20 s of busy timeout). While a stop closes the runs, compress says in one line which runs were left open."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _stopping.is_set()


def _quiet_mlflow_while_stopping() -> None:
    log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _QuietWhileStopping) for f in log.filters):
        log.addFilter(_QuietWhileStopping())


def _on_sigterm(signum, frame) -> None:
    if _fitting.is_set() and not _fit_alone.is_set():
        # a fit with other ranks is Lightning's throughout (lightning_fit). Its ranks get a stop twice (a scheduler
        # signals the whole group, and rank 0's Lightning passes it on): the second is not "quit now", which cut a
        # rank mid-step and left the others in a collective
        _sigterm_seen.set()
        return
    if _sigterm_seen.is_set():  # the first stop is not finishing (MLflow retries a dead server for minutes): quit now
        print("compress: terminated (SIGTERM) again; quitting without closing its runs", file=sys.stderr, flush=True)
        os._exit(143)
    _sigterm_seen.set()
    if _stopping.is_set():  # a Ctrl-C's stop goes on
        return
    # In a fit, Lightning's handler (which calls this one) stops at the next batch. It listens only from the start
    # of its loop to its teardown: before (the data and model set up) and after, this handler is the one installed,
    # and the stop is ours to raise. Lightning takes it for a Ctrl-C and shuts the fit down; fit_or_stop tells them
    # apart. A fit that ends without a batch left to stop at: fit_or_stop asks sigterm_received().
    if _fitting.is_set() and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    _stopping.set()
    if _holding.is_set():
        _held.append(Terminated)
        return
    raise Terminated


def sigterm_received() -> bool:
    """Whether a SIGTERM came since the stop handling began (sigterm_raises), handled by Lightning or not."""
    return _sigterm_seen.is_set()


@contextmanager
def stops_held_between_trials():
    """Around a study's optimize: a stop (SIGTERM, Ctrl-C) that comes while Optuna creates, samples or closes a
    trial waits for the next trial to start (`stops_raise`) or the last to be closed (`raise_held_stop`). Raised
    where it landed, it cut Optuna between creating a trial and running it, or between running and closing it, and
    left that trial RUNNING with no mark until its heartbeat went stale (a search worker's parent, which sends the
    stop, then killed the worker for not finishing)."""
    _holding.set()
    try:
        yield
    finally:
        _holding.clear()
        held, _held[:] = list(_held), []
        # one that came after the last check, or while optimize failed on an error: the stop is still the news
        if held and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise held[0]


@contextmanager
def stops_raise():
    """Around one trial's own work, inside stops_held_between_trials: a stop held back is raised as the trial
    starts (the trial, marked interrupted, runs again first when the study resumes), and one during it is raised
    where it lands."""
    holding = _holding.is_set()
    _holding.clear()
    try:
        raise_held_stop()
        yield
    finally:
        if holding:
            _holding.set()


def raise_held_stop(*args) -> None:
    """Raise the stop held back between trials, if one was; an Optuna callback (after each trial is closed)."""
    if _held:
        raise _held[0]


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in this block (the main thread, where a default handler is replaced). Without it,
    a SIGTERM outside a fit killed the process where it stood: a search's trial stayed RUNNING until its heartbeat
    went stale, and no line said how to go on."""
    installed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    _quiet_mlflow_while_stopping()
    if installed:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _stopping.clear()  # the stop has left the block; past it, a SIGTERM is a first one again
            _sigterm_seen.clear()


def _on_sigint(signum, frame) -> None:
    _ctrl_c_seen.set()
    signal.default_int_handler(signum, frame)


def _reports_but_a_handled_ctrl_c(report, pressed):
    """sys.unraisablehook: Python reports the Ctrl-C it dropped in a __del__ as "Exception ignored ...
    KeyboardInterrupt", a traceback among compress's lines; once `pressed()`, that Ctrl-C is handled, so the report
    is dropped too."""
    def hook(unraisable) -> None:
        if not (pressed() and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            report(unraisable)
    return hook


@contextmanager
def ctrl_c_remembered():
    """Around a whole command: a Ctrl-C raises KeyboardInterrupt where it lands, as always, and is remembered for
    when it did not stop the work there. Python drops an exception raised in a __del__ or a weakref callback (one
    in importlib's module locks let `compress share` run to the end and exit 0, after printing "Exception ignored
    ... KeyboardInterrupt"); `raise_dropped_ctrl_c` raises it at the next step, and the report is not printed. A
    Ctrl-C in a pybind11 extension's import comes out as ImportError("initialization failed"), which a library may
    take for "not installed" (Lightning imports torchmetrics, SciPy and matplotlib so): any error after a Ctrl-C
    leaves this block as the KeyboardInterrupt, not as the traceback of the next import to fail. Only the main
    thread's default handler is wrapped: a SIGINT ignored (a shell's background job) stays ignored."""
    installed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    _ctrl_c_seen.clear()
    report = sys.unraisablehook
    if installed:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _reports_but_a_handled_ctrl_c(report, _ctrl_c_seen.is_set)
    try:
        yield
    except Exception as err:
        if _ctrl_c_seen.is_set():
            raise KeyboardInterrupt from err
        raise
    except SystemExit as done:
        if _ctrl_c_seen.is_set() and done.code == 1:  # Lightning's word for a Ctrl-C outside fit (trainer.validate)
            raise KeyboardInterrupt from None
        raise
    else:
        if _ctrl_c_seen.is_set():  # dropped after the command's last step that could stop: it finished regardless
            print("compress: interrupted as it finished; what it wrote is complete", file=sys.stderr)
            raise SystemExit(130)
    finally:
        if installed:
            if signal.getsignal(signal.SIGINT) is _on_sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = report
        _ctrl_c_seen.clear()


def raise_dropped_ctrl_c() -> None:
    """Raise a Ctrl-C that came in ctrl_c_remembered's block and did not stop the work where it landed; called as
    a command's libraries are loaded and as a fit starts and ends. A Ctrl-C that was raised is handled by then (it
    stopped the command), so one remembered here was dropped."""
    if _ctrl_c_seen.is_set():
        raise KeyboardInterrupt


def ctrl_c_seen() -> bool:
    """Whether a Ctrl-C came in ctrl_c_remembered's block (the command)."""
    return _ctrl_c_seen.is_set()


class CtrlC:
    """Remembers a Ctrl-C, so one that Python dropped still stops a search after its trial.

    Python prints and drops an exception raised inside `__del__`, and Optuna's gc.collect() after every trial runs
    many (Lightning's profiler has one), so a Ctrl-C landing there would otherwise let the study run all its trials
    and exit 0. A second Ctrl-C while the first is being handled only says that the stop goes on: raised again, it cut
    that cleanup short (a trial left unclosed) or was dropped in a __del__ with a traceback printed after compress's
    last line. A third quits at once, for a cleanup that cannot finish. Only the main thread's default handler is
    replaced: a SIGINT ignored (a shell's background job) stays ignored.
    """

    def __init__(self) -> None:
        self.pressed, self.presses, self._installed, self._unraisable, self._previous = False, 0, False, None, None

    def __enter__(self) -> Self:
        _quiet_mlflow_while_stopping()
        self._previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() \
            else None
        if self._previous in (signal.default_int_handler, _on_sigint):
            signal.signal(signal.SIGINT, self._on_signal)
            self._installed = True
            self._unraisable = sys.unraisablehook
            sys.unraisablehook = _reports_but_a_handled_ctrl_c(self._unraisable, lambda: self.pressed)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.presses += 1
        if self.presses == 1:
            self.pressed = True
            _stopping.set()
            if _holding.is_set():  # between a search's trials: stop_if_pressed or the next trial raises it
                _held.append(KeyboardInterrupt)
                return
            raise KeyboardInterrupt
        if self.presses == 2:
            print("compress: still stopping (closing its runs); press Ctrl-C again to quit at once", file=sys.stderr,
                  flush=True)
            return
        os._exit(130)  # the cleanup hangs (a tracking server gone, its client retrying for minutes)

    def stop_if_pressed(self, study=None, trial=None) -> None:
        """An Optuna callback (after each trial) and a last check once optimize returns; a SIGTERM held back
        between trials is raised here too."""
        raise_held_stop()
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._unraisable
            _stopping.clear()
