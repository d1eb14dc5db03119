"""A Lightning fit that tells a stop (Ctrl-C, SIGTERM) from success and from an error, and closes its MLflow run
as KILLED or FAILED accordingly."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from compress.infra.errors import Terminated
from compress.infra.signals import ctrl_c_seen, lightning_fit, raise_dropped_ctrl_c, release_frames, sigterm_received


def fit_or_stop(trainer, module, datamodule, ckpt: str | None) -> None:
    """trainer.fit, with a stop by signal told apart from success and from an error. Lightning turns Ctrl-C into
    sys.exit(1) (no word of resuming) and SIGTERM into SIGTERMException, a SystemExit of code None, which exited 0
    with no output written, so `compress finetune && compress distill` went on as if it had worked."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    alone = trainer.world_size == 1 and trainer.strategy.launcher is None
    if alone:  # a fit with other ranks is Lightning's to stop, all ranks together (lightning_fit)
        raise_dropped_ctrl_c()
    try:
        with lightning_fit(alone=alone):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except SIGTERMException:
        _close_progress_bars(trainer)
        raise Terminated from None
    except (SystemExit, Exception) as stop:
        # Ctrl-C (or a SIGTERM before or after Lightning's loop, raised by ours): the CLI says how to resume and
        # exits 130 (143); search marks the trial failed. Lightning's sys.exit(1) is raised while handling the
        # KeyboardInterrupt, and so is its own shutdown failing: a Ctrl-C that lands inside an MLflow write leaves
        # SQLite locked, and closing the run as FAILED then raises "database is locked". The checkpoints are whole
        # either way, and --resume continues the same run.
        _close_progress_bars(trainer)  # an error's line too would land mid-bar, with the bar drawn again below it
        cut = _during_ctrl_c(stop)
        if cut:
            raise (Terminated if isinstance(cut, Terminated) else KeyboardInterrupt) from None
        raise
    if sigterm_received():  # in the last batch or as the loop ended: Lightning noted it and let fit finish
        raise Terminated
    if alone:  # a Ctrl-C dropped in a __del__ during the fit: Lightning trained on
        raise_dropped_ctrl_c()


@contextmanager
def closes_run_on_error(logger, errors: bool = True):
    """Close the MLflow run as KILLED (a stop) or FAILED (an error, unless errors=False) if the block raises.
    Lightning marks the run FINISHED when fit ends, so a Ctrl-C or an error while the student was scored, timed or
    saved left a FINISHED run with no model; and it marks a stop inside fit FAILED, like an error, where the UI
    should tell a run to resume from a run that broke. At best: a Ctrl-C inside an MLflow write leaves the store
    locked, and the stop must go on."""
    try:
        yield
    except BaseException as err:
        # a Ctrl-C that came out as another error is still a stop (signals.ctrl_c_remembered)
        status = "KILLED" if isinstance(err, KeyboardInterrupt) or ctrl_c_seen() else "FAILED"
        if status == "FAILED" and not errors:
            raise
        if status == "KILLED":
            release_frames(err)  # else a Ctrl-C inside an MLflow query leaves SQLite locked for the close
        try:
            logger.experiment.set_terminated(logger.run_id, status)
        except Exception as closing:
            print(f"note: MLflow run {logger.run_id} left open ({type(closing).__name__})", file=sys.stderr)
        raise


def _during_ctrl_c(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) `error` was raised while handling, if any (an error of its own was
    not)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _close_progress_bars(trainer) -> None:
    """Lightning leaves its bars open when fit stops early; tqdm would redraw them at exit, below the last word."""
    from tqdm import tqdm

    for value in getattr(trainer.progress_bar_callback, "__dict__", {}).values():
        if isinstance(value, tqdm):
            value.close()
