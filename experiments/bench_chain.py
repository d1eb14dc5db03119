"""Benchmark prune, then share, against each alone, from one fine-tuned parent.

    python experiments/bench_chain.py PARENT --task bbc-news [--ratio 0.5] [--groups 3] [--recover-epochs 2]
    python experiments/bench_chain.py PARENT --task bbc-news --seeds 42,43,44   # mean and sd of each score
    python experiments/bench_chain.py --tiny          # smoke test on a tiny model built here, in a minute or two

Three `compress` runs, each its own MLflow run under OUT/mlruns:
  prune        PARENT with --heads R --ffn R
  prune+share  that pruned model with --share all --groups G (compress's own class: the pruned layers may differ)
  share        PARENT with --share all --groups G (an ALBERT)
Each recovers by distilling from the model it came from. With --seeds, the three runs repeat per seed (data order,
importance and calibration rows, dropout) under OUT/seed-S/, because one dev accuracy moves by about a point between
seeds and a single run cannot rank recipes that close. Then the parent and every model are timed together,
interleaved in one process (`compress bench`), at batch 32 x --seq on this machine's CPU, so every speed-up in the
table comes from the same rounds. The table goes to stdout (markdown) and OUT/bench_chain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("prune", "prune+share", "share")


def run_steps(parent: str, source: dict, out: Path, args, seed: int) -> dict[str, dict]:
    """The three runs for one seed; returns each one's metrics (and its wall time), by recipe."""
    import compress
    from compress.api import (DataConfig, OutputConfig, PruneConfig, RuntimeConfig, ShareConfig, TrackingConfig,
                              TrainingConfig)

    common = {"data": DataConfig(**source, max_train=args.max_train),
              "training": TrainingConfig(epochs=args.recover_epochs, seed=seed),  # the recovery's epochs
              "runtime": RuntimeConfig(latency_reps=1),
              "tracking": TrackingConfig(tracking=f"sqlite:///{out.resolve()}/mlruns/mlflow.db",
                                         experiment="bench-chain")}
    steps = [
        ("prune", compress.prune, PruneConfig(model=parent, heads=args.ratio, ffn=args.ratio)),
        ("prune+share", compress.share, ShareConfig(model=str(out / "prune"), share="all", groups=args.groups)),
        ("share", compress.share, ShareConfig(model=parent, share="all", groups=args.groups)),
    ]
    rows = {}
    for name, command, step in steps:
        start = time.perf_counter()
        result = command(step, **common, output=OutputConfig(output=str(out / name), overwrite=True))
        rows[name] = {**result.metrics, "seconds": time.perf_counter() - start}
    return rows


def summary(runs: dict[int, dict[str, dict]], latency: dict[str, float]) -> dict[str, dict]:
    """Per recipe, over seeds: score mean and sd (0 for one seed), params, p50 ms and run seconds (means)."""
    out = {}
    for name in RECIPES:
        scores = [runs[seed][name]["student_score"] for seed in runs]
        params = [runs[seed][name]["student_params"] for seed in runs]
        p50 = statistics.mean(latency[f"{name}@{seed}"] for seed in runs)
        out[name] = {"scores": scores, "score": statistics.mean(scores),
                     "score_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                     # global pruning may keep different heads per seed, so the size can differ too
                     "params": round(statistics.mean(params)), "params_min": min(params), "params_max": max(params),
                     "p50_ms": p50, "speedup": latency["parent"] / p50,
                     "seconds": statistics.mean(runs[seed][name]["seconds"] for seed in runs)}
    return out


def table(parent: dict, rows: dict[str, dict], latency: dict[str, float]) -> str:
    seeds = len(next(iter(rows.values()))["scores"])
    score_head = "score" if seeds == 1 else f"score (mean ± sd of {seeds} seeds) | per seed"
    lines = [f"| model | {score_head} | retention | params | of parent | p50 ms | speedup | run s |",
             "|---|---|" + ("---|" if seeds > 1 else "") + "---|---|---|---|---|---|",
             f"| parent | {parent['score']:.4f} | " + ("- | " if seeds > 1 else "") +
             f"1.000 | {parent['params']:,} | 100.0% | {latency['parent']:.1f} | 1.00x | - |"]
    for name, r in rows.items():
        score = f"{r['score']:.4f}" if seeds == 1 else (
            f"{r['score']:.4f} ± {r['score_sd']:.4f} | {', '.join(f'{x:.4f}' for x in r['scores'])}")
        params = f"{r['params']:,}" if r["params_min"] == r["params_max"] else (
            f"{r['params']:,} ({r['params_min']:,}-{r['params_max']:,})")
        lines.append(f"| {name} | {score} | {r['score'] / parent['score']:.3f} | {params} | "
                     f"{r['params'] / parent['params']:.1%} | {r['p50_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parent", nargs="?", help="fine-tuned parent classifier folder (not needed with --tiny)")
    parser.add_argument("--task", help="a GLUE task or bbc-news (exclusive with --data)")
    parser.add_argument("--data", help="train/dev folder")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of heads and of FFN neurons pruned")
    parser.add_argument("--groups", type=int, default=3, help="layer groups of --share all")
    parser.add_argument("--recover-epochs", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="train rows (default: all)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence in the timing")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; more than one prints mean and sd")
    parser.add_argument("--latency-reps", type=int, default=10, help="timed interleaved rounds")
    parser.add_argument("--out", default=None, help="results, models and MLflow store (default: outputs/bench-chain, "
                                                    "or a temporary folder with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny model built here")
    args = parser.parse_args()
    if args.tiny:
        from bench_prune import build_tiny  # the same tiny parent as prune's benchmark (this folder is on sys.path)

        os.environ.setdefault("OMP_NUM_THREADS", "2")
        root = Path(tempfile.mkdtemp(prefix="bench-chain-tiny-"))
        parent, data = build_tiny(root)
        parent, source, out = str(parent), {"data": str(data)}, Path(args.out) if args.out else root / "out"
        args.groups, args.recover_epochs, args.latency_reps, args.seq = 2, 1, 3, 64
    else:
        if not args.parent or (args.task is None) == (args.data is None):
            parser.error("give PARENT and one of --task or --data (or --tiny)")
        parent, out = args.parent, Path(args.out or "outputs/bench-chain")
        source = {"task": args.task} if args.task else {"data": args.data}

    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    runs = {seed: run_steps(parent, source, out / f"seed-{seed}", args, seed) for seed in seeds}
    import compress
    from compress.api import BenchConfig

    labels = ["parent", *(f"{name}@{seed}" for seed in seeds for name in RECIPES)]
    folders = [parent, *(str(out / f"seed-{seed}" / name) for seed in seeds for name in RECIPES)]
    report = compress.bench(BenchConfig(model=folders, batch="32", seq=args.seq, reps=args.latency_reps,
                                        json=str(out / "latency.json"))).report
    # bench's rows come in the order of its --model flags
    latency = {label: r["p50_ms"] for label, r in zip(labels, report["results"], strict=True)}
    first = runs[seeds[0]]["prune"]
    parent_row = {"score": first["teacher_score"], "params": first["teacher_params"]}
    rows = summary(runs, latency)
    print(table(parent_row, rows, latency))
    result = {"parent": parent, "settings": {k: v for k, v in vars(args).items() if k != "tiny"},
              "parent_row": parent_row, "rows": rows, "runs": {str(seed): r for seed, r in runs.items()},
              "latency_p50_ms": latency, "hardware": report["hardware"], "versions": report["versions"]}
    (out / "bench_chain.json").write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out / 'bench_chain.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
