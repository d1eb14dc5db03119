"""compress search: Optuna over the whole recipe, scored on accuracy against size (or speed) together.

One trial runs the steps its parameters name, through the commands' own functions:
  teacher (fine-tuned once per study when it has no classifier) -> distill (when `layers` is set)
  -> prune (when heads, ffn, sparsity or drop_layers is non-zero, or vocab is true)
  -> share (when `groups` is set)
MLflow: one parent run per study, one nested run per trial carrying the final student's metrics under distill's
names, and the steps' own runs nested under their trial. At the end the Pareto front goes onto the parent run as a
CSV and a plot, and to the terminal as a table. Optuna keeps the study in an RDB (sqlite under mlruns/ by default),
so the same --study resumes, several processes share it, and a trial whose worker died is failed and retried.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from compress.infra.errors import CompressError, stop_said
from compress.options.bounds import check_all
from compress.infra.paths import check_output
from compress.infra.identity import slug
from compress.infra.tracking import _prepare_store, mlflow_client, resolve_tracking, shown
from compress.options.groups import DataConfig, OutputConfig, SearchConfig, TrackingConfig
from compress.search.report import SearchResult, summarise
from compress.search.space import SEARCHED, load_space, parse_space, step_flags
from compress.search.study import (PRUNERS, SAMPLERS, _parent_run, _study_config, check_storage, interrupted_trials,
    load_study, open_study, requeue_interrupted, resolve_teacher, run_workers, work)
from compress.search.trial import Context, close_after

# --- the command ------------------------------------------------------------------------------------------------

def search(step: SearchConfig, data: DataConfig | None = None, tracking: TrackingConfig | None = None,
           output: OutputConfig | None = None) -> SearchResult:
    """Search the recipe space `step.space` from `step.teacher` with Optuna; return the Pareto front, every trial's
    row and the study's MLflow parent run id.

    Running it again with the same study and storage adds `step.trials` trials to the study. A Ctrl-C closes the
    study's runs and raises KeyboardInterrupt, marked `reported` once the line saying how to go on was printed.
    """
    data, tracking, output = data or DataConfig(), tracking or TrackingConfig(), output or OutputConfig()
    teacher, space, objectives, trials, workers = step.teacher, step.space, step.objectives, step.trials, step.workers
    storage, sampler, pruner, sampler_seed = step.storage, step.sampler, step.pruner, step.sampler_seed
    heartbeat, retries, study = step.heartbeat, step.retries, step.study
    task, text_column, label_column, quoting = data.task, data.text_column, data.label_column, data.quoting
    experiment, output, data = tracking.experiment, output.output, data.data
    tracking = tracking.tracking
    objs = [o.strip() for o in (objectives.split(",") if isinstance(objectives, str) else objectives) if o.strip()]
    unknown = [o for o in objs if o not in SEARCHED]
    if not objs or unknown or len(set(objs)) != len(objs) or "score" not in objs:
        given = ",".join(map(str, objectives)) if isinstance(objectives, list) else objectives
        raise CompressError(f"--objectives {given}: use score alone or with params and/or latency_ms, each once "
                            "(e.g. score,params)")
    check_study_flags(trials=trials, workers=workers, sampler=sampler, pruner=pruner, heartbeat=heartbeat,
                      retries=retries, storage=storage, task=task, data=data, sampler_seed=sampler_seed)
    flags = step_flags()
    space = load_space(space)
    dims = parse_space(space, flags)
    if sampler == "nsga2" and len(objs) == 1:
        print("--sampler nsga2 with one objective: TPE usually does better there", file=sys.stderr)
    if workers > 1 and "latency_ms" in objs:
        print(f"note: {workers} workers share this machine's cores, so a trial's latency is measured while other "
              "trials train; use --workers 1 when latency is an objective and the numbers matter", file=sys.stderr)
    teacher_for = resolve_teacher(teacher, task, data, text_column, label_column, dims, flags, quoting)
    prepare_stores(storage, tracking)  # after every check, so a refused study leaves no mlruns/ behind
    name = study or f"{slug(teacher)}-{slug(task or data)}"
    out = str(check_output(output if output is not None else f"outputs/search-{name}"))
    ctx = Context(study=name, storage=storage, objectives=objs, space=space, sampler=sampler, pruner=pruner,
                  sampler_seed=sampler_seed, heartbeat=heartbeat, retries=retries, teacher=teacher, teacher_path="",
                  task=task, data=data, text_column=text_column, label_column=label_column, output=out,
                  tracking=tracking, experiment=experiment, experiment_id="", parent_run_id="",
                  progress=workers == 1 and sys.stderr.isatty(), trials=trials, quoting=quoting)
    parent = {"teacher": teacher, "task": task or "", "data": data or "", "objectives": ",".join(objs),
              "storage": shown(storage), "sampler": sampler,
              "pruner": pruner if len(objs) == 1 else "none (multi-objective)", "space": json.dumps(space)}
    return run_study(ctx, _study_config(teacher, task, data, objs, space), dims, teacher_for, workers, parent)


def check_study_flags(*, trials: int, workers: int, sampler: str, pruner: str | None, heartbeat: int, retries: int,
                      storage: str, task: str | None, data: str | None, sampler_seed: int | None) -> None:
    """The flags of a study (search's and auto's), each refused in one line; and Optuna, installed."""
    checks = [
        (trials >= 1, f"--trials {trials}: must be at least 1"),
        (workers >= 1, f"--workers {workers}: must be at least 1"),
        (sampler in SAMPLERS, f"--sampler {sampler}: use {', '.join(SAMPLERS)}"),
        (pruner is None or pruner in PRUNERS, f"--pruner {pruner}: use {', '.join(PRUNERS)}"),
        (heartbeat >= 1, f"--heartbeat {heartbeat}: seconds between heartbeats, at least 1"),
        (retries >= 0, f"--retries {retries}: must be >= 0"),
        ("://" in storage, f"--storage {storage}: an RDB URL such as sqlite:///mlruns/optuna.db or "
                           "postgresql://user:pass@host/db"),
        (task is None or data is None, "--task and --data are exclusive"),
        (task is not None or data is not None, "give --task or --data"),
        (not (workers > 1 and storage.startswith("sqlite:") and ":memory:" in storage),
         "--storage: an in-memory sqlite database cannot be shared by workers"),
    ]
    for ok, message in checks:
        if not ok:
            raise CompressError(message)
    check_all(sampler_seed=sampler_seed)
    try:
        import optuna  # noqa: F401
        import optuna_integration  # noqa: F401
    except ImportError as err:
        raise CompressError(f"compress search needs Optuna: pip install 'optuna>=4.9' optuna-integration "
                            f"({err})") from None


def prepare_stores(storage: str, tracking: str) -> None:
    """The study's and the runs' stores, checked (read-only) and then made: the last thing before a study opens."""
    db = check_storage(storage)
    _prepare_store(resolve_tracking(tracking))  # a bad --tracking fails here once, not in every trial
    if db is not None:  # only now: a study refused for its --tracking left an empty mlruns/ behind
        db.parent.mkdir(parents=True, exist_ok=True)


def run_study(ctx: Context, config: dict, dims: dict, teacher_for, workers: int, parent: dict, *,
              command: str = "search", title: str | None = None, ready=None):
    """Open (or resume) the study, its MLflow parent run and its teacher, run `ctx.trials` trials on `workers`
    workers, and return summarise's Pareto report. compress auto passes its parent run's `title`, and `ready`,
    called with the context once the teacher is there (it scores the teacher for the budget's floor).

    A Ctrl-C closes the study's runs and raises KeyboardInterrupt, marked `reported` once the line saying how to go
    on was printed; every trial of this run failing is one CompressError.
    """
    name, storage, tracking, experiment, trials = ctx.study, ctx.storage, ctx.tracking, ctx.experiment, ctx.trials
    opened = open_study(ctx, config)
    before = len(opened.trials)
    requeued = requeue_interrupted(opened)
    ctx.parent_run_id, ctx.experiment_id = _parent_run(parent, opened, tracking, experiment, name, command, title)
    try:  # from here the parent run exists, and any stop closes it
        print(f"{command} {name}: {trials} trial(s) on {workers} worker(s), objectives {' / '.join(ctx.objectives)}"
              + (f", adding to its {before} earlier trial(s)" if before else "")
              + (f" (interrupted trial(s) {', '.join(map(str, requeued))} run again first)" if requeued else "")
              + f"; study in {shown(storage)}, models under {ctx.output}, MLflow parent run {ctx.parent_run_id}",
              file=sys.stderr)
        started = time.time()
        ctx.teacher_path = teacher_for(ctx.parent_run_id, tracking, experiment, ctx.progress)
        if ready is not None:
            ready(ctx)
        errors = []
        if workers == 1:
            work(ctx, trials)
        else:
            errors = run_workers(ctx, trials, workers)
        result = summarise(ctx, dims)
        if errors:
            raise CompressError(f"{'; '.join(errors)}: see its error above")
    except KeyboardInterrupt as stop:
        said = stop_said(stop)[0]
        close_after(True, lambda: mlflow_client(tracking).set_terminated(ctx.parent_run_id, "KILLED"))
        cut = True  # said unless the study shows none (a stop between trials cuts none short)
        with contextlib.suppress(Exception):  # at best: a stop can leave the store locked
            cut = bool(interrupted_trials(load_study(ctx)))
        print(f"compress: {command} {said}; rerun the same command (--study {name}) to continue the study"
              + (" (a trial it cut short runs again first)" if cut else ""), file=sys.stderr)
        stop.reported = True
        raise
    except BaseException:
        mlflow_client(tracking).set_terminated(ctx.parent_run_id, "FAILED")
        raise
    _raise_if_all_failed(ctx, started)
    return result


def _raise_if_all_failed(ctx: Context, since: float) -> None:
    """Every trial of this run failed: that is a problem to report, not a study to show."""
    import datetime

    from optuna.trial import TrialState

    study = load_study(ctx)
    start = datetime.datetime.fromtimestamp(since)
    mine = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_start >= start]
    failed = [t for t in mine if t.state == TrialState.FAIL]
    if mine and len(failed) == len(mine):
        first = next((t.user_attrs["error"] for t in failed if "error" in t.user_attrs), "see the log above")
        raise CompressError(f"all {len(mine)} trial(s) of this run failed; the first: {first}")
