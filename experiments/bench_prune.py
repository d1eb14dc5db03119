"""Benchmark compress prune: heads and FFN pruned together at several ratios, each recovered briefly by distillation.

    python experiments/bench_prune.py PARENT [--data ../shared/data/sst2] [--points 0.3,0.5,0.7]
    python experiments/bench_prune.py --tiny          # smoke test on a tiny model built here, in a minute or two

PARENT is a fine-tuned classifier folder, e.g. the SST-2 MiniLM-L6 teacher from distill's benchmark. Every point
is one `compress prune` run (its own MLflow run under OUT/mlruns), so its latency is measured against the parent
in the same process, interleaved, at batch 32 x 128 on this machine's CPU. The table goes to stdout (markdown)
and to OUT/bench_prune.json.

Targets (issue "compress prune"): at 0.5/0.5 the measured speedup is at least 80% of 1 / flops_ratio (the last
column >= 0.8), and retention after recovery is >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / ".." / "shared" / "data" / "sst2"


def build_tiny(folder: Path) -> tuple[Path, Path]:
    """A small random BERT fine-tuned for a few seconds on synthetic sentiment rows, and those rows."""
    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny-model and toy-data helpers
    from helpers import save_finetuned_tiny_bert

    return save_finetuned_tiny_bert(folder, layers=4, hidden=128, heads=8, intermediate=512)


def run_point(parent: Path, data: Path, ratio: float, out: Path, args) -> dict:
    import compress
    from compress.api import (DataConfig, OutputConfig, PruneConfig, RuntimeConfig, TrackingConfig,
                              TrainingConfig)

    start = time.perf_counter()
    result = compress.prune(
        PruneConfig(model=str(parent), heads=ratio, ffn=ratio, criterion=args.criterion, scope=args.scope,
                    importance_batches=args.importance_batches),
        DataConfig(data=str(data), max_train=args.max_train),
        training=TrainingConfig(epochs=args.recover_epochs),  # --recover_epochs
        runtime=RuntimeConfig(latency_reps=args.latency_reps),
        tracking=TrackingConfig(tracking=f"sqlite:///{out.resolve()}/mlruns/mlflow.db", experiment="bench-prune"),
        output=OutputConfig(output=str(out / f"h{ratio:g}-f{ratio:g}"), overwrite=True))
    return {"ratio": ratio, "seconds": time.perf_counter() - start, **result.metrics}


def table(rows: list[dict]) -> str:
    first = rows[0]
    lines = ["| heads/ffn removed | score | before recovery | retention | params | flops_ratio | latency ms | "
             "parent ms | speedup | speedup / (1/flops_ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| parent | {first['teacher_score']:.4f} | - | 1.000 | {first['teacher_params']:,.0f} | 1.000 | "
             f"{first['teacher_latency_ms']:.1f} | - | 1.00 | - |"]
    for r in rows:
        lines.append(
            f"| {r['ratio']:g} / {r['ratio']:g} | {r['student_score']:.4f} | {r['score_before_recovery']:.4f} | "
            f"{r['retention']:.3f} | {r['student_params']:,.0f} | {r['flops_ratio']:.3f} | {r['latency_ms']:.1f} | "
            f"{r['teacher_latency_ms']:.1f} | {r['speedup']:.2f} | {r['speedup'] * r['flops_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parent", nargs="?", help="fine-tuned parent classifier folder (not needed with --tiny)")
    parser.add_argument("--data", default=str(SST2), help="train/dev folder (default: ../shared/data/sst2)")
    parser.add_argument("--points", default="0.3,0.5,0.7", help="fractions of heads and FFN neurons removed")
    parser.add_argument("--criterion", default="taylor")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--recover-epochs", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=8000, help="train rows for importance and recovery")
    parser.add_argument("--importance-batches", type=int, default=64)
    parser.add_argument("--latency-reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="results, models and MLflow store (default: outputs/bench-prune, "
                                                    "or a temporary folder with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny model built here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    points = [float(p) for p in args.points.split(",")]

    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="bench-prune-tiny-"))
        parent, data = build_tiny(tmp)
        out = Path(args.out) if args.out else tmp / "out"
        args.max_train, args.importance_batches, args.latency_reps = None, 8, 3
    else:
        if not args.parent:
            parser.error("give the parent model folder, or --tiny")
        parent, data, out = Path(args.parent), Path(args.data), Path(args.out or "outputs/bench-prune")
        if not (data / "train.tsv").exists():
            sys.exit(f"bench_prune: no data at {data} (the shared SST-2 copy is not on this machine); pass --data")
    out.mkdir(parents=True, exist_ok=True)

    rows = [run_point(parent, data, r, out, args) for r in points]
    text = table(rows)
    print(f"\nprune benchmark: parent {parent}, {args.criterion}/{args.scope}, recovery {args.recover_epochs} "
          f"epoch(s) on {args.max_train or 'all'} train rows, latency at batch 32 x 128 on CPU "
          f"({args.latency_reps} interleaved rounds)\n")
    print(text)
    (out / "bench_prune.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    half = next((r for r in rows if r["ratio"] == 0.5), None)
    if half:
        print(f"\n0.5/0.5: speedup {half['speedup']:.2f}x is {half['speedup'] * half['flops_ratio']:.0%} of "
              f"1/flops_ratio = {1 / half['flops_ratio']:.2f}x (target >= 80%); retention {half['retention']:.3f} "
              "(target >= 0.98)")


if __name__ == "__main__":
    main()
