"""One trial: sample its values, run its steps through the commands, log its MLflow run, return its objectives."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.engine.run import RunHooks
from compress.infra.signals import release_frames, stops_raise
from compress.infra.tracking import mlflow_client
from compress.options.commands import to_groups
from compress.search.space import (OBJECTIVES, Dimension, describe, plan, step_epochs, step_functions,
                                   with_logit_cache)


# --- one trial --------------------------------------------------------------------------------------------------

@dataclass
class Context:
    """Everything a worker process needs to run trials (pickled into spawned workers)."""

    study: str
    storage: str
    objectives: list[str]
    space: dict
    sampler: str
    pruner: str
    sampler_seed: int | None
    heartbeat: int
    retries: int
    teacher: str
    teacher_path: str
    task: str | None
    data: str | None
    text_column: str | None
    label_column: str
    output: str
    tracking: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    progress: bool = False
    quoting: str = "auto"
    trials: int = 10  # this run's trials: sizes the samplers' random start
    budget: Any = None  # compress auto's budget.Budget: a trial is judged against it, and cut before training
    deadline: float | None = None  # time.time() after which no worker starts another trial (--time_budget)


class _OffsetTrial:
    """A trial whose report() steps continue across a trial's steps: distill's epochs 0-1, then prune's 2-3.

    PyTorchLightningPruningCallback reports the fit's own epoch; each step is a new fit starting at epoch 0.
    """

    def __init__(self, trial, offset: int) -> None:
        self._trial, self._offset = trial, offset

    def report(self, value: float, step: int) -> None:
        self._trial.report(value, step + self._offset)

    def __getattr__(self, name: str):
        return getattr(self._trial, name)


def close_runs(tracking: str, run_id: str | None, status: str) -> None:
    """End a trial's MLflow run and any step run under it still marked running (its process died or was pruned)."""
    if not run_id:
        return
    client = mlflow_client(tracking)
    try:
        run = client.get_run(run_id)
    except Exception:  # the run is gone or the store moved: nothing to close
        return
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    for child in children:
        if child.info.status == "RUNNING" or (status == "KILLED" and child.info.status == "FAILED"):
            client.set_terminated(child.info.run_id, status)
    client.set_terminated(run_id, status)


def trial_metrics(first: dict, last: dict) -> dict[str, float]:
    """The final student's metrics against the original teacher (the first step's teacher).

    A later step's own teacher_* values describe the step's input (the distilled student), so they are replaced.
    """
    out = {k: v for k, v in last.items()
           if not k.startswith("teacher_") and k not in ("retention", "compression", "speedup")}
    for key in ("teacher_score", "teacher_params", "teacher_latency_ms"):
        if key in first:
            out[key] = first[key]
    if out.get("teacher_score"):
        out["retention"] = out["student_score"] / out["teacher_score"]
    if out.get("teacher_params"):
        out["compression"] = out["teacher_params"] / out["student_params"]
    if out.get("teacher_latency_ms") and out.get("latency_ms"):
        out["speedup"] = out["teacher_latency_ms"] / out["latency_ms"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def retried_from(trial) -> int | None:
    """The number of the dead worker's trial this one retries (Optuna 5's Trial has no system_attrs; FrozenTrial
    has)."""
    from optuna.trial import TrialState

    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    frozen = [t for t in running if t.number == trial.number]
    return frozen[0].system_attrs.get("failed_trial") if frozen else None


def objective(trial, ctx: Context, dims: dict[str, Dimension], flags: dict[str, dict[str, Any]]):
    """One trial (run_trial); a stop anywhere in it marks it interrupted, so the next run of the study re-runs its
    values first. Marked only where the steps run, a stop while the trial sampled or opened its MLflow run left it
    an ordinary failure, never re-run."""
    try:
        with stops_raise():  # and one held back since the last trial, as this one starts
            return run_trial(trial, ctx, dims, flags)
    except KeyboardInterrupt:  # Optuna fails the trial and re-raises; requeue_interrupted finds the mark
        with contextlib.suppress(Exception):
            trial.set_user_attr("interrupted", True)
        raise


def run_trial(trial, ctx: Context, dims: dict[str, Dimension], flags: dict[str, dict[str, Any]]):
    """Sample, run the steps through the API (each step's flags made into its config groups, as the command makes
    them), log the trial's run; return the objectives' values."""
    from dataclasses import replace

    import optuna
    from mlflow.entities import Metric, Param

    values = {key: dim.sample(trial) for key, dim in dims.items()}
    steps = plan(values, flags)
    recipe = " -> ".join(describe(s, kw, flags) for s, kw in steps) or "nothing"
    trial.set_user_attr("recipe", recipe)
    trial.set_user_attr("worker", os.getpid())
    names = [s for s, _ in steps]
    if not steps:
        reason = "its values run no step"
        trial.set_user_attr("skipped", reason)
        print(f"trial {trial.number}: {recipe}: skipped, {reason}", file=sys.stderr)
        raise optuna.TrialPruned(reason)
    trial.set_user_attr("mlflow_run_id", "")  # a retried trial inherits its dead original's attributes
    retry_of, rerun_of = retried_from(trial), trial.user_attrs.get("rerun_of")
    title = f"trial {trial.number}" + (f" (retry of {retry_of})" if retry_of is not None else
                                       f" (rerun of interrupted trial {rerun_of})" if rerun_of is not None else "")
    print(f"{title}: {recipe}", file=sys.stderr)
    shipped = _within_caps(trial, ctx, steps, flags) if ctx.budget is not None else None

    client = mlflow_client(ctx.tracking)
    run = client.create_run(ctx.experiment_id, run_name=f"{title}: {recipe}", tags={
        "mlflow.parentRunId": ctx.parent_run_id, "compress.command": "search-trial", "optuna.study": ctx.study,
        "optuna.trial": str(trial.number), "compress.steps": ",".join(names)})
    run_id = run.info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    params = {k: "" if v is None else v for k, v in values.items()} | {"recipe": recipe, "steps": ",".join(names)}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    single = len(ctx.objectives) == 1
    folder = Path(ctx.output) / f"trial-{trial.number:03d}"
    model, first, last, offset, status, stopped = ctx.teacher_path, None, None, 0, "FAILED", False
    functions = step_functions()
    try:
        for step, kwargs in steps:
            # the folder name shows in the next step's run name: "prune trial3-distill h0.5-f0.3 taylor/layer"
            out = folder / f"trial{trial.number}-{step}"
            callbacks = []
            if single:  # per-epoch val_score reaches the pruner; multi-objective studies cannot prune
                from optuna_integration import PyTorchLightningPruningCallback

                callbacks.append(PyTorchLightningPruningCallback(_OffsetTrial(trial, offset), monitor="val_score"))
            source = {"teacher": model} if step == "distill" else {"model": model}
            if model == ctx.teacher_path:  # a later step learns from this trial's own model: nothing to share
                kwargs = with_logit_cache(step, kwargs, values, flags)
            tags = {"mlflow.parentRunId": run_id, "optuna.study": ctx.study, "optuna.trial": str(trial.number)}
            groups = to_groups(step, {**source, "task": ctx.task, "data": ctx.data, "text_column": ctx.text_column,
                                      "label_column": ctx.label_column, "quoting": ctx.quoting, "output": str(out),
                                      "tracking": ctx.tracking, "experiment": ctx.experiment, "overwrite": True,
                                      **kwargs})
            groups["runtime"] = replace(groups["runtime"], progress=ctx.progress)
            result = functions[step](**groups, hooks=RunHooks(callbacks=callbacks, tags=tags))
            first, last = first or result.metrics, result.metrics
            trial.set_user_attr("metric", result.lineage.get("metric", "score"))
            model, offset = str(out), offset + step_epochs(step, kwargs, flags)
        metrics = trial_metrics(first, last)
        if shipped is not None:  # the artefact it ships as: its size and latency, not the step's PyTorch timing
            metrics |= {k: v for k, v in shipped.items() if k != "student_params"}  # that one the steps counted
            if metrics.get("latency_ms"):
                metrics["speedup"] = metrics["teacher_latency_ms"] / metrics["latency_ms"]
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        client.log_param(run_id, "model", model)
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("model", model)
        if ctx.budget is not None:
            from compress.search.budget import set_constraints

            set_constraints(trial, ctx.budget, metrics)
        status = "FINISHED"
        return tuple(metrics[OBJECTIVES[o][0]] for o in ctx.objectives)
    except optuna.TrialPruned:
        status = "KILLED"
        client.set_tag(run_id, "compress.pruned", "true")
        if ctx.budget is not None and shipped is not None:  # stopped below the accuracy floor at a checkpoint
            from compress.search.budget import set_constraints

            scores = trial.storage.get_trial(trial._trial_id).intermediate_values
            set_constraints(trial, ctx.budget, shipped | {"student_score": scores[max(scores)]} if scores else shipped)
        raise
    except KeyboardInterrupt:
        status, stopped = "KILLED", True
        raise
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
        client.set_tag(run_id, "compress.error", f"{type(err).__name__}: {err}"[:5000])
        raise
    finally:
        close_after(stopped, lambda: close_runs(ctx.tracking, run_id, status))


def _within_caps(trial, ctx: Context, steps: list, flags: dict) -> dict[str, float]:
    """compress auto: the trial's model is built untrained, exported and timed (footprint.measure); a trial whose
    every runtime breaks a size or latency cap is pruned here, before any training. Returns the numbers of the
    runtime it ships as, which replace the steps' own size and timing in its metrics."""
    import json

    import optuna

    from compress.search.budget import said, set_constraints, violations
    from compress.search.footprint import measure

    try:
        found = measure(ctx, steps, flags)
    except Exception as err:  # as a step's own error would be: the trial fails, and says why
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
        raise
    runtime, fits = found.choose(ctx.budget)
    values = found.values(runtime)
    trial.set_user_attr("runtime", runtime)
    trial.set_user_attr("shape", found.shape)
    trial.set_user_attr("shape_params", found.params)  # the untrained model's count: the trained one's, as tested
    trial.set_user_attr("runtimes", json.dumps(found.runtimes))
    for key, value in values.items():
        trial.set_user_attr(key, value)
    for note in found.notes:
        print(f"  note: {note}", file=sys.stderr)
    speed = (f"p50 {values['latency_ms']:.2f} ms (p95 {values['latency_p95_ms']:.2f}) against the teacher's "
             f"{values['teacher_latency_ms']:.2f}")
    if not fits:
        set_constraints(trial, ctx.budget, values)
        broken = [said(ctx.budget, name, values) for name, v in violations(ctx.budget, values).items() if v > 0]
        reason = f"over a cap before training ({'; '.join(broken)})"
        trial.set_user_attr("skipped", reason)
        print(f"  {found.shape}; closest {runtime} {values['student_mb']:.2f} MB, {speed}: pruned {reason}",
              file=sys.stderr)
        raise optuna.TrialPruned(reason)
    print(f"  ships as {runtime}: {found.shape}, {values['student_params']:,} params, {values['student_mb']:.2f} MB, "
          f"{speed}", file=sys.stderr)
    return values


def close_after(stopped: bool, close) -> None:
    """Close MLflow runs; after a Ctrl-C, at best. A Ctrl-C that cut an MLflow write leaves SQLite locked, and the
    error from closing would replace the KeyboardInterrupt: Optuna would take it for a failed trial and go on to
    the next, so the study ran on after the user stopped it. The runs stay RUNNING in MLflow instead."""
    if stopped:
        release_frames(sys.exc_info()[1])  # a Ctrl-C inside an MLflow query left SQLite locked until its frames go
    try:
        close()
    except Exception as err:
        if not stopped:
            raise
        print(f"note: MLflow runs left open ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
              file=sys.stderr)
