"""compress export: a trained classifier as safetensors + model card, ONNX (parity-checked, with onnxruntime's
transformer fusions where they apply) and int8 ONNX, and optionally a version in the MLflow model registry."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from compress.exporting.card import model_card
from compress.exporting.fusion import Fusion, check_fuse, fused_onnx, ops_text
from compress.exporting.onnx import (INT8_FILE, ONNX_FILE, PARITY_TOL, export_onnx, input_names, load_for_export,
                                     parity, quantize_int8, require_onnx)
from compress.exporting.predict import metric_value, onnx_logits_fn, predict_dev, torch_logits_fn
from compress.exporting.registry import get_run, model_from_run, register, source_run_info
from compress.infra.errors import CompressError
from compress.infra.results import StepResult
from compress.options.bounds import check_all
from compress.options.groups import DataConfig, ExportConfig, OutputConfig, TrackingConfig


FORMATS = ("hf", "onnx", "int8")


def parse_formats(value: str) -> list[str]:
    """'hf, onnx' -> ['hf', 'onnx'], in the order given, without repeats."""
    names = [part.strip().lower() for part in str(value).split(",") if part.strip()]
    if not names:
        raise CompressError(f"--format {value!r}: empty; give one or more of {', '.join(FORMATS)}, comma-separated")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise CompressError(f"--format: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def export(step: ExportConfig, data: DataConfig | None = None, tracking: TrackingConfig | None = None,
           output: OutputConfig | None = None) -> StepResult:
    """Export `step.model` (or the model of MLflow run `step.run`) in `step.format`: HF weights with a model card,
    ONNX checked against PyTorch, int8 ONNX; score each on the task's dev split when `data` names one.

    Writes nothing unless every part succeeded. The result's `report` is the dict `compress export` prints as one JSON
    line; its metrics are each file's MB, each score and the worst parity difference.
    """
    import shutil
    import tempfile

    from compress.infra.identity import slug
    from compress.options.commands import with_defaults

    data, tracking, output = with_defaults("export", data=data, tracking=tracking, output=output)
    model, run, register_name = step.model, step.run, step.register
    formats = parse_formats(step.format)
    fuse = check_fuse(step.fuse)
    if "onnx" in formats or "int8" in formats:
        require_onnx(f"--format {','.join(formats)}")
    if (model is None) == (run is None):
        raise CompressError("give exactly one of --model (a saved model folder) and --run (an MLflow run id)")
    if register_name is not None and not register_name.strip():
        raise CompressError("--register: the registered model name is empty")
    check_all(max_length=data.max_length, batch_size=step.batch_size)

    from compress.data.tasks import load_task
    from compress.models.loading import resolve_max_length, resolve_model
    from compress.infra.paths import check_overwrite
    from compress.infra.writes import check_run_paths
    from compress.engine.trainer import quiet_libraries
    from compress.infra.lineage import read_lineage

    quiet_libraries()
    task_data = (load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                           quoting=data.quoting) if data.task or data.data else None)
    scratch = Path(tempfile.mkdtemp(prefix="compress-export-"))
    try:
        if run:
            path = model_from_run(run, tracking.tracking, scratch)
            name = get_run(run, tracking.tracking).data.params.get("output") or f"run-{run[:8]}"
        else:
            path, name = resolve_model(model, "--model"), model
        out = check_run_paths(output.output if output.output is not None else f"outputs/export-{slug(name)}",
                              reads=(path, data.data), tracking=tracking.tracking)  # --run, the card, --register
        check_overwrite(out, output.overwrite)
        net, tokenizer = load_for_export(path, "--run" if run else "--model", data.max_length)
        max_length = resolve_max_length(data.max_length, [net.config])
        if task_data is not None and task_data.num_labels != net.config.num_labels:
            raise CompressError(f"--{'task' if data.task else 'data'}: {task_data.name} has {task_data.num_labels} "
                                f"labels but the model's head has {net.config.num_labels}")
        lineage = read_lineage(path)
        source = source_run_info(run or lineage.get("mlflow_run_id"), [tracking.tracking, lineage.get("tracking")])
        job = _Job(out=out, overwrite=output.overwrite, formats=formats, fuse=fuse, lineage=lineage, source=source,
                   origin=f"run {run}" if run else str(model), register_name=register_name,
                   max_length=max_length, batch_size=step.batch_size, tracking=tracking)
        result = _write(job, net, tokenizer, task_data, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_summary(out, result)
    metrics = {f"{fmt}_mb": info["mb"] for fmt, info in result["files"].items()}
    metrics |= {f"{k}_score": v for k, v in (result["scores"] or {}).items() if isinstance(v, float)}
    if result["parity_max_abs_diff"]:
        metrics["parity_max_abs_diff"] = max(result["parity_max_abs_diff"].values())
    metrics |= _fusion_metrics(result)
    registered = result.get("registered") or {}
    return StepResult(str(out), metrics, registered.get("run_id") or result.get("source_run"),
                      {**lineage, "export": {k: v for k, v in result.items() if k != "output"}}, report=result)


@dataclass
class _Job:
    """What one export writes, and where it reports it."""

    out: Path
    overwrite: bool
    formats: list[str]
    fuse: str
    lineage: dict
    source: dict
    origin: str
    register_name: str | None
    max_length: int
    batch_size: int
    tracking: TrackingConfig


def _write(job: _Job, net, tokenizer, task_data, scratch: Path) -> dict:
    """Everything that writes, inside the atomic output block: a failure anywhere leaves no --output."""
    from compress.models.measure import count_params
    from compress.engine.state import atomic_output
    from compress.infra.lineage import write_lineage

    out, formats, lineage, source, origin = job.out, job.formats, job.lineage, job.source, job.origin
    files: dict[str, dict] = {}
    scores: dict[str, float] = {}
    diffs: dict[str, float] | None = None
    int8_diffs: dict[str, float] | None = None
    fusion: dict | None = None
    names = input_names(net, tokenizer)
    metric = task_data.metric if task_data is not None else None
    with atomic_output(out, job.overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
        net.config.architectures = [type(net).__name__]
        if "hf" in formats:
            net.save_pretrained(tmp, safe_serialization=True)
            shards = sorted(tmp.glob("*.safetensors"))  # one file unless the model is past the shard size
            files["hf"] = {"file": shards[0].name if len(shards) == 1 else f"{len(shards)} .safetensors shards",
                           "mb": sum(f.stat().st_size for f in shards) / 1e6}
        else:  # config.json alone: labels and sizes for whoever runs the ONNX file
            net.config.save_pretrained(tmp)
        fp32 = None
        if "onnx" in formats or "int8" in formats:
            fp32 = (tmp if "onnx" in formats else scratch) / ONNX_FILE
            fused, note = (_try_fusion(job.fuse, net, tokenizer, fp32, scratch / "fusion") if job.fuse != "off"
                           else (None, None))
            if fused is not None:
                diffs = fused.diffs
            else:
                print(f"exporting ONNX (dynamo, dynamic batch and sequence) -> {fp32.name}", file=sys.stderr)
                export_onnx(net, tokenizer, fp32)
                diffs = parity(net, fp32, names)
                worst = max(diffs.values())
                if not worst <= PARITY_TOL:
                    raise CompressError(
                        f"--format onnx: onnxruntime differs from PyTorch by {worst:.3g} in the logits (limit "
                        f"{PARITY_TOL:g}) at shapes {', '.join(f'{k}: {v:.3g}' for k, v in diffs.items())}; "
                        "nothing was written"
                    )
            fusion = {"mode": job.fuse, "fused": fused is not None, "exporter": "torchscript" if fused else "dynamo",
                      "ops": fused.ops if fused else {}, "note": note}
            if "onnx" in formats:
                files["onnx"] = {"file": ONNX_FILE, "mb": _onnx_mb(fp32)}
        if "int8" in formats:
            print(f"quantizing to int8 (onnxruntime dynamic) -> {INT8_FILE}", file=sys.stderr)
            quantize_int8(fp32, tmp / INT8_FILE)
            files["int8"] = {"file": INT8_FILE, "mb": _onnx_mb(tmp / INT8_FILE)}
            # not held to PARITY_TOL: int8 moves logits by design; the dev score is the judge, this shows how far
            int8_diffs = parity(net, tmp / INT8_FILE, names)
        if task_data is not None:
            print(f"scoring on {task_data.name} dev ({len(task_data.dev_labels)} rows)", file=sys.stderr)
            kw = dict(max_length=job.max_length, batch_size=job.batch_size)
            run_fp32 = onnx_logits_fn(fp32) if fp32 is not None else torch_logits_fn(net)
            scores["fp32"] = metric_value(metric, predict_dev(run_fp32, tokenizer, task_data, names, **kw),
                                          task_data.dev_labels)
            if "int8" in formats:
                scores["int8"] = metric_value(metric, predict_dev(onnx_logits_fn(tmp / INT8_FILE), tokenizer,
                                                                  task_data, names, **kw), task_data.dev_labels)
        summary = {
            "output": str(out), "source": origin, "formats": formats, "files": files, "params": count_params(net),
            "parity_max_abs_diff": diffs, "parity_limit": PARITY_TOL, "int8_max_abs_diff": int8_diffs,
            "fusion": fusion,
            "scores": {"task": task_data.name, "metric": metric, **scores} if task_data is not None else None,
            "source_run": source.get("run_id"),
        }
        card = model_card(name=job.register_name or out.name, folder=out.name, model=net, lineage=lineage, run=source,
                          files=files, parity_diffs=diffs, scores=scores, metric=metric, fusion=fusion)
        (tmp / "README.md").write_text(card)
        write_lineage(tmp, {**lineage, "label_names": lineage.get("label_names") or
                            [net.config.id2label[i] for i in range(net.config.num_labels)],
                            "export": {k: v for k, v in summary.items() if k != "output"}})
        if job.register_name:
            metrics = {f"{fmt}_mb": info["mb"] for fmt, info in files.items()}
            metrics |= {f"{k}_score": v for k, v in scores.items()}
            if diffs:
                metrics["parity_max_abs_diff"] = max(diffs.values())
            metrics |= _fusion_metrics(summary)
            params = {"formats": ",".join(formats), "source": origin, "source_run": source.get("run_id") or ""}
            if fusion:
                params |= {"fuse": fusion["mode"], "onnx_exporter": fusion["exporter"],
                           "fused_ops": ops_text(fusion["ops"])}
            if task_data is not None:
                params |= {"task": task_data.name, "metric": metric}
            summary["registered"] = register(
                tmp, job.register_name, tracking=job.tracking.tracking, experiment=job.tracking.experiment,
                source=source,
                summary={"params": params, "metrics": metrics, "files": sorted(p.name for p in tmp.iterdir())})
    return summary


def _try_fusion(mode: str, net, tokenizer, path: Path, work: Path) -> tuple[Fusion | None, str | None]:
    """The fused graph at `path`, or None and why when --fuse auto cannot fuse (--fuse on raises instead)."""
    print(f"exporting ONNX with onnxruntime's transformer fusions (TorchScript exporter) -> {path.name}",
          file=sys.stderr)
    try:
        fused = fused_onnx(net, tokenizer, path, work)
    except CompressError as err:
        if mode == "on":
            raise CompressError(f"--fuse on: {err}; nothing was written") from None
        print(f"note: graph fusion skipped ({err}); exporting the unfused dynamo graph instead", file=sys.stderr)
        return None, str(err)
    print(f"  fused: {ops_text(fused.ops)}", file=sys.stderr)
    return fused, None


def _fusion_metrics(summary: dict) -> dict[str, float]:
    """fused_<operator> counts, and the int8 graph's max logit difference to PyTorch, for MLflow and the result."""
    fusion = summary.get("fusion") or {}
    metrics = {f"fused_{op}": float(n) for op, n in (fusion.get("ops") or {}).items()}
    if fusion:
        metrics["onnx_fused"] = float(fusion["fused"])
    if summary.get("int8_max_abs_diff"):
        metrics["int8_max_abs_diff"] = max(summary["int8_max_abs_diff"].values())
    return metrics


def _onnx_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def _print_summary(out: Path, result: dict) -> None:
    scores = result.get("scores") or {}
    metric = scores.get("metric") or "score"
    print(f"\nexport done -> {out}", file=sys.stderr)
    print(f"  {'format':<7} {'file':<18} {'MB':>9}  {metric:>9}", file=sys.stderr)
    for fmt, info in result["files"].items():
        score = scores.get("int8" if fmt == "int8" else "fp32")
        print(f"  {fmt:<7} {info['file']:<18} {info['mb']:>9.2f}  {'-' if score is None else f'{score:.4f}':>9}",
              file=sys.stderr)
    if result.get("parity_max_abs_diff"):
        worst = max(result["parity_max_abs_diff"].values())
        print(f"  ONNX parity: max abs logit diff {worst:.2e} (limit {PARITY_TOL:g}) at "
              f"{', '.join(result['parity_max_abs_diff'])}", file=sys.stderr)
    if (fusion := result.get("fusion")) is not None:
        print(f"  ONNX graph: {'fused (' + ops_text(fusion['ops']) + ')' if fusion['fused'] else 'unfused'}, "
              f"{fusion['exporter']} exporter (--fuse {fusion['mode']})", file=sys.stderr)
    if reg := result.get("registered"):
        print(f"  registered as {reg['name']} version {reg['version']} (MLflow run {reg['run_id']} in "
              f"{reg['tracking']})", file=sys.stderr)
