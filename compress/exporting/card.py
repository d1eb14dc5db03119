"""The model card (README.md) written beside an export: what it is, how it was made, how to load it."""

from __future__ import annotations

from compress.exporting.onnx import EXAMPLE_SHAPE, PARITY_TOL


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def model_card(*, name: str, folder: str, model, lineage: dict, run: dict, files: dict[str, dict],
               parity_diffs: dict | None, scores: dict, metric: str | None, fusion: dict | None = None) -> str:
    """README.md: what the model is, where it came from (teacher, steps, data), its run's metrics, its files."""
    from compress.infra.version import __version__

    cfg = model.config
    params = run.get("params", {})
    n_params = sum(p.numel() for p in model.parameters())
    labels = lineage.get("label_names") or [cfg.id2label[i] for i in range(cfg.num_labels)]
    task = lineage.get("task") or params.get("task")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        f"tags: [compress, {cfg.model_type}{', onnx' if 'onnx' in files or 'int8' in files else ''}]", "---", "",
        f"# {name}", "",
        f"A {cfg.model_type} sequence classifier ({cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, "
        f"{n_params:,} parameters) for {task or 'its task'}, exported by compress {__version__}.", "",
        "## Lineage", "", "| | |", "|---|---|",
    ]
    rows = [
        ("made by", f"compress {lineage.get('command') or params.get('command')}"
         if lineage.get("command") or params.get("command") else None),
        ("teacher", lineage.get("teacher") or params.get("teacher")),
        ("base model", lineage.get("base_model") or params.get("model")),
        ("student initialised from", lineage.get("student_init")),
        ("data", task and f"{task}: {params.get('train_rows', '?')} train rows, {params.get('dev_rows', '?')} dev "
         f"rows" + (f" (a {params['max_train']}-row subset)" if params.get("max_train") not in (None, "None")
                    else "")),
        ("labels", ", ".join(map(str, labels))),
        ("metric", lineage.get("metric") or params.get("metric")),
        ("steps", lineage.get("steps") or run.get("steps") and
         f"{run['steps']} optimizer steps ({params.get('epochs', '?')} epoch(s), batch {params.get('batch_size', '?')}"
         f", lr {params.get('lr', '?')})"),
        ("MLflow run", run.get("run_id") or lineage.get("mlflow_run_id")),
        ("tracking", run.get("tracking") or lineage.get("tracking")),
        ("git commit", run.get("tags", {}).get("git_commit")),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "", "None")]
    metrics = run.get("metrics") or lineage.get("metrics") or {}
    if metrics:
        source = f"its MLflow run {run['run_id']}" if run.get("metrics") else "compress.json (the run was not found)"
        lines += ["", "## Metrics", "", f"From {source}.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    lines += ["", "## Files", "", f"| format | file | MB | dev {metric or 'score'} |", "|---|---|---|---|"]
    for fmt, info in files.items():
        score = scores.get("int8" if fmt == "int8" else "fp32") if scores else None
        lines.append(f"| {fmt} | {info['file']} | {info['mb']:.2f} | {'-' if score is None else f'{score:.4f}'} |")
    if parity_diffs:
        worst = max(parity_diffs.values())
        lines += ["", f"ONNX parity: max abs logit difference to PyTorch {worst:.2e} (limit {PARITY_TOL:g}) on "
                  f"shapes {', '.join(parity_diffs)}, none of them the traced {EXAMPLE_SHAPE[0]}x{EXAMPLE_SHAPE[1]}; "
                  "batch and sequence axes are dynamic."]
    if fusion and fusion["fused"]:
        ops = ", ".join(f"{op} x{n}" for op, n in fusion["ops"].items())
        lines += ["", f"Graph fusions by onnxruntime's transformer optimizer: {ops}. The ONNX files hold com.microsoft "
                  "operators, so they run on onnxruntime only."]
    # compress's own class: its code is beside the weights. AutoTokenizer reads the config too (transformers 5), so
    # without the flag it asks whether to run that code, though the tokenizer is BERT's.
    remote = ", trust_remote_code=True" if getattr(cfg, "auto_map", None) else ""
    lines += ["", "## Use", "", "```python", "from transformers import AutoTokenizer",
              f'tokenizer = AutoTokenizer.from_pretrained("{folder}"{remote})']
    if "hf" in files:
        lines += ["from transformers import AutoModelForSequenceClassification",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{folder}"{remote})']
    if "onnx" in files or "int8" in files:
        onnx_file = files.get("int8", files.get("onnx"))["file"]
        lines += ["import onnxruntime, numpy as np",
                  f'session = onnxruntime.InferenceSession("{folder}/{onnx_file}")',
                  "enc = tokenizer([\"a sentence\"], return_tensors=\"np\")",
                  "logits = session.run([\"logits\"], {i.name: enc[i.name].astype(np.int64) "
                  "for i in session.get_inputs()})[0]"]
    lines += ["```", ""]
    return "\n".join(lines)
