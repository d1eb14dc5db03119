"""Benchmark width cuts on a distilled student: vocabulary, heads and FFN, hidden size, and int8 ONNX, row by row.

    python experiments/bench_width.py TEACHER --task bbc-news --seeds 42,43,44
    python experiments/bench_width.py TEACHER --task sst2 --max-train 4000 --seeds 42,43,44
    python experiments/bench_width.py --tiny          # smoke test on a tiny model built here, in a minute or two

Per seed, real compress runs from the fine-tuned TEACHER, each its own MLflow run under OUT/mlruns:
  student        distill --layers L (or --student FOLDER, one model for every seed)
  + vocab        prune --vocab of the student, no recovery (logits are unchanged on text whose tokens were kept)
  + vocab min    the same keeping only tokens the training texts produce --vocab-min-count times (5), as every
                 row after it does
  + heads/FFN    prune --heads R --ffn R --vocab of the student, recovered by distilling from it
  + hidden 0.25  the same with --hidden 0.25
  + hidden 0.5   the same with --hidden 0.5 (the whole chain)
  chain int8     export of the whole chain to ONNX and int8 ONNX, each scored on the dev set
The seed changes the data order, the calibration rows and dropout of every run in the chain, so each row's score is
the mean and sd over seeds. The teacher and the first seed's models are then timed together, interleaved in one
process (`compress bench`), at 1 x SEQ and 32 x SEQ on this machine's CPU (every seed's models have the same shapes).
The table goes to stdout (markdown) and OUT/bench_width.json.
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

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("student", "+ vocab", "+ vocab min", "+ heads/FFN", "+ hidden 0.25", "+ hidden 0.5", "chain int8")
# each prune row of the chain: (row, the flags beyond --vocab); the ratio of heads and FFN comes from --ratio, and
# every row after "+ vocab" keeps only the tokens the training texts produce --vocab-min-count times
CUTS = (("+ vocab", {}), ("+ vocab min", {"min": True}), ("+ heads/FFN", {"hf": True, "min": True}),
        ("+ hidden 0.25", {"hf": True, "min": True, "hidden": 0.25}),
        ("+ hidden 0.5", {"hf": True, "min": True, "hidden": 0.5}))


def run_seed(teacher: str, source: dict, out: Path, args, seed: int) -> dict[str, dict]:
    """Every run of one seed; returns each row's metrics, folder and wall time."""
    import compress
    from compress.api import (DataConfig, DistillConfig, ExportConfig, OutputConfig, PruneConfig, RuntimeConfig,
                              TrackingConfig, TrainingConfig)

    data = DataConfig(**source, max_train=args.max_train)
    common = {"runtime": RuntimeConfig(latency_reps=1),
              "tracking": TrackingConfig(tracking=f"sqlite:///{out.parent.resolve()}/mlruns/mlflow.db",
                                         experiment="bench-width")}
    rows: dict[str, dict] = {}

    def timed(name: str, call) -> None:
        start = time.perf_counter()
        result = call()
        rows[name] = {**result.metrics, "folder": result.output, "seconds": time.perf_counter() - start}

    if args.student:
        student = args.student
    else:
        student = str(out / "student")
        timed("student", lambda: compress.distill(
            DistillConfig(teacher=teacher, layers=args.layers), data, training=TrainingConfig(seed=seed, **(
                {"epochs": args.epochs} if args.epochs else {})), **common,
            output=OutputConfig(output=student, overwrite=True)))
    for name, cut in CUTS:
        ratio = args.ratio if cut.get("hf") else 0.0
        step = PruneConfig(model=student, heads=ratio, ffn=ratio, hidden=cut.get("hidden", 0.0), vocab=True,
                           vocab_min_count=args.vocab_min_count if cut.get("min") else 1)
        epochs = args.recover_epochs if cut.get("hf") else 0  # the vocabulary alone needs no recovery
        folder = out / name.strip("+ ").replace(" ", "-").replace("/", "-")
        timed(name, lambda step=step, epochs=epochs, folder=folder: compress.prune(
            step, data, training=TrainingConfig(epochs=epochs, seed=seed), **common,
            output=OutputConfig(output=str(folder), overwrite=True)))
    chain = rows["+ hidden 0.5"]["folder"]
    timed("chain int8", lambda: compress.export(ExportConfig(model=chain, format="hf,onnx,int8"), data,
                                                output=OutputConfig(output=str(out / "chain-export"),
                                                                    overwrite=True)))
    return rows


def score_of(name: str, row: dict) -> float:
    return row["int8_score"] if name == "chain int8" else row["student_score"]


def summary(runs: dict[int, dict[str, dict]], teacher_score: float, student_score: float | None) -> dict[str, dict]:
    """Per row, over seeds: score mean and sd (0 for one seed), retention against the teacher, params, unk_rate,
    and run seconds (mean)."""
    out = {}
    for name in ROWS:
        present = [seed for seed in runs if name in runs[seed]]
        if not present:  # the student was given: one model, scored by its first prune run (its parent's score)
            scores = [student_score]
        else:
            scores = [score_of(name, runs[seed][name]) for seed in present]
        first = runs[next(iter(runs))].get(name, {})
        out[name] = {"scores": scores, "score": statistics.mean(scores),
                     "score_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                     "retention": statistics.mean(scores) / teacher_score,
                     "unk_rate": first.get("unk_rate"),
                     # a prune row's score straight after the cut, before recovery (hidden cuts change LayerNorms)
                     "before_recovery": (statistics.mean(runs[s][name]["score_before_recovery"] for s in present)
                                         if first.get("score_before_recovery") is not None else None),
                     "seconds": statistics.mean(runs[s][name]["seconds"] for s in present) if present else None}
    return out


def table(rows: dict[str, dict], teacher: dict, sizes: dict[str, dict], latency: dict[str, dict], seq: int) -> str:
    seeds = len(rows["+ vocab"]["scores"])
    head = "accuracy" if seeds == 1 else f"accuracy (mean ± sd, {seeds} seeds)"
    lines = [f"| model | params | of teacher | MB on disk | unk_rate | p50 ms 1x{seq} | p50 ms 32x{seq} | "
             f"speedup 32x{seq} | "
             f"{head} | retention | before recovery | run s |", "|---|" + "---|" * 11]
    t32 = latency["teacher"]["32"]
    lines.append(f"| teacher | {teacher['params']:,} | 100% | {sizes['teacher']['mb']} | - | "
                 f"{latency['teacher']['1']:.2f} | {t32:.1f} | 1.00x | {teacher['score']:.4f} | 1.000 | - | - |")
    for name in ROWS:
        r, size, lat = rows[name], sizes[name], latency[name]
        score = f"{r['score']:.4f}" + (f" ± {r['score_sd']:.4f}" if len(r["scores"]) > 1 else "")
        unk = "-" if r["unk_rate"] is None else f"{r['unk_rate']:.2%}"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        before = "-" if r["before_recovery"] is None else f"{r['before_recovery']:.4f}"
        lines.append(f"| {name} | {size['params']:,} | {size['params'] / teacher['params']:.1%} | {size['mb']} | "
                     f"{unk} | {lat['1']:.2f} | {lat['32']:.1f} | {t32 / lat['32']:.2f}x | {score} | "
                     f"{r['retention']:.3f} | {before} | {seconds} |")
    return "\n".join(lines)


def build_tiny(root: Path) -> tuple[Path, Path]:
    """A small random BERT with words its rows never use, fine-tuned for a few seconds, and those rows."""
    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny-model and toy-data helpers
    from helpers import save_finetuned_tiny_bert

    return save_finetuned_tiny_bert(root, layers=4, hidden=64, heads=4, intermediate=256,
                                    extra_vocab=["zebra", "quartz", "walrus", "kumquat"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", nargs="?", help="fine-tuned teacher classifier folder (not needed with --tiny)")
    parser.add_argument("--task", help="a GLUE task or bbc-news (exclusive with --data)")
    parser.add_argument("--data", help="train/dev folder")
    parser.add_argument("--student", help="a distilled student of TEACHER to start from (default: distil one per "
                                          "seed with --layers)")
    parser.add_argument("--layers", type=int, default=3, help="the student's layers when distilled here")
    parser.add_argument("--epochs", type=int, default=None, help="the student's distillation epochs (default: "
                                                                 "distill's)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of heads and of FFN neurons pruned")
    parser.add_argument("--recover-epochs", type=int, default=2)
    parser.add_argument("--vocab-min-count", type=int, default=5, help="the '+ vocab min' row and every row after it "
                                                                       "keep only training tokens seen this often")
    parser.add_argument("--max-train", type=int, default=None, help="train rows (default: all)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence in the timing")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; more than one prints mean and sd")
    parser.add_argument("--latency-reps", type=int, default=10, help="timed interleaved rounds")
    parser.add_argument("--out", default=None, help="results, models and MLflow store (default: outputs/bench-width, "
                                                    "or a temporary folder with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny model built here")
    args = parser.parse_args()
    if args.tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        root = Path(tempfile.mkdtemp(prefix="bench-width-tiny-"))
        teacher, data = build_tiny(root)
        teacher, source, out = str(teacher), {"data": str(data)}, Path(args.out) if args.out else root / "out"
        args.layers, args.epochs, args.recover_epochs, args.latency_reps, args.seq = 2, 1, 1, 3, 64
    else:
        if not args.teacher or (args.task is None) == (args.data is None):
            parser.error("give TEACHER and one of --task or --data (or --tiny)")
        teacher, out = args.teacher, Path(args.out or "outputs/bench-width")
        source = {"task": args.task} if args.task else {"data": args.data}
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")

    runs = {seed: run_seed(teacher, source, out / f"seed-{seed}", args, seed) for seed in seeds}
    import compress
    from compress.api import BenchConfig, DataConfig, EvaluateConfig, RuntimeConfig

    first = runs[seeds[0]]
    evaluated = compress.evaluate(EvaluateConfig(model=teacher), DataConfig(**source, max_train=args.max_train),
                                  runtime=RuntimeConfig(latency_reps=1))
    teacher_row = {"score": evaluated.metrics["score"], "params": evaluated.metrics["params"],
                   "mb": evaluated.metrics["mb"]}
    # a given student is the parent of every prune run: their teacher_* metrics are its own
    parent = first.get("student") or {"student_params": first["+ vocab"]["teacher_params"],
                                      "student_mb": first["+ vocab"]["teacher_mb"]}
    student_score = None if "student" in first else first["+ vocab"]["teacher_score"]
    chain_export = Path(first["chain int8"]["folder"])
    folders = {"teacher": teacher, "student": args.student or str(out / f"seed-{seeds[0]}" / "student"),
               **{name: first[name]["folder"] for name, _ in CUTS}, "chain onnx": str(chain_export / "model.onnx"),
               "chain int8": str(chain_export / "model.int8.onnx")}
    report = compress.bench(BenchConfig(model=list(folders.values()), batch="1,32", seq=args.seq,
                                        reps=args.latency_reps, json=str(out / "latency.json"))).report
    # bench's rows come batch size by batch size, each in the order of its --model flags
    latency: dict[str, dict] = {name: {} for name in folders}
    for k, r in enumerate(report["results"]):
        latency[list(folders)[k % len(folders)]][str(r["batch"])] = r["p50_ms"]
    sizes = {"teacher": {"params": teacher_row["params"], "mb": f"{teacher_row['mb']:.1f}"},
             "student": {"params": parent["student_params"], "mb": f"{parent['student_mb']:.1f}"},
             **{name: {"params": first[name]["student_params"], "mb": f"{first[name]['student_mb']:.1f}"}
                for name, _ in CUTS}}
    onnx_mb, int8_mb = (Path(folders[k]).stat().st_size / 1e6 for k in ("chain onnx", "chain int8"))
    sizes["chain int8"] = {"params": sizes["+ hidden 0.5"]["params"],
                           "mb": f"{int8_mb:.1f} int8 ({onnx_mb:.1f} ONNX fp32)"}
    rows = summary(runs, teacher_row["score"], student_score)
    print(table(rows, teacher_row, sizes, latency, args.seq))
    chain = first["chain int8"]
    print(f"\nchain as ONNX fp32: p50 {latency['chain onnx']['1']:.2f} ms at 1x{args.seq}, "
          f"{latency['chain onnx']['32']:.1f} ms at 32x{args.seq}; ONNX fp32 dev score {chain.get('fp32_score')}; "
          f"parity {chain.get('parity_max_abs_diff')}")
    result = {"teacher": teacher, "settings": {k: v for k, v in vars(args).items() if k != "tiny"},
              "teacher_row": teacher_row, "rows": rows, "sizes": sizes, "latency": latency,
              "runs": {str(seed): r for seed, r in runs.items()}, "hardware": report["hardware"],
              "versions": report["versions"]}
    (out / "bench_width.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {out / 'bench_width.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
