"""The end of compress auto: every trial judged against the budget, and the smallest feasible one exported and
measured again, its shipped file timed beside the teacher, until one meets the budget as shipped.

A trial's size and latency are its untrained model's (footprint.py: same shape, same artefact); the shipped file is
measured once more here, and int8's score is known only now (export scores it on the dev split), so the winner is
the first of the smallest feasible trials whose export still meets the budget, in the fastest runtime that does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from compress.infra.errors import CompressError
from compress.search.budget import Budget, distance, meets, said, violations
from compress.search.footprint import RUNTIME_FILES, time_artefacts

CANDIDATES = 3  # smallest feasible trials exported in turn before the budget is said unmet


@dataclass
class Judged:
    """One trial against the budget: its state, values and each constraint's relative violation."""

    number: int
    state: str  # complete | pruned before training | pruned at a checkpoint | failed
    values: dict
    violations: dict[str, float]
    recipe: str
    runtime: str
    shape: str
    model: str | None
    params: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and all(v <= 0 for v in self.violations.values())


def judge_trials(study, budget: Budget) -> list[Judged]:
    """Every finished trial, judged against `budget` again (a trial's own constraints were judged with the budget
    of its run; a resumed study's budget is the same, the study's config holds it)."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        a = t.user_attrs
        values = {k: a[k] for k in ("student_score", "student_params", "student_mb", "latency_ms", "latency_p95_ms",
                                    "teacher_latency_ms", "teacher_latency_p95_ms", "retention") if k in a}
        if t.state == TrialState.PRUNED and "student_score" not in values and t.intermediate_values:
            values["student_score"] = t.intermediate_values[max(t.intermediate_values)]  # its last checkpoint
        state = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed"}.get(
            t.state, "pruned before training" if "skipped" in a else "pruned at a checkpoint")
        out.append(Judged(t.number, state, values, violations(budget, values), a.get("recipe", ""),
                          a.get("runtime", ""), a.get("shape", ""), a.get("model"), dict(t.params)))
    return out


def smallest_first(judged: list[Judged]) -> list[Judged]:
    """The feasible trials, smallest shipped file first (then fewest parameters, then best score)."""
    return sorted((j for j in judged if j.feasible), key=lambda j: (
        j.values["student_mb"], j.values["student_params"], -j.values["student_score"]))


@dataclass
class Shipped:
    """A trial's export, measured: each runtime's values, the runtime it ships as (None: none meets the budget)."""

    trial: Judged
    folder: str
    runtimes: dict[str, dict]
    teacher: dict
    runtime: str | None
    export: dict

    @property
    def values(self) -> dict:
        return self.runtimes[self.runtime] if self.runtime else {}

    def closest(self, budget: Budget) -> tuple[str, dict]:
        return min(self.runtimes.items(), key=lambda kv: distance(violations(budget, kv[1])))


def ship(ctx, budget: Budget, trial: Judged, out: Path, max_length: int | None) -> Shipped:
    """Export `trial`'s model (HF, ONNX, int8, with export's parity checks and dev scores) to `out`, time each of the
    budget's runtimes beside the teacher, and pick the fastest that meets the budget."""
    from compress.options.groups import DataConfig, ExportConfig, OutputConfig, TrackingConfig
    from compress.steps.bench import percentile
    from compress.steps.export import export

    print(f"\nexporting trial {trial.number} ({trial.recipe}) -> {out}", file=sys.stderr)
    result = export(ExportConfig(model=trial.model, format="hf,onnx,int8"),
                    DataConfig(task=ctx.task, data=ctx.data, text_column=ctx.text_column,
                               label_column=ctx.label_column, quoting=ctx.quoting, max_length=max_length),
                    TrackingConfig(ctx.tracking, ctx.experiment), OutputConfig(output=str(out), overwrite=True))
    report = result.report
    files = {rt: out / RUNTIME_FILES[rt] if RUNTIME_FILES[rt] else out for rt in budget.runtimes}
    times, mb = time_artefacts(files, ctx.teacher_path, budget.latency_shape, budget.latency_reps)
    scores = report.get("scores") or {}
    # PyTorch's score is the trial's own; ONNX fp32 passed parity with it (export's check), int8 is scored now
    score = {"torch": trial.values["student_score"], "onnx": scores.get("fp32", trial.values["student_score"]),
             "onnx-int8": scores.get("int8")}
    runtimes = {}
    for rt in files:
        runtimes[rt] = {"student_score": score[rt], "student_params": report["params"], "student_mb": mb[rt],
                        "latency_ms": percentile(times[rt], 50), "latency_p95_ms": percentile(times[rt], 95)}
        if budget.teacher_score:
            runtimes[rt]["retention"] = score[rt] / budget.teacher_score
    teacher = {"p50_ms": percentile(times["teacher"], 50), "p95_ms": percentile(times["teacher"], 95)}
    passing = [rt for rt, v in runtimes.items() if meets(budget, v)]
    runtime = min(passing, key=lambda rt: runtimes[rt]["latency_ms"]) if passing else None
    for rt, v in runtimes.items():
        broken = [said(budget, n, v) for n, x in violations(budget, v).items() if x > 0]
        print(f"  {rt:<9} {v['student_mb']:8.2f} MB  p50 {v['latency_ms']:8.2f} ms  p95 {v['latency_p95_ms']:8.2f} ms"
              f"  {budget.metric} {v['student_score']:.4f}  " + ("meets the budget" if not broken else
                                                                   "breaks " + "; ".join(broken)), file=sys.stderr)
    return Shipped(trial, str(out), runtimes, teacher, runtime, report)


def choose_winner(ctx, budget: Budget, judged: list[Judged], out: Path, max_length: int | None
                  ) -> tuple[Shipped | None, list[Shipped]]:
    """The first of the smallest feasible trials whose export meets the budget, and every export tried."""
    tried = []
    for trial in smallest_first(judged)[:CANDIDATES]:
        if not trial.model or not Path(trial.model).is_dir():
            print(f"trial {trial.number}: its model folder {trial.model} is gone; skipped", file=sys.stderr)
            continue
        try:
            shipped = ship(ctx, budget, trial, out, max_length)
        except CompressError as err:  # its export refused (a parity check): the next smallest may pass
            print(f"trial {trial.number}: not shipped: {err}", file=sys.stderr)
            continue
        tried.append(shipped)
        if shipped.runtime is not None:
            return shipped, tried
    return None, tried
