"""compress auto: the smallest model that meets a budget, in one command.

compress search's study (its space, trials, workers, resume and MLflow parent run, run.run_study) with the budget as
Optuna constraints and one objective, the shipped file's MB:
  every check (flags, budget, space, teacher, data, --max_length and --latency_shape against its positions)
  -> the teacher (fine-tuned once if it has no classifier) scored on dev: the accuracy floor
  -> each trial: its model built untrained, exported and timed on each runtime (footprint.py); over a cap it is
     pruned, no training; else the chain through the API, stopped at a checkpoint below the floor (budget.py)
  -> the smallest feasible trial exported (HF, ONNX, int8) and measured again (verdict.py)
  -> report.md (auto_report.py) beside the trials, the model card in the export, the parent run.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.paths import check_output
from compress.infra.tracking import mlflow_client, shown
from compress.options.groups import AutoConfig, DataConfig, OutputConfig, TrackingConfig
from compress.search.budget import (CONSTRAINTS, Budget, binding, distance, make_budget, parse_duration, said,
                                    violations)
from compress.search.report import SearchResult
from compress.search.space import load_space, parse_space, step_flags
from compress.search.study import _study_config, load_study, resolve_teacher
from compress.search.trial import Context


@dataclass
class AutoResult:
    """What compress auto found: whether the budget is met, the winner as shipped, and where everything went."""

    study: str
    met: bool
    verdict: str
    """one line: the winner and its measured values, or the constraint that bound and the closest trial."""
    winner: dict | None
    """trial, runtime, recipe, folder (the export) and the measured values (student_score, student_mb, ...)."""
    report: str
    parent_run_id: str
    tally: dict[str, int]
    """the study's trials: finished, complete, infeasible (complete, a constraint broken), pruned_before_training
    (over a cap), pruned_at_checkpoint (below the floor), failed."""
    search: SearchResult


def auto(step: AutoConfig, data: DataConfig | None = None, tracking: TrackingConfig | None = None,
         output: OutputConfig | None = None) -> AutoResult:
    """Find the smallest model from `step.teacher` that meets the budget, export it and write report.md.

    Running it again with the same study and storage adds trials to the study. The result's `met` is False when no
    trial meets the budget (the report is written either way; the command then exits 1 with `verdict`).
    """
    started = time.time()
    data, tracking, output = data or DataConfig(), tracking or TrackingConfig(), output or OutputConfig()
    from compress.models.loading import ENCODER_TYPES, load_config, max_tokens, resolve_model
    from compress.options.bounds import check_all
    from compress.search.run import check_study_flags, prepare_stores, run_study

    # --- every check, before the study opens: the budget first, it is what the user came to state
    budget = make_budget(max_latency_ms=step.max_latency_ms, latency_shape=step.latency_shape,
                         min_retention=step.min_retention, min_score=step.min_score, max_params=step.max_params,
                         max_mb=step.max_mb, runtime=step.runtime, latency_reps=step.latency_reps)
    seconds = parse_duration(step.time_budget)
    check_all(max_length=data.max_length, max_train=data.max_train)
    check_study_flags(trials=step.trials, workers=step.workers, sampler=step.sampler, pruner=None,
                      heartbeat=step.heartbeat, retries=step.retries, storage=step.storage, task=data.task,
                      data=data.data, sampler_seed=step.sampler_seed)
    if step.unlabeled is not None and not Path(step.unlabeled).is_file():
        raise CompressError(f"--unlabeled {step.unlabeled}: no such file")
    if "onnx" in step.runtime or step.runtime == "auto":
        from compress.exporting.onnx import require_onnx

        require_onnx(f"--runtime {step.runtime}")
    teacher_config = load_config(resolve_model(step.teacher, "--teacher"), "--teacher")
    if teacher_config.model_type not in ENCODER_TYPES:  # size and latency are judged on the teacher's own layers
        raise CompressError(f"--teacher {step.teacher}: compress auto cuts its students from the teacher's layers, "
                            f"which a {teacher_config.model_type} is not made of; distil a BERT-family student from "
                            "it first (compress distill --student minilm-l6) and give that as --teacher")
    positions = max_tokens(teacher_config)
    if positions and budget.latency_shape[1] > positions:
        raise CompressError(f"--latency_shape {step.latency_shape}: the teacher takes at most {positions} tokens")
    flags = step_flags()
    space = auto_space(teacher_config, load_space(step.space) if step.space is not None else {}, step.unlabeled,
                       data.max_length, data.max_train)
    dims = parse_space(space, flags)
    if step.workers > 1 and budget.max_latency_ms is not None:
        print(f"note: {step.workers} workers share this machine's cores, so a trial's latency is measured while "
              "other trials train; use --workers 1 when the latency cap is tight", file=sys.stderr)
    # the teacher and the data (and the space's depths, --max_length and sharing against the teacher)
    teacher_for = resolve_teacher(step.teacher, data.task, data.data, data.text_column, data.label_column, dims,
                                  flags, data.quoting)
    prepare_stores(step.storage, tracking.tracking)
    name = step.study or f"auto-{slug(step.teacher)}-{slug(data.task or data.data)}"
    out = check_output(output.output if output.output is not None else
                       f"outputs/{name if name.startswith('auto-') else 'auto-' + name}")

    sampler = "tpe" if step.sampler == "auto" else step.sampler
    budget_fields = {k: v for k, v in asdict(budget).items() if k not in ("teacher_score", "metric", "caps")}
    ctx = Context(study=name, storage=step.storage, objectives=["mb"], space=space, sampler=sampler, pruner="floor",
                  sampler_seed=step.sampler_seed, heartbeat=step.heartbeat, retries=step.retries,
                  teacher=step.teacher, teacher_path="", task=data.task, data=data.data,
                  text_column=data.text_column, label_column=data.label_column, output=str(out),
                  tracking=tracking.tracking, experiment=tracking.experiment, experiment_id="", parent_run_id="",
                  progress=step.workers == 1 and sys.stderr.isatty(), trials=step.trials, quoting=data.quoting,
                  budget=budget, deadline=started + seconds if seconds is not None else None)
    config = _study_config(step.teacher, data.task, data.data, ["mb"], space) | {"budget": budget_fields}
    parent = {"teacher": step.teacher, "task": data.task or "", "data": data.data or "", "objectives": "mb",
              "storage": shown(step.storage), "sampler": sampler, "pruner": "accuracy floor",
              "space": json.dumps(space), "budget": budget.text(), "time_budget": step.time_budget or ""}

    def ready(ctx: Context) -> None:
        ctx.budget = _score_teacher(ctx, data)

    result = run_study(ctx, config, dims, teacher_for, step.workers, parent, command="auto",
                       title=f"auto {name}: {budget.text()}", ready=ready)
    return _finish(ctx, result, data.max_length, started, step.time_budget)


def auto_space(config, given: dict, unlabeled: str | None, max_length: int | None, max_train: int | None) -> dict:
    """The default space for `config`'s teacher with `given` (compress search's format) over it, and the flags every
    trial takes fixed. The runtime is no key: each trial measures them all and ships as the fastest that fits."""
    from compress.models.compress_bert.convert import HEAD_ACT

    if not isinstance(given, dict):
        raise CompressError("--space: give a mapping of flags to values, lists (choices) or {low, high} ranges")
    if "runtime" in given:
        raise CompressError("space: runtime is compress auto's own flag (--runtime); leave it out of the space")
    if "student" in given:
        raise CompressError("space: student: compress auto cuts its students from the teacher's own layers; leave "
                            "student out (compress search takes one)")
    depth = config.num_hidden_layers
    space: dict[str, Any] = {
        # distilled depth: a sixth to two thirds of the teacher's layers
        "layers": sorted({max(1, round(depth * f)) for f in (1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3)}),
        "temperature": {"low": 1.0, "high": 8.0, "log": True},
        "alpha_ce": [0.0, 0.5, 1.0],
        "alpha_hidden": [0.0, 1.0],
        # the width cuts: heads, neurons, the residual stream, the vocabulary the task's text never uses
        "heads": [0.0, 0.25, 0.5],
        "ffn": [0.0, 0.25, 0.5, 0.75],
        "hidden": [0.0, 0.25, 0.5],
        "vocab": [False, True],
        "vocab_min_count": [1, 5],
        # one shared layer group or none; ALBERT's tanh head cannot hold an ELECTRA's or DistilBERT's
        "groups": [None, 1],
        "share": "attention" if config.model_type in HEAD_ACT else "all",
        # the steps' own PyTorch timing at 32x128: one round, a trial's latency is its shipped file's
        "latency_reps": 1,
    }
    if unlabeled is not None:
        space["unlabeled"] = [None, unlabeled]
    space |= given
    vocab = space["vocab"] if isinstance(space["vocab"], list) else [space["vocab"]]
    if not any(vocab) and "vocab_min_count" not in given:  # the vocabulary cut turned off: its choice goes too
        del space["vocab_min_count"]
    fixed = {"max_length": max_length, "max_train": max_train}
    for key, value in fixed.items():
        if value is not None:
            if key in given and given[key] != value:
                raise CompressError(f"--{key} {value}: the space sets {key} too; give it once")
            space[key] = value
    return space


def _score_teacher(ctx: Context, data: DataConfig) -> Budget:
    """The teacher's dev score (compress evaluate), which --min_retention's floor is a fraction of."""
    from compress.options.groups import EvaluateConfig, RuntimeConfig
    from compress.steps.evaluate import evaluate

    with contextlib.redirect_stderr(io.StringIO()):  # its table; the line below says what matters here
        result = evaluate(EvaluateConfig(model=ctx.teacher_path, latency_batch=1, latency_seq=8),
                          DataConfig(task=data.task, data=data.data, text_column=data.text_column,
                                     label_column=data.label_column, quoting=data.quoting,
                                     max_length=data.max_length), RuntimeConfig(latency_reps=1))
    budget = ctx.budget.with_teacher(result.metrics["score"], result.report["metric"])
    print(f"teacher: {budget.metric} {budget.teacher_score:.4f} on dev; accuracy floor {budget.floor:.4f}; budget "
          f"{budget.text()}", file=sys.stderr)
    return budget


def _finish(ctx: Context, result: SearchResult, max_length: int | None, started: float,
            time_budget: str | None) -> AutoResult:
    """The winner exported and measured, report.md written and logged on the parent run, the verdict in one line."""
    from compress.search.auto_report import Outcome, write_report
    from compress.search.verdict import choose_winner, judge_trials

    budget: Budget = ctx.budget
    out = Path(ctx.output)
    judged = judge_trials(load_study(ctx), budget)
    winner, tried = choose_winner(ctx, budget, judged, out / "model", max_length)
    if winner is not None:
        v = winner.values
        verdict = (f"trial {winner.trial.number} meets the budget as {winner.runtime}: {budget.metric} "
                   f"{v['student_score']:.4f}, {v['student_params']:,} params, {v['student_mb']:.2f} MB, p50 "
                   f"{v['latency_ms']:.2f} ms (p95 {v['latency_p95_ms']:.2f}) against the teacher's "
                   f"{winner.teacher['p50_ms']:.2f} ms; exported to {winner.folder}")
    else:
        verdict = _unmet(budget, judged, tried, time_budget)
    report = out / "report.md"
    write_report(report, Outcome(ctx.study, ctx.teacher_path, budget, judged, winner, tried, verdict, result,
                                 time.time() - started, time_budget))
    _log_outcome(ctx, winner, report, len(judged))
    # unmet, the verdict is the command's one error line (cli.commands), or the API caller's result.verdict
    print(f"\n{verdict}\nreport: {report}" if winner else f"\nreport: {report}", file=sys.stderr)
    summary = None
    if winner is not None:
        summary = {"trial": winner.trial.number, "runtime": winner.runtime, "recipe": winner.trial.recipe,
                   "folder": winner.folder, "shape": winner.trial.shape, **winner.values,
                   "teacher_p50_ms": winner.teacher["p50_ms"], "teacher_p95_ms": winner.teacher["p95_ms"]}
    tally = {"finished": len(judged), "complete": sum(j.state == "complete" for j in judged),
             "infeasible": sum(j.state == "complete" and not j.feasible for j in judged),
             "pruned_before_training": sum(j.state == "pruned before training" for j in judged),
             "pruned_at_checkpoint": sum(j.state == "pruned at a checkpoint" for j in judged),
             "failed": sum(j.state == "failed" for j in judged)}
    return AutoResult(ctx.study, winner is not None, verdict, summary, str(report), ctx.parent_run_id, tally, result)


def _unmet(budget: Budget, judged: list, tried: list, time_budget: str | None = None) -> str:
    """One line: the constraint that bound, and the closest trial with what it broke."""
    if tried:  # feasible in its trial, but not as shipped (an int8 score, a slower measurement)
        shipped = min(tried, key=lambda s: distance(violations(budget, s.closest(budget)[1])))
        rt, values = shipped.closest(budget)
        found = violations(budget, values)
        name = max(found, key=found.get)
        broken = "; ".join(said(budget, n, values) for n, v in found.items() if v > 0)
        return (f"{name} bound as shipped ({_flag(name, budget)}): the closest is trial {shipped.trial.number} "
                f"({shipped.trial.recipe}), feasible in its trial, exported and measured again as {rt}: {broken}")
    rows = [{"violations": j.violations, "row": j} for j in judged if j.violations and j.state != "failed"]
    name, closest = binding(budget, rows)
    if closest is None:
        if not judged and time_budget:
            return f"no trial finished within --time_budget {time_budget}"
        return "no trial finished; see the errors above"
    j = closest["row"]
    broke = sum(1 for r in rows if r["violations"].get(name, 0) > 0)
    broken = "; ".join(said(budget, n, j.values) for n, v in j.violations.items() if v > 0)
    return (f"{name} bound ({broke} of {len(rows)} trials broke it: {_flag(name, budget)}); the closest is trial "
            f"{j.number} ({j.recipe}, {j.state}): {broken}")


def _flag(name: str, budget: Budget) -> str:
    if name == "score":
        return (f"--min_retention {budget.min_retention:g}" if budget.min_retention is not None else "") + (
            f"{' and ' if budget.min_retention is not None else ''}--min_score {budget.min_score:g}"
            if budget.min_score is not None else "")
    return f"{CONSTRAINTS[name][1]} {budget.caps[name]:g}"


def _log_outcome(ctx: Context, winner, report: Path, trials: int) -> None:
    """On the study's parent run: report.md, whether the budget is met, and the winner's measured values."""
    from mlflow.entities import Metric

    client = mlflow_client(ctx.tracking)
    client.log_artifact(ctx.parent_run_id, str(report))
    client.set_tag(ctx.parent_run_id, "compress.budget_met", str(winner is not None).lower())
    if winner is None:
        return
    now = int(time.time() * 1000)
    metrics = {f"winner_{k}": float(v) for k, v in winner.values.items()}
    metrics |= {"teacher_p50_ms": winner.teacher["p50_ms"], "teacher_p95_ms": winner.teacher["p95_ms"],
                "winner_trial": float(winner.trial.number), "trials_judged": float(trials)}
    client.log_batch(ctx.parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(ctx.parent_run_id, "compress.winner", f"trial {winner.trial.number}: {winner.trial.recipe} "
                                                          f"({winner.runtime}) -> {winner.folder}")
