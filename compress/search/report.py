"""The Pareto report: the front of a study's trials as a table, CSV files and a plot, logged on its parent run."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compress.infra.tracking import mlflow_client, shown, where_to_look
from compress.search.space import OBJECTIVES, Dimension
from compress.search.study import load_study
from compress.search.trial import Context


# --- the end of a study: the Pareto front -----------------------------------------------------------------------

def pareto(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows no other row beats on every key at once (score up, the rest down), sorted by score."""
    sign = {k: -1.0 if OBJECTIVES[k][1] == "maximize" else 1.0 for k in keys}

    def dominates(a, b):
        return (all(sign[k] * a[k] <= sign[k] * b[k] for k in keys)
                and any(sign[k] * a[k] < sign[k] * b[k] for k in keys))

    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: -r["score"])


def trial_rows(study, dims: dict[str, Dimension]) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "student_score" not in a:
            continue
        row = {"trial": t.number, "score": a["student_score"], "params": a["student_params"],
               "latency_ms": a.get("latency_ms", math.nan), "mb": a.get("student_mb", math.nan),
               "retention": a.get("retention", math.nan), "compression": a.get("compression", math.nan),
               "speedup": a.get("speedup", math.nan), "recipe": a.get("recipe", ""), "model": a.get("model", ""),
               "mlflow_run_id": a.get("mlflow_run_id", ""), "metric": a.get("metric", "score"),
               "teacher_score": a.get("teacher_score"), "teacher_params": a.get("teacher_params"),
               "teacher_latency_ms": a.get("teacher_latency_ms")}
        row |= {k: t.params.get(k, d.value) for k, d in dims.items()}
        rows.append(row)
    return rows


def teacher_point(rows: list[dict]) -> dict | None:
    """The teacher's score and size (the same in every trial) and its latency (the median over the trials)."""
    with_teacher = [r for r in rows if r["teacher_score"] is not None]
    if not with_teacher:
        return None
    lat = sorted(r["teacher_latency_ms"] for r in with_teacher if r["teacher_latency_ms"] is not None)
    return {"score": with_teacher[0]["teacher_score"], "params": with_teacher[0]["teacher_params"],
            "latency_ms": lat[len(lat) // 2] if lat else math.nan}


def front_table(front: list[dict], teacher: dict | None) -> str:
    metric = front[0]["metric"] if front else "score"
    lines = [f"| trial | {metric} | params | latency ms | MB | retention | recipe |", "|---|---|---|---|---|---|---|"]
    if teacher:
        lines.append(f"| teacher | {teacher['score']:.4f} | {teacher['params']:,.0f} | {teacher['latency_ms']:.1f} "
                     "| - | 1.000 | - |")
    for r in front:
        lines.append(f"| {r['trial']} | {r['score']:.4f} | {r['params']:,.0f} | {r['latency_ms']:.1f} | "
                     f"{r['mb']:.1f} | {r['retention']:.3f} | {r['recipe']} |")
    return "\n".join(lines)


def plot_front(path: Path, rows: list[dict], front: list[dict], teacher: dict | None, title: str,
               latency_label: str = "latency ms (batch 32 x 128)") -> None:
    """Two panels, score against params and score against latency: every trial, the front, the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"] if rows else "score"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("params", "parameters"), ("latency_ms", latency_label))):
        ax.scatter([r[key] for r in rows], [r["score"] for r in rows], s=25, c="0.75", label="trial")
        ax.scatter([r[key] for r in front], [r["score"] for r in front], s=45, c="tab:blue", label="Pareto front")
        for r in front:
            ax.annotate(str(r["trial"]), (r[key], r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        panel = sorted(pareto(rows, ["score", key]), key=lambda r: r[key])  # this panel's own trade-off curve
        ax.step([r[key] for r in panel], [r["score"] for r in panel], where="post", c="tab:blue", lw=0.8, ls="--")
        if teacher and not math.isnan(teacher[key]):
            ax.scatter([teacher[key]], [teacher["score"]], marker="*", s=220, c="tab:red", label="teacher",
                       zorder=3)
        values = [r[key] for r in rows] + ([teacher[key]] if teacher else [])
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SearchResult:
    study: str
    front: list[dict]
    rows: list[dict]
    teacher: dict | None
    parent_run_id: str
    counts: dict[str, int]
    artifacts: dict[str, str]


def summarise(ctx: Context, dims: dict[str, Dimension]) -> SearchResult:
    """Log the front on the parent run (CSV, PNG, counts), write them beside the trials, print the table."""
    import optuna
    from optuna.trial import TrialState

    study = load_study(ctx)
    optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed now, queued for the next run
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    rows = trial_rows(study, dims)
    # one objective: the front of score against it (auto's shipped MB), or against params for score alone
    keys = ctx.objectives if len(ctx.objectives) > 1 else ["score", next((o for o in ctx.objectives if o != "score"),
                                                                          "params")]
    command = "auto" if ctx.budget is not None else "search"
    latency = (f"p50 latency ms ({'x'.join(map(str, ctx.budget.latency_shape))}, shipped runtime)"
               if ctx.budget is not None else "latency ms (batch 32 x 128)")
    front = pareto(rows, keys)
    teacher = teacher_point(rows)
    out = Path(ctx.output)
    out.mkdir(parents=True, exist_ok=True)
    files = {"front_csv": out / "pareto_front.csv", "trials_csv": out / "trials.csv", "plot": out / "pareto_front.png"}
    write_csv(files["front_csv"], front)
    write_csv(files["trials_csv"], [r | {"pareto": r in front} for r in rows])
    plot_front(files["plot"], rows, front, teacher,
               f"compress {command} {ctx.study}: {len(rows)} trials, front by {' / '.join(keys)}", latency)

    client = mlflow_client(ctx.tracking)
    for path in files.values():
        client.log_artifact(ctx.parent_run_id, str(path))
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = {f"trials_{k}": v for k, v in counts.items() if k in ("complete", "pruned", "fail", "waiting")}
    metrics |= {"pareto_size": len(front)}
    if rows:
        best = max(rows, key=lambda r: r["score"])
        metrics |= {"best_score": best["score"], "best_score_params": best["params"]}
    if teacher:
        metrics |= {"teacher_score": teacher["score"], "teacher_params": teacher["params"]}
    client.log_batch(ctx.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    running = counts.get("running", 0) + counts.get("waiting", 0)
    client.set_terminated(ctx.parent_run_id, "FINISHED")

    cut = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("interrupted"))
    print(f"\n{command} {ctx.study}: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned or "
          f"skipped, {counts.get('fail', 0) - cut} failed" + (f", {cut} interrupted" if cut else "")
          + f" trials in {shown(ctx.storage)}; Pareto front by {' / '.join(keys)}:\n", file=sys.stderr)
    print(front_table(front, teacher))
    if running:
        print(f"\n{running} trial(s) still running or queued (another worker, or a retry of a dead worker's trial): "
              "run the same command again to add them", file=sys.stderr)
    print(f"\nfront: {files['front_csv']}, plot: {files['plot']}; MLflow parent run {ctx.parent_run_id} in "
          f"{shown(ctx.tracking)} (open it: {where_to_look(ctx.tracking)})", file=sys.stderr)
    return SearchResult(ctx.study, front, rows, teacher, ctx.parent_run_id, counts,
                        {k: str(v) for k, v in files.items()})
