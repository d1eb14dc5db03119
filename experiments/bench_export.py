"""Deployable speed and accuracy: each model as PyTorch fp32, ONNX fp32 and int8, each ONNX with and without
onnxruntime's transformer graph fusions, scored and timed in one run.

    python experiments/bench_export.py --task bbc-news teacher=outputs/teachers/minilm-l6-bbc-news-XXXX
    python experiments/bench_export.py teacher=outputs/TEACHER student=outputs/L3-STUDENT pruned=outputs/PRUNED
    python experiments/bench_export.py --tiny          # smoke run: tiny random models built here, toy data

Each argument is a fine-tuned classifier folder (LABEL=DIR or just DIR), made by other scripts (finetune, distill
--layers 3, prune --heads 0.5 --ffn 0.5). Each is exported twice through the Python API (`compress.api.export`,
formats onnx,int8, scored on the dev split): with --fuse off (the dynamo graph) and with --fuse auto (onnxruntime's
Attention, EmbedLayerNormalization, SkipLayerNormalization and BiasGelu fusions on the TorchScript graph, where they
apply and pass parity). Every fp32 graph must match PyTorch to 1e-4 on new shapes and padding layouts before it is
written; the int8 graphs' max logit difference is reported beside their accuracy. Then every file and the PyTorch
model are timed by `compress.api.bench` in the same process, interleaved, at batch 1 and 32 x 128 on this machine's
CPU, p50 and p95. A markdown table goes to stdout, and the numbers to OUT/bench_export.json.

Targets (issue 6): int8 at least 2x faster than ONNX fp32 at batch 32, and at most 1 point of accuracy lost.
Issue 24: the fusions apply, keep parity, and say what they gain for fp32 and int8.
"""

from __future__ import annotations

import argparse
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


RUNTIMES = ("PyTorch fp32", "ONNX fp32", "ONNX fp32 fused", "ONNX int8", "ONNX int8 fused")


def torch_score(folder: Path, task: str | None, data: Path | None, max_length: int) -> float:
    from compress.data.tasks import load_task
    from compress.exporting.onnx import input_names, load_for_export
    from compress.exporting.predict import metric_value, predict_dev, torch_logits_fn

    dev = load_task(task, str(data) if data else None)
    model, tokenizer = load_for_export(str(folder))
    preds = predict_dev(torch_logits_fn(model), tokenizer, dev, input_names(model, tokenizer),
                        max_length=max_length, batch_size=64)
    return metric_value(dev.metric, preds, dev.dev_labels)


def export_rows(label: str, folder: Path, target: Path, task: str | None, data: Path | None,
                max_length: int) -> list[dict]:
    """The five runtimes of one model: its two exports (--fuse off, --fuse auto) through the API, and PyTorch."""
    from compress.api import DataConfig, ExportConfig, OutputConfig, export
    from compress.models.measure import weights_mb

    rows = [{"model": label, "runtime": "PyTorch fp32", "path": str(folder), "mb": weights_mb(folder),
             "score": torch_score(folder, task, data, max_length), "max_abs_diff": 0.0}]
    by_fuse = {}
    for fuse in ("off", "auto"):
        print(f"\n== {label}: export --fuse {fuse}", file=sys.stderr)
        result = export(ExportConfig(model=str(folder), format="onnx,int8", fuse=fuse),
                        DataConfig(task=task, data=str(data) if data else None, max_length=max_length),
                        output=OutputConfig(output=str(target / fuse), overwrite=True))
        by_fuse[fuse] = report = result.report
        suffix = " fused" if fuse == "auto" else ""
        for fmt, score, diffs in (("onnx", "fp32", "parity_max_abs_diff"), ("int8", "int8", "int8_max_abs_diff")):
            rows.append({"model": label, "runtime": f"ONNX {score}{suffix}",
                         "path": str(Path(result.output) / report["files"][fmt]["file"]),
                         "mb": report["files"][fmt]["mb"], "score": report["scores"][score],
                         "max_abs_diff": max(report[diffs].values()), "fusion": report["fusion"]})
    if not by_fuse["auto"]["fusion"]["fused"]:
        print(f"{label}: --fuse auto fell back to the unfused graph; its 'fused' rows are unfused", file=sys.stderr)
    return sorted(rows, key=lambda r: RUNTIMES.index(r["runtime"]))


def markdown(rows: list[dict], batches: list[int]) -> str:
    big = max(batches)
    head = ["model", "runtime", "dev accuracy", "max logit diff", "MB",
            *[f"b{b} p50 / p95 ms" for b in batches], f"x PyTorch b{big}", f"x ONNX fp32 b{big}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["runtime"], f"{r['score']:.4f}", "-" if r["runtime"] == "PyTorch fp32" else
                 f"{r['max_abs_diff']:.1e}", f"{r['mb']:.1f}",
                 *[f"{r['p50'][b]:.1f} / {r['p95'][b]:.1f}" for b in batches],
                 f"{r['vs_pytorch']:.2f}", f"{r['vs_onnx']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="LABEL=DIR or DIR of fine-tuned classifiers (not with --tiny)")
    parser.add_argument("--task", help="a GLUE task or bbc-news to score on (exclusive with --data)")
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
    if args.task and args.data:
        parser.error("give --task or --data, not both")

    from compress.api import BenchConfig, bench

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        task = args.task
        if args.tiny:
            models, data = build_tiny(work / "tiny")
            data = None if task else Path(args.data) if args.data else data
            args.reps, args.warmup, args.seq = min(args.reps, 5), min(args.warmup, 1), min(args.seq, 64)
        else:
            if not args.models:
                parser.error("give the model folders (LABEL=DIR ...), or --tiny")
            models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) if "=" in m else (Path(m).name, Path(m))
                      for m in args.models]
            data = None if task else Path(args.data) if args.data else SST2
            if data is not None and not (data / "dev.tsv").exists() and not any(data.glob("dev.*")):
                sys.exit(f"bench_export: no dev file under {data} (the shared SST-2 copy is not on this machine); "
                         "pass --data or --task")
        out = Path(args.out)
        exports = out / "exports" if args.keep else work / "exports"
        batches = [int(b) for b in args.batch.split(",")]

        rows: list[dict] = []
        for label, folder in models:
            rows += export_rows(label, folder, exports / label, task, data, args.max_length)

        print(f"\n== timing {len(rows)} models together", file=sys.stderr)
        report = bench(BenchConfig(model=[r["path"] for r in rows], batch=args.batch, seq=args.seq, reps=args.reps,
                                   warmup=args.warmup, threads=args.threads)).report
        stats = {(x["model"], x["batch"]): x for x in report["results"]}
        big = max(batches)
        for r, timed in zip(rows, report["models"]):  # bench keeps the order it was given
            label = timed["label"]
            r["p50"] = {b: stats[(label, b)]["p50_ms"] for b in batches}
            r["p95"] = {b: stats[(label, b)]["p95_ms"] for b in batches}
        for r in rows:
            same = {x["runtime"]: x for x in rows if x["model"] == r["model"]}
            r["vs_pytorch"] = same["PyTorch fp32"]["p50"][big] / r["p50"][big]
            r["vs_onnx"] = same["ONNX fp32"]["p50"][big] / r["p50"][big]

        hw, th = report["hardware"], report["threads"]
        scored_on = f"{task} dev" if task else f"dev split of {data}"
        print(f"\nexport benchmark: {scored_on}; CPU {hw['cpu']} ({hw['usable_cores']} usable cores), torch "
              f"{report['versions']['torch']} ({th['torch']} threads), onnxruntime {report['versions']['onnxruntime']} "
              f"({th['onnxruntime_intra_op']} threads); p50 / p95 of {args.reps} interleaved rounds at seq "
              f"{args.seq}; max logit diff is against PyTorch on the parity shapes\n")
        print(markdown(rows, batches))
        print()
        for label, _ in models:
            same = {x["runtime"]: x for x in rows if x["model"] == label}
            fusion = same["ONNX fp32 fused"]["fusion"]
            fused_ops = ", ".join(f"{op} x{n}" for op, n in fusion["ops"].items()) if fusion["fused"] else \
                "nothing (fell back to the unfused graph)"
            print(f"{label}: fused {fused_ops}")
            for b in batches:
                f32, f32f = same["ONNX fp32"]["p50"][b], same["ONNX fp32 fused"]["p50"][b]
                i8, i8f = same["ONNX int8"]["p50"][b], same["ONNX int8 fused"]["p50"][b]
                print(f"  batch {b}: fusion gives fp32 {f32 / f32f:.2f}x and int8 {i8 / i8f:.2f}x; int8 is "
                      f"{f32 / i8:.2f}x ONNX fp32 unfused, fused int8 {f32 / i8f:.2f}x ONNX fp32 unfused and "
                      f"{f32f / i8f:.2f}x ONNX fp32 fused")
            best = same["ONNX int8 fused"]
            drop = (same["ONNX fp32"]["score"] - best["score"]) * 100
            print(f"  fused int8 accuracy {best['score']:.4f} vs {same['ONNX fp32']['score']:.4f} ONNX fp32 / "
                  f"{same['PyTorch fp32']['score']:.4f} PyTorch ({drop:.2f} points lost; target <= 1)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_export.json").write_text(json.dumps({"args": vars(args), "data": str(data or task),
                                                           "rows": rows, "bench": report}, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
