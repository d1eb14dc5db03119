"""Deployable speed and accuracy: each model as PyTorch fp32, ONNX fp32 and ONNX int8, scored and timed in one run.

    python experiments/bench_export.py teacher=outputs/TEACHER student=outputs/L3-STUDENT pruned=outputs/PRUNED
    python experiments/bench_export.py --tiny          # smoke run: tiny random models built here, toy data

Each argument is a fine-tuned classifier folder (LABEL=DIR or just DIR), made by other scripts: the SST-2 teacher
(finetune), the 3-layer student (distill --layers 3) and the 0.5/0.5-pruned student (prune --heads 0.5 --ffn 0.5).
Each is exported with `compress export --format onnx,int8 --data DEV` into a temporary folder (the fp32 ONNX must
match PyTorch to 1e-4 on new shapes first), all three runtimes are scored on the dev split (default
../shared/data/sst2, GLUE's 872-row SST-2 dev set), and then every file is timed by `compress bench` in the same
process, interleaved, at batch 1 and 32 x 128 on this machine's CPU. A markdown table goes to stdout, and the
numbers to OUT/bench_export.json.

Targets (issue 6): int8 at least 2x faster than fp32 at batch 32, and at most 1 point of accuracy lost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / ".." / "shared" / "data" / "sst2"


def build_tiny(folder: Path) -> tuple[list[tuple[str, Path]], Path]:
    """A tiny random teacher, its 3-layer student (every other layer) and a 0.5/0.5-pruned copy, plus toy data."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_bert, write_tsv
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compress.models.compress_bert import from_bert
    from compress.models.loading import student_from_teacher
    from compress.pruning.slicing import slice_heads, slice_neurons

    data = write_tsv(folder / "data", train=64, dev=64)
    teacher_dir = save_tiny_bert(folder / "teacher", layers=6, hidden=64, heads=4, intermediate=256)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)

    student = student_from_teacher(teacher, [0, 2, 4])
    student.config.architectures = [type(student).__name__]
    student.save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")

    torch.manual_seed(0)
    pruned = from_bert(teacher)  # same function as the teacher, as compress's own class; then half of each kept
    heads = [list(range(h // 2)) for h in pruned.config.attention_heads]
    neurons = [list(range(n // 2)) for n in pruned.config.intermediate_sizes]
    slice_neurons(slice_heads(pruned, heads), neurons)
    pruned.config.architectures = [type(pruned).__name__]
    pruned.save_pretrained(folder / "pruned")
    tokenizer.save_pretrained(folder / "pruned")
    return [("teacher", teacher_dir), ("student", folder / "student"), ("pruned", folder / "pruned")], data


def cli(*args) -> str:
    """Run `compress ...` in this process; its stdout (stderr passes through for progress)."""
    from compress.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in args])
    return out.getvalue()


def torch_score(folder: Path, data: Path, max_length: int) -> float:
    from compress.data.tasks import load_task
    from compress.exporting.onnx import input_names, load_for_export
    from compress.exporting.predict import metric_value, predict_dev, torch_logits_fn

    task = load_task(data=str(data))
    model, tokenizer = load_for_export(str(folder))
    preds = predict_dev(torch_logits_fn(model), tokenizer, task, input_names(model, tokenizer),
                        max_length=max_length, batch_size=64)
    return metric_value(task.metric, preds, task.dev_labels)


def markdown(rows: list[dict], batches: list[int]) -> str:
    big = max(batches)
    head = ["model", "runtime", "dev accuracy", "MB", *[f"p50 ms b{b}" for b in batches],
            f"x PyTorch b{big}", f"x ONNX fp32 b{big}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["runtime"], f"{r['score']:.4f}", f"{r['mb']:.1f}",
                 *[f"{r['p50'][b]:.1f}" for b in batches], f"{r['vs_pytorch']:.2f}", f"{r['vs_onnx']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="LABEL=DIR or DIR of fine-tuned classifiers (not with --tiny)")
    parser.add_argument("--data", help="train/dev folder scored on (default: ../shared/data/sst2)")
    parser.add_argument("--batch", default="1,32", help="batch sizes timed")
    parser.add_argument("--seq", type=int, default=128, help="tokens per timed sequence")
    parser.add_argument("--reps", type=int, default=10, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: all usable)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per dev example when scoring")
    parser.add_argument("--out", default="outputs/bench-export", help="where bench_export.json goes")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders under OUT/exports")
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny random models built here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        if args.tiny:
            models, data = build_tiny(work / "tiny")
            data = Path(args.data) if args.data else data
            args.reps, args.warmup, args.seq = min(args.reps, 5), min(args.warmup, 1), min(args.seq, 64)
        else:
            if not args.models:
                parser.error("give the model folders (LABEL=DIR ...), or --tiny")
            models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) if "=" in m else (Path(m).name, Path(m))
                      for m in args.models]
            data = Path(args.data) if args.data else SST2
            if not (data / "dev.tsv").exists() and not any(data.glob("dev.*")):
                sys.exit(f"bench_export: no dev file under {data} (the shared SST-2 copy is not on this machine); "
                         "pass --data")
        out = Path(args.out)
        exports = out / "exports" if args.keep else work / "exports"
        batches = [int(b) for b in args.batch.split(",")]

        rows: list[dict] = []
        timed: list[str] = []
        for label, folder in models:
            print(f"\n== {label}: {folder}", file=sys.stderr)
            target = exports / label
            summary = json.loads(cli("export", "--model", folder, "--format", "onnx,int8", "--data", data,
                                     "--output", target, "--max_length", args.max_length, "--overwrite")
                                 .strip().splitlines()[-1])
            scores, files = summary["scores"], summary["files"]
            from compress.models.measure import weights_mb

            rows += [
                {"model": label, "runtime": "PyTorch fp32", "path": str(folder), "mb": weights_mb(folder),
                 "score": torch_score(folder, data, args.max_length)},
                {"model": label, "runtime": "ONNX fp32", "path": str(target / files["onnx"]["file"]),
                 "mb": files["onnx"]["mb"], "score": scores["fp32"]},
                {"model": label, "runtime": "ONNX int8", "path": str(target / files["int8"]["file"]),
                 "mb": files["int8"]["mb"], "score": scores["int8"]},
            ]
            rows[-2]["parity_max_abs_diff"] = max(summary["parity_max_abs_diff"].values())
        timed = [r["path"] for r in rows]

        bench_json = work / "bench.json"
        flags = ["--batch", args.batch, "--seq", args.seq, "--reps", args.reps, "--warmup", args.warmup,
                 "--json", bench_json] + (["--threads", args.threads] if args.threads else [])
        print(f"\n== timing {len(timed)} files together", file=sys.stderr)
        print(cli("bench", *[x for p in timed for x in ("--model", p)], *flags), file=sys.stderr)
        report = json.loads(bench_json.read_text())
        by_label = {m["path"]: m["label"] for m in report["models"]}
        p50 = {(r["model"], r["batch"]): r["p50_ms"] for r in report["results"]}
        big = max(batches)
        for r in rows:
            r["p50"] = {b: p50[(by_label[r["path"]], b)] for b in batches}
        for r in rows:
            same = {x["runtime"]: x for x in rows if x["model"] == r["model"]}
            r["vs_pytorch"] = same["PyTorch fp32"]["p50"][big] / r["p50"][big]
            r["vs_onnx"] = same["ONNX fp32"]["p50"][big] / r["p50"][big]

        hw, th = report["hardware"], report["threads"]
        print(f"\nexport benchmark: dev split of {data}; CPU {hw['cpu']} ({hw['usable_cores']} usable cores), torch "
              f"{report['versions']['torch']} ({th['torch']} threads), onnxruntime {report['versions']['onnxruntime']} "
              f"({th['onnxruntime_intra_op']} threads); p50 of {args.reps} interleaved rounds at seq {args.seq}\n")
        print(markdown(rows, batches))
        print()
        for label, _ in models:
            same = {x["runtime"]: x for x in rows if x["model"] == label}
            int8, fp32, pt = same["ONNX int8"], same["ONNX fp32"], same["PyTorch fp32"]
            drop = (fp32["score"] - int8["score"]) * 100
            print(f"{label}: int8 is {int8['vs_onnx']:.2f}x ONNX fp32 and {int8['vs_pytorch']:.2f}x PyTorch fp32 at "
                  f"batch {big} (target >= 2x); accuracy {int8['score']:.4f} vs {fp32['score']:.4f} ONNX fp32 / "
                  f"{pt['score']:.4f} PyTorch ({drop:.2f} points lost; target <= 1)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_export.json").write_text(json.dumps({"args": vars(args), "data": str(data), "rows": rows,
                                                           "bench": report}, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
