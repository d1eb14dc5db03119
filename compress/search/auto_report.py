"""report.md of compress auto: the budget, the winner as shipped and measured, its recipe, the runner-up closest to
the budget, the Pareto front (table and plot) and every trial against the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from compress.search.budget import CONSTRAINTS, Budget, said, violations
from compress.search.report import SearchResult, front_table
from compress.search.verdict import Judged, Shipped, smallest_first


def _num(value, digits: int = 2) -> str:
    """A count with thousands separators (Optuna keeps them as floats), other numbers to `digits` places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000) or abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _broken(budget: Budget, row: Judged) -> str:
    return "; ".join(said(budget, n, row.values) for n, v in row.violations.items() if v > 0) or "meets it"


@dataclass
class Outcome:
    """What a compress auto run found, as its report shows it."""

    study: str
    teacher: str
    budget: Budget
    judged: list[Judged]
    winner: Shipped | None
    tried: list[Shipped]
    verdict: str
    search: SearchResult
    wall_s: float
    time_budget: str | None


def write_report(path: Path, outcome: Outcome) -> None:
    """Write report.md to `path`."""
    budget, judged, winner, tried, verdict = (outcome.budget, outcome.judged, outcome.winner, outcome.tried,
                                              outcome.verdict)
    study, teacher, time_budget, wall_s = outcome.study, outcome.teacher, outcome.time_budget, outcome.wall_s
    front, teacher_row = outcome.search.front, outcome.search.teacher
    plot, counts = outcome.search.artifacts.get("plot"), outcome.search.counts
    metric = budget.metric
    lines = [f"# compress auto: {study}", "",
             f"**Budget**: {budget.text()}; latency at {budget.latency_shape[0]}x{budget.latency_shape[1]} on this "
             f"machine, {budget.latency_reps} timed rounds interleaved with the teacher.", "",
             f"**Teacher**: `{teacher}`, {metric} {_num(budget.teacher_score, 4)} on dev"
             + (f"; accuracy floor {_num(budget.floor, 4)}" if budget.floor is not None else "") + ".", "",
             f"**Outcome**: {verdict}", "",
             f"**Trials**: {len(judged)} finished ({sum(j.state == 'complete' for j in judged)} complete, "
             f"{sum(j.state == 'complete' and not j.feasible for j in judged)} of them infeasible; "
             f"{sum(j.state == 'pruned before training' for j in judged)} pruned before training, "
             f"{sum(j.state == 'pruned at a checkpoint' for j in judged)} pruned at a checkpoint, "
             f"{sum(j.state == 'failed' for j in judged)} failed); wall time of this run {wall_s / 60:.1f} min"
             + (f" (--time_budget {time_budget})" if time_budget else "") + ".", ""]
    if winner is not None:
        v, t = winner.values, winner.teacher
        lines += [f"## Winner: trial {winner.trial.number}, shipped as {winner.runtime}", "",
                  f"Exported to `{winner.folder}` (HF safetensors, ONNX, int8 ONNX; its model card is "
                  f"`{winner.folder}/README.md`). Measured once more on the shipped file, in one run:", "",
                  "| | winner | teacher (PyTorch fp32) | budget |", "|---|---|---|---|",
                  f"| {metric} | {_num(v['student_score'], 4)} | {_num(budget.teacher_score, 4)} | "
                  + (f">= {_num(budget.floor, 4)} |" if budget.floor is not None else "- |"),
                  f"| retention | {_num(v.get('retention'), 4)} | 1.0000 | "
                  + (f">= {budget.min_retention:g} |" if budget.min_retention is not None else "- |"),
                  f"| params | {_num(v['student_params'])} | {_num((teacher_row or {}).get('params'))} | "
                  + (f"<= {budget.max_params:,} |" if budget.max_params is not None else "- |"),
                  f"| MB ({winner.runtime}) | {_num(v['student_mb'])} | - | "
                  + (f"<= {budget.max_mb:g} |" if budget.max_mb is not None else "- |"),
                  f"| p50 ms | {_num(v['latency_ms'])} | {_num(t['p50_ms'])} | "
                  + (f"<= {budget.max_latency_ms:g} |" if budget.max_latency_ms is not None else "- |"),
                  f"| p95 ms | {_num(v['latency_p95_ms'])} | {_num(t['p95_ms'])} | - |", "",
                  "Every runtime of the export, measured in the same rounds:", "",
                  f"| runtime | MB | p50 ms | p95 ms | {metric} | against the budget |", "|---|---|---|---|---|---|"]
        for rt, rv in winner.runtimes.items():
            row = Judged(winner.trial.number, "complete", rv, violations(budget, rv), "", rt, "", None)
            lines.append(f"| {rt} | {_num(rv['student_mb'])} | {_num(rv['latency_ms'])} | "
                         f"{_num(rv['latency_p95_ms'])} | {_num(rv['student_score'], 4)} | {_broken(budget, row)} |")
        lines += ["", "### Recipe", "", f"`{winner.trial.recipe}`", "", f"Shape: {winner.trial.shape}.", "",
                  "| value | drawn |", "|---|---|"]
        drawn = sorted(winner.trial.params.items())
        lines += [f"| {k} | {f'{p:.4g}' if isinstance(p, float) else p} |" for k, p in drawn]
        lines.append("")
    for shipped in tried:
        if shipped is not winner:
            rt, rv = shipped.closest(budget)
            row = Judged(shipped.trial.number, "complete", rv, violations(budget, rv), "", rt, "", None)
            lines += [f"Trial {shipped.trial.number} was exported first and missed as shipped: closest runtime {rt}: "
                      f"{_broken(budget, row)}.", ""]
    lines += ["## Runner-up", ""]
    feasible = [j for j in smallest_first(judged) if winner is None or j.number != winner.trial.number]
    misses = sorted((j for j in judged if j.violations and not j.feasible and j.state != "failed"),
                    key=lambda j: sum(max(0.0, v) for v in j.violations.values()))
    if feasible:
        j = feasible[0]
        lines.append(f"- Next smallest feasible: trial {j.number} (`{j.recipe}`, {j.runtime}): {_row_text(j, metric)}.")
    if misses:
        j = misses[0]
        lines.append(f"- Closest to the budget without meeting it: trial {j.number} (`{j.recipe}`, {j.state}, "
                     f"{j.runtime}): {_row_text(j, metric)}; {_broken(budget, j)}.")
    if not feasible and not misses:
        lines.append("- none")
    lines += ["", f"## Pareto front ({metric} against size, complete trials)", "", front_table(front, teacher_row), ""]
    if plot:
        lines += [f"![Pareto front]({Path(plot).name})", ""]
    lines += ["## Every trial", "", f"| trial | state | recipe | runtime | {metric} | params | MB | p50 ms | "
              "against the budget |", "|---|---|---|---|---|---|---|---|---|"]
    for j in sorted(judged, key=lambda j: j.number):
        v = j.values
        lines.append(f"| {j.number} | {j.state} | {j.recipe} | {j.runtime or '-'} | "
                     f"{_num(v.get('student_score'), 4)} | {_num(v.get('student_params'))} | "
                     f"{_num(v.get('student_mb'))} | {_num(v.get('latency_ms'))} | "
                     f"{_broken(budget, j) if j.state != 'failed' else 'failed'} |")
    lines += ["", "Constraints: " + ", ".join(f"{name} ({CONSTRAINTS[name][1]})" for name in
                                               [*budget.caps, "score"]) + "; counts of this study: "
              + ", ".join(f"{k} {v}" for k, v in counts.items() if v), ""]
    path.write_text("\n".join(lines))


def _row_text(j: Judged, metric: str) -> str:
    v = j.values
    return (f"{metric} {_num(v.get('student_score'), 4)}, {_num(v.get('student_params'))} params, "
            f"{_num(v.get('student_mb'))} MB, p50 {_num(v.get('latency_ms'))} ms")
