"""The study: its storage, sampler and pruner, the worker processes that run its trials, its MLflow parent run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from compress.infra.errors import CompressError, Terminated, stop_said
from compress.infra.paths import check_folder
from compress.infra.signals import CtrlC, sigterm_raises, stops_held_between_trials
from compress.infra.tracking import _prepare_store, mlflow_client, shown
from compress.search.space import OBJECTIVES, Dimension, _check_depths, _check_share_fits, parse_space, step_flags
from compress.search.trial import Context, close_runs, objective

# how a spawned worker's exit code (errors.stop_said) says it was stopped
STOPPED_BY = {stop_said(kind())[1]: kind for kind in (KeyboardInterrupt, Terminated)}
SAMPLERS = ("auto", "nsga2", "tpe", "random")
PRUNERS = ("median", "hyperband", "none")


# --- the study --------------------------------------------------------------------------------------------------

class RetryStale:
    """Heartbeat-stale trial (its worker died): close its MLflow runs as failed, then queue it again.

    Optuna 5's RetryHeartbeatStaleTrialCallback replaces RetryFailedTrialCallback (deprecated in 4.9).
    """

    def __init__(self, max_retry: int, tracking: str) -> None:
        self.max_retry, self.tracking = max_retry, tracking

    def __call__(self, study, trial) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        retried = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
        print(f"trial {trial.number}: its worker stopped sending heartbeats; marked failed"
              + ("; queued to run again" if retried else f"; not retried (--retries {self.max_retry} used up)"),
              file=sys.stderr)
        close_runs(self.tracking, trial.user_attrs.get("mlflow_run_id"), "FAILED")
        RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, trial)


def _quiet_optuna() -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=r".*SADeprecationWarning.*|.*noload.*")
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoCtrlCTraceback) for f in log.filters):
        log.addFilter(_NoCtrlCTraceback())


class _NoCtrlCTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C as a failure, with the traceback of the user's keypress and a second
    "failed with value None" line; compress says instead that the search was interrupted and how to go on."""

    def __init__(self) -> None:
        super().__init__()
        self._drop_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and issubclass(record.exc_info[0], KeyboardInterrupt):  # SIGTERM's Terminated too
            self._drop_next = True
            return False
        if self._drop_next and "failed with value" in record.getMessage():
            self._drop_next = False
            return False
        return True


def check_storage(url: str) -> Path | None:
    """The sqlite file of --storage (None for a server database), checked read-only before anything writes: Optuna's
    RDBStorage adds its tables to whatever database it opens, an MLflow store included, and only then fails on that
    store's alembic revision."""
    from compress.infra.tracking import check_kind, check_spelling, sqlite_file

    check_spelling(url, "--storage")
    db = sqlite_file(url)
    if db is not None:
        check_folder(db.parent, "--storage")
    check_kind(url, "--storage", "optuna")
    return db


def make_storage(url: str, heartbeat: int, retries: int, tracking: str):
    import optuna

    _quiet_optuna()
    import sqlalchemy.exc

    kwargs = {}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              heartbeat_stale_trial_callback=RetryStale(retries, tracking), **kwargs)
        except sqlalchemy.exc.IntegrityError:
            # two processes creating a new database's tables at once (workers on several machines): one wins
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
        except sqlalchemy.exc.ArgumentError as err:
            raise CompressError(f"--storage {shown(url)}: not a database URL SQLAlchemy knows ({err})") from None


def make_sampler(name: str, objectives: list[str], trials: int, seed: int | None):
    """auto: NSGA-II for several objectives, TPE for one. Both start from random trials; for a small search the
    random start is a third of the trials (NSGA-II's generation, TPE's startup) so the rest can exploit it."""
    import optuna

    start = max(4, min(50, trials // 3))
    if name == "auto":
        name = "nsga2" if len(objectives) > 1 else "tpe"
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=start, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=min(start, 10), seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str, objectives: list[str]):
    import optuna

    if len(objectives) > 1 or name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def load_study(ctx: Context, worker: int = 0):
    import optuna

    storage = make_storage(ctx.storage, ctx.heartbeat, ctx.retries, ctx.tracking)
    if ctx.budget is not None:  # compress auto: checkpoints judged against the budget's accuracy floor
        from compress.search.budget import floor_pruner

        pruner = floor_pruner(ctx.budget.floor)
    else:
        pruner = make_pruner(ctx.pruner, ctx.objectives)
    study = optuna.load_study(study_name=ctx.study, storage=storage, pruner=pruner)
    # a different seed per worker and per start, or two workers (or a resumed study) would draw the same values
    seed = ctx.sampler_seed
    if seed is not None:
        seed += 1000 * worker + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(ctx.sampler, ctx.objectives, ctx.trials, seed)
    return study


def work(ctx: Context, n_trials: int, worker: int = 0, wait: float = 0.0) -> None:
    """One worker: run `n_trials` trials of the study (in this process, or a spawned one)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # spawned with Ctrl-C ignored (run_workers): take it up now
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from compress.engine.trainer import quiet_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    _quiet_optuna()
    flags = step_flags()
    dims = parse_space(ctx.space, flags)
    study = load_study(ctx, worker)
    if wait:  # a replacement for a dead worker: let the dead one's heartbeat go stale, so its trial is retried first
        time.sleep(wait)
    # Exceptions fail the trial and the study goes on (Optuna logs each with its traceback); Ctrl-C stops it.
    # --time_budget: Optuna starts no trial after the timeout and lets the running one finish
    timeout = max(0.0, ctx.deadline - time.time()) if ctx.deadline is not None else None
    if timeout == 0.0:
        return
    try:
        with sigterm_raises(), CtrlC() as ctrl_c, stops_held_between_trials():
            study.optimize(lambda trial: objective(trial, ctx, dims, flags), n_trials=n_trials, catch=(Exception,),
                           gc_after_trial=True, callbacks=[ctrl_c.stop_if_pressed], timeout=timeout)
            ctrl_c.stop_if_pressed()
    except KeyboardInterrupt as stop:
        if multiprocessing.parent_process() is None:
            raise
        # a spawned worker: multiprocessing would print the whole traceback of the keypress; the exit code tells
        # the parent which stop it was, and the parent says how to go on
        raise SystemExit(stop_said(stop)[1]) from None


def interrupted_trials(study) -> list:
    """The trials a stop cut short that no later trial has re-run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    return [t for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in rerun]


def requeue_interrupted(study) -> list[int]:
    """Queue again the parameters of each trial a Ctrl-C cut short and no later trial has re-run, so the next run of
    the study starts with them; returns their numbers."""
    cut = interrupted_trials(study)
    for t in cut:
        # a queued trial stopped as it started has sampled nothing: its values are still the ones queued
        study.enqueue_trial({**t.system_attrs.get("fixed_params", {}), **t.params}, user_attrs={"rerun_of": t.number})
    return [t.number for t in cut]


def _finished_by(study, pid: int) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.user_attrs.get("worker") == pid)


def run_workers(ctx: Context, trials: int, workers: int) -> list[str]:
    """K spawned processes share the trials; one killed by a signal is replaced for the trials it had left.

    Returns a line for each worker that exited with an error (its traceback is above, in its own output).
    """
    import multiprocessing

    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    spawn = multiprocessing.get_context("spawn")  # fork would copy torch's threads and open sqlite connections
    study = load_study(ctx)
    procs, restarts, errors = {}, 0, []

    def start(i: int, n: int, wait: float = 0.0):
        proc = spawn.Process(target=work, args=(ctx, n, i, wait), name=f"compress-search-{i}")
        # the worker starts with Ctrl-C ignored (it imports torch and compress first, where a Ctrl-C was a 40-line
        # traceback each) and takes it up in work(); this process passes the stop on to it either way
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        procs[i] = (proc, n)

    for i, n in enumerate(shares):
        if n:
            start(i, n)
    try:
        while procs:
            for i, (proc, n) in list(procs.items()):
                proc.join(timeout=0.5)
                if proc.exitcode is None:
                    continue
                del procs[i]
                left = n - _finished_by(study, proc.pid)
                # killed by a signal (kill -9, the OOM killer): replace it; an error would only repeat, so report it
                if proc.exitcode in STOPPED_BY:  # it was stopped (a signal to it alone): stop them all alike
                    raise STOPPED_BY[proc.exitcode]
                if proc.exitcode < 0 and left > 0 and restarts < max(ctx.retries, 1) * workers:
                    restarts += 1
                    print(f"worker {i} (pid {proc.pid}) was killed (signal {-proc.exitcode}); starting a replacement "
                          f"for its {left} trial(s), after {2 * ctx.heartbeat + 1} s so its running trial is "
                          "detected as failed and retried", file=sys.stderr)
                    start(i, left, wait=2 * ctx.heartbeat + 1)
                elif proc.exitcode != 0:
                    errors.append(f"worker {i} (pid {proc.pid}) exited with code {proc.exitcode}")
    except KeyboardInterrupt:
        _stop_workers([proc for proc, _ in procs.values()])
        raise
    return errors


def _stop_workers(procs: list) -> None:
    """Pass the stop on to every worker at once, as SIGTERM: SIGTERM (`kill PID`, a scheduler, whose grace period is
    short) and SIGINT (`kill -INT PID`) reach only this process, and a terminal's Ctrl-C reached the workers
    already. Each closes its trial as interrupted; one still going after the deadline is killed, and its trial
    retried later. A second Ctrl-C here is ignored: it would end the wait and leave the workers to print their
    tracebacks last."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # SIGTERM either way: inside a fit Lightning stops at the batch boundary, where a SIGINT could land inside an
        # MLflow write and leave SQLite locked for the others; a worker already stopping (a terminal's Ctrl-C) takes
        # it as nothing new. 30 s outlasts SQLite's 20 s busy timeout; a second signal would only quit the workers
        # without closing their runs (signals.py), so the next is SIGKILL.
        for sent, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            alive = [p for p in procs if p.exitcode is None]
            for p in alive:
                with contextlib.suppress(ProcessLookupError):  # it exited just now
                    os.kill(p.pid, sent)
            deadline = time.monotonic() + wait_s
            for p in alive:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            if sent == signal.SIGTERM and (late := [p for p in alive if p.exitcode is None]):
                print(f"compress: {len(late)} worker(s) did not close their trial within {wait_s} s of the stop; "
                      "killing them (each trial left running is retried when the study resumes)", file=sys.stderr,
                      flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _study_config(teacher: str, task: str | None, data: str | None, objectives: list[str], space: dict) -> dict:
    def where(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return {"teacher": where(teacher), "task": task, "data": where(data), "objectives": objectives, "space": space}


def open_study(ctx: Context, config: dict):
    """Create the study, or open it again (resume) after checking it was made for the same search."""
    import optuna

    storage = make_storage(ctx.storage, ctx.heartbeat, ctx.retries, ctx.tracking)
    try:
        existing = optuna.load_study(study_name=ctx.study, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        before = existing.user_attrs.get("compress_config")
        if before is not None and json.dumps(before, sort_keys=True) != json.dumps(config, sort_keys=True):
            changed = [k for k in config if before.get(k) != config[k]]
            raise CompressError(f"--study {ctx.study}: already exists in {shown(ctx.storage)} with another "
                                f"{', '.join(changed)}; pass a new --study, or the same settings to add trials to it")
        return existing
    directions = [OBJECTIVES[o][1] for o in ctx.objectives]
    study = optuna.create_study(storage=storage, study_name=ctx.study, directions=directions, load_if_exists=True)
    study.set_metric_names(list(ctx.objectives))
    study.set_user_attr("compress_config", config)
    return study


def _parent_run(ctx_fields: dict, study, tracking: str, experiment: str, study_name: str, command: str = "search",
                title: str | None = None) -> tuple[str, str]:
    """The study's MLflow parent run (created once, found again on resume) and its experiment id."""
    from compress.infra.tracking import git_commit, tag_experiment

    client = mlflow_client(tracking)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                    artifact_location=_prepare_store(tracking))
    tag_experiment(client, exp_id)  # the parent may be the first run of the store
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id and study.user_attrs.get("mlflow_tracking") == shown(tracking):
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, exp_id
        except Exception:  # the MLflow store was reset: start a new parent
            pass
    title = title or f"search {study_name}: {' vs '.join(ctx_fields['objectives'].split(','))}"
    run = client.create_run(exp_id, run_name=title, tags={
        "compress.command": command, "optuna.study": study_name, "optuna.storage": ctx_fields["storage"],
        "git_commit": git_commit()})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in ctx_fields.items()])
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    study.set_user_attr("mlflow_tracking", shown(tracking))
    return run.info.run_id, exp_id


def resolve_teacher(teacher: str, task: str | None, data: str | None, text_column: str | None, label_column: str,
                    dims: dict[str, Dimension], flags: dict, quoting: str = "auto"):
    """Check the teacher and the data (seconds, before anything is written). Returns a function giving the teacher
    every trial starts from: as given when it has a classifier for the task, else fine-tuned once (distill's own
    fine-tuning and cache, with the study's fixed values), its run nested under the study's parent run."""
    from compress.data.tasks import load_task
    from compress.models.loading import (ENCODER_TYPES, check_encoder, check_text_classifier, has_task_head,
                                         load_config, resolve_max_length, resolve_model)

    fixed = {k.rpartition(".")[2]: d.value for k, d in dims.items()
             if d.kind == "fixed" and k.rpartition(".")[0] in ("", "distill")}
    defaults = flags["distill"]

    def get(key):
        return fixed.get(key, defaults[key])

    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=get("max_train"),
                          seed=get("seed"), quoting=quoting)
    path = resolve_model(teacher, "--teacher")
    config = load_config(path, "--teacher")
    check_text_classifier(config, "--teacher")  # any encoder family teaches, as in distill
    # the model every trial's student is cut from: `student` when the space gives one, else the teacher itself
    students = [v for k, d in dims.items() if k.rpartition(".")[2] == "student" for v in d.values() if v is not None]
    if not students and config.model_type not in ENCODER_TYPES:
        raise CompressError(f"--teacher {teacher}: a student is built from the layers of a BERT-family model, not a "
                            f"{config.model_type}; set one in the space, e.g. student: minilm-l6")
    for student in students:
        student_config = load_config(resolve_model(student, "space: student"), "space: student")
        check_encoder(student_config, "space: student")
        _check_share_fits(student_config, dims, flags)
        _check_depths(student_config, dims, whose="student's")
    if not students:
        _check_share_fits(config, dims, flags)
    _check_depths(config, dims, layers=not students)  # its positions bound --max_length either way
    if has_task_head(config, task_data.label_names):
        return lambda *_: path
    from dataclasses import replace

    from compress.engine.run import RunHooks, TrainConfig
    from compress.engine.teacher import ensure_task_teacher
    from compress.options.groups import RuntimeConfig, TrackingConfig, TrainingConfig

    # distill's own fine-tuning of a head-less teacher (steps.distill), with the study's fixed values
    training = TrainingConfig(epochs=get("teacher_epochs"), batch_size=get("batch_size"), lr=get("teacher_lr"),
                              warmup=0.1, weight_decay=0.01, seed=get("seed"))
    runtime = RuntimeConfig(precision=get("precision"), accelerator=get("accelerator"), devices=get("devices"),
                            strategy=get("strategy"), num_workers=get("num_workers"),
                            checkpoint_every=get("checkpoint_every"), checkpoint_minutes=get("checkpoint_minutes"),
                            latency_reps=get("latency_reps"))
    # left out, the teacher's positions may cap it, as in distill
    cfg = TrainConfig(training, runtime, resolve_max_length(get("max_length"), [config]))
    cfg.validate()

    def finetuned(parent_run_id: str, tracking: str, experiment: str, progress: bool | None = None) -> str:
        from compress.engine.trainer import quiet_libraries

        quiet_libraries()
        run_cfg = cfg if progress is None else replace(cfg, runtime=replace(runtime, progress=progress))
        return ensure_task_teacher(path, teacher, task_data, run_cfg, TrackingConfig(tracking, experiment),
                                   cache_root=Path(get("teacher_cache")),
                                   hooks=RunHooks(tags={"mlflow.parentRunId": parent_run_id}))
    return finetuned
