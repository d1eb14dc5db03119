"""Benchmark compress auto: the smallest model meeting a budget, from the main job's BBC News teacher, at two budgets.

    python experiments/bench_auto.py outputs/teachers/minilm-l6-bbc-news-* --task bbc-news --time-budget 2h
    python experiments/bench_auto.py --tiny        # smoke test on a tiny fine-tuned BERT built here, in a minute or two

The teacher is first timed alone (compress bench: PyTorch fp32, batch 1 x 128 tokens, the model as the user has it)
and its safetensors weighed; the budgets are fractions of those, as the issue states them:
  latency     --max_latency_ms = 1/8 of the teacher's p50, --min_retention 0.97
  latency+mb  the same and --max_mb = 1/20 of the teacher's safetensors MB
Each budget is one `compress auto` study (through compress.api.auto) under OUT/<budget>, with --time_budget each,
resumed when rerun with the same --out. Printed per budget (markdown, and OUT/bench_auto.json): the winner's score,
retention, params, MB and p50/p95 against the teacher (measured together in auto's final run), trials run,
infeasible and pruned, and the wall time; when a budget is not met, the closest trial and the constraint that bound.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"latency": {"latency": 8, "mb": None}, "latency+mb": {"latency": 8, "mb": 20}}  # teacher / this


def build_tiny(folder: Path) -> tuple[str, dict]:
    """A small BERT fine-tuned for seconds on synthetic sentiment rows (test helpers), with words its rows never use
    so the vocabulary cut has something to drop."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_finetuned_tiny_bert

    teacher, data = save_finetuned_tiny_bert(folder, layers=4, hidden=64, heads=4, intermediate=256,
                                             extra_vocab=["zebra", "quark", "fjord", "glyph"])
    return str(teacher), {"data": str(data)}


def teacher_baseline(teacher: str, seq: int) -> dict:
    """The teacher's PyTorch fp32 p50 at 1 x seq on this machine, and its safetensors MB."""
    from compress.api import BenchConfig, bench

    result = bench(BenchConfig(model=[teacher], batch="1", seq=seq, warmup=20, reps=50))
    row, model = result.report["results"][0], result.report["models"][0]
    return {"p50_ms": row["p50_ms"], "p95_ms": row["p95_ms"], "mb": model["mb"], "params": model["params"]}


def run_budget(name: str, teacher: str, source: dict, base: dict, out: Path, args) -> dict:
    """One compress auto study at the budget `name`; its outcome as printed and stored."""
    from compress.api import AutoConfig, DataConfig, OutputConfig, TrackingConfig, auto

    fractions = BUDGETS[name]
    budget = {"max_latency_ms": base["p50_ms"] / fractions["latency"], "latency_shape": f"1x{args.seq}",
              "min_retention": args.min_retention,
              "max_mb": base["mb"] / fractions["mb"] if fractions["mb"] else None}
    folder = out / name
    # the teacher's logits are cached beside the studies, not under the working directory's outputs/
    space = (yaml.safe_load(args.space) if args.space else {}) | {"teacher_cache": str(out.resolve() / "teachers")}
    step = AutoConfig(teacher=teacher, **budget, trials=args.trials, time_budget=args.time_budget, study=name,
                      storage=f"sqlite:///{out.resolve()}/mlruns/optuna.db", space=space, unlabeled=args.unlabeled,
                      latency_reps=args.latency_reps)
    start = time.perf_counter()
    result = auto(step, DataConfig(**source, max_train=args.max_train),
                  TrackingConfig(tracking=f"sqlite:///{out.resolve()}/mlruns/mlflow.db", experiment="bench-auto"),
                  OutputConfig(output=str(folder)))
    return {"budget": budget, "met": result.met, "verdict": result.verdict, "winner": result.winner,
            "tally": result.tally, "seconds": time.perf_counter() - start, "report": result.report,
            "parent_run_id": result.parent_run_id}


def table(base: dict, rows: dict[str, dict]) -> str:
    lines = ["| budget | met | runtime | score | retention | params | MB | p50 ms | p95 ms | teacher p50/p95 ms | "
             "trials (infeasible, pruned) | wall min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, w = r["tally"], r["winner"] or {}
        trials = (f"{t['finished']} ({t['infeasible']}, {t['pruned_before_training']} before training + "
                  f"{t['pruned_at_checkpoint']} at a checkpoint)")
        if w:
            lines.append(f"| {name} | yes | {w['runtime']} | {w['student_score']:.4f} | {w['retention']:.4f} | "
                         f"{w['student_params']:,.0f} | {w['student_mb']:.2f} | {w['latency_ms']:.2f} | "
                         f"{w['latency_p95_ms']:.2f} | {w['teacher_p50_ms']:.2f} / {w['teacher_p95_ms']:.2f} | "
                         f"{trials} | {r['seconds'] / 60:.1f} |")
        else:
            lines.append(f"| {name} | no | - | - | - | - | - | - | - | {base['p50_ms']:.2f} / {base['p95_ms']:.2f} | "
                         f"{trials} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", nargs="?", help="the fine-tuned teacher (default: outputs/teachers/"
                                                   "minilm-l6-bbc-news-*, the main job's)")
    parser.add_argument("--task", default="bbc-news")
    parser.add_argument("--data", help="a folder of train and dev files instead of --task")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help=f"which of {', '.join(BUDGETS)}")
    parser.add_argument("--time-budget", default="2h", help="each budget's --time_budget")
    parser.add_argument("--trials", type=int, default=200, help="each budget's most trials (the time budget binds)")
    parser.add_argument("--min-retention", type=float, default=0.97)
    parser.add_argument("--seq", type=int, default=128, help="tokens of the 1 x SEQ latency shape")
    parser.add_argument("--latency-reps", type=int, default=20)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--space", help="changes to auto's default space (inline YAML)")
    parser.add_argument("--unlabeled", help="unlabelled in-domain text for the space's unlabelled switch")
    parser.add_argument("--out", default="outputs/bench-auto")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny model built here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.tiny:
        out = Path(tempfile.mkdtemp(prefix="bench-auto-tiny-"))
        teacher, source = build_tiny(out / "models")
        args.time_budget, args.trials, args.latency_reps = "10m", 3, 5
        args.space = args.space or json.dumps({"layers": [1, 2], "epochs": 1, "recover_epochs": 1,
                                               "importance_batches": 2, "groups": None})
    else:
        out = Path(args.out)
        found = [args.teacher] if args.teacher else sorted(glob.glob(str(ROOT / "outputs/teachers/"
                                                                          "minilm-l6-bbc-news-*")))
        if len(found) != 1:
            sys.exit("bench_auto: give the teacher folder (distill prints it: outputs/teachers/minilm-l6-bbc-news-"
                     f"<hash>); found {len(found)} under outputs/teachers/")
        teacher = found[0]
        source = {"data": args.data} if args.data else {"task": args.task}
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.budgets.split(",") if n.strip()]
    if unknown := [n for n in names if n not in BUDGETS]:
        sys.exit(f"bench_auto: unknown budget {unknown[0]}; use {', '.join(BUDGETS)}")

    base = teacher_baseline(teacher, args.seq)
    print(f"teacher {teacher}: p50 {base['p50_ms']:.2f} ms (p95 {base['p95_ms']:.2f}) at 1x{args.seq}, PyTorch fp32; "
          f"{base['mb']:.1f} MB safetensors, {base['params']:,} params", file=sys.stderr)
    rows = {name: run_budget(name, teacher, source, base, out, args) for name in names}
    print(f"\nauto benchmark: {teacher}, {source}, on this machine's CPU; budgets are fractions of the teacher's "
          f"p50 {base['p50_ms']:.2f} ms and {base['mb']:.1f} MB, --min_retention {args.min_retention}\n")
    print(table(base, rows))
    for name, r in rows.items():
        print(f"\n{name}: {'met' if r['met'] else 'NOT met'}: {r['verdict']} (report: {r['report']})")
    written = out / "bench_auto.json"
    written.write_text(json.dumps({"teacher": teacher, "source": source, "baseline": base, "budgets": rows,
                                   "args": vars(args)}, indent=2, default=str))
    print(f"written: {written}", file=sys.stderr)


if __name__ == "__main__":
    main()
