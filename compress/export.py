"""compress export: a trained classifier as files to deploy (HF, ONNX fp32, ONNX int8), checked, carded, registered.

The ONNX file is checked against PyTorch on shapes it was not traced at: the dynamo exporter is exact (STACK.md),
but a graph that silently specialised on the example's batch or sequence length would only show on a new shape.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError
from compress.flags import check_all
from compress.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING, for_mlflow, mlflow_client, shown

FORMATS = ("hf", "onnx", "int8")
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
PARITY_TOL = 1e-4  # max abs logit difference allowed between PyTorch and onnxruntime (fp32)
EXAMPLE_SHAPE = (2, 16)  # (batch, sequence) of the traced example
PARITY_SHAPES = ((3, 29), (1, 7))  # new batch and sequence sizes, batch 1 included (torch.export may specialise 1)
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
_ONNX_MAX_BYTES = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph: beyond it weights go external


def parse_formats(value: str) -> list[str]:
    """'hf, onnx' -> ['hf', 'onnx'], in the order given, without repeats."""
    names = [part.strip().lower() for part in str(value).split(",") if part.strip()]
    if not names:
        raise CompressError(f"--format {value!r}: empty; give one or more of {', '.join(FORMATS)}, comma-separated")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise CompressError(f"--format: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def require_onnx(flag: str) -> None:
    """onnx, onnxscript (the dynamo exporter's) and onnxruntime, or one line saying how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"{flag}: needs {', '.join(missing)}; pip install onnx onnxscript onnxruntime")


# --- finding the model --------------------------------------------------------------------------------------------


def store_exists(uri: str) -> bool:
    """Whether an MLflow store is there to read; a sqlite URI whose file is missing would be created empty."""
    from compress.tracking import sqlite_file

    db = sqlite_file(uri)
    return db.is_file() if db is not None else True


def get_run(run_id: str, tracking: str, flag: str = "--run"):
    """The MLflow run, or a CompressError naming the flag and the store."""
    if not store_exists(tracking):
        raise CompressError(f"{flag} {run_id}: no MLflow store at --tracking {shown(tracking)}")
    client = mlflow_client(tracking)  # checks the store before mlflow is imported
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompressError(f"{flag} {run_id}: no such MLflow run in {shown(tracking)}") from None


def model_from_run(run_id: str, tracking: str, scratch: Path) -> str:
    """The model folder of an MLflow run: its `output` param when that folder still holds this run's model,
    else its `model` artifact folder, downloaded into `scratch`."""
    from compress.training import read_lineage

    run = get_run(run_id, tracking)
    output = run.data.params.get("output")
    # a relative output is relative to where the run was started, and a later run may have overwritten the
    # folder: only a folder whose compress.json names this run is this run's model; else the artifact is
    if output and (Path(output) / "config.json").is_file() and read_lineage(output).get("mlflow_run_id") == run_id:
        return output
    client = mlflow_client(tracking)
    if not any(a.path == "model/config.json" for a in client.list_artifacts(run_id, "model")):
        raise CompressError(
            f"--run {run_id}: its output folder {output or '(none)'} is gone and it logged no 'model' artifact"
        )
    import mlflow.artifacts

    scratch.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(scratch),
                                               tracking_uri=tracking)


def load_for_export(path: str, flag: str = "--model", max_length: int | None = None):
    """The classifier in fp32 eval mode and its tokenizer; any model type the Auto classes know, no remote code."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import compress.modeling  # noqa: F401  (registers compress_bert, the class of pruned and shared models)
    from compress.models import load_config, load_tokenizer, load_weights

    config = load_config(path, flag)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise CompressError(
            f"{flag} {path}: has no sequence-classification head to export; fine-tune or distil it first"
        )
    model = load_weights(AutoModelForSequenceClassification, path, flag, trust_remote_code=False, dtype=torch.float32)
    return model.eval(), load_tokenizer(path, flag, model.config, max_length)


def input_names(model, tokenizer) -> list[str]:
    """The inputs the exported graph takes: what the tokenizer produces and the model accepts, in a fixed order."""
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    produced = set(tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return [n for n in INPUT_ORDER if n in accepted and n in produced]


def random_inputs(names: list[str], batch: int, seq: int, vocab_size: int, seed: int, type_vocab: int = 1,
                  pad_rows: bool = True) -> dict:
    """Token ids, a mask with padding at the end of every other row, and token types; int64 torch tensors."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(2, vocab_size), (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad_rows and seq > 2:
        for row in range(1, batch, 2):  # keep [CLS] and one token: a row is never fully masked
            mask[row, 2 + row % (seq - 2):] = 0
    inputs = {"input_ids": ids, "attention_mask": mask,
              "token_type_ids": torch.randint(0, max(1, type_vocab), (batch, seq), generator=gen)}
    return {n: inputs[n] for n in names}


# --- ONNX ---------------------------------------------------------------------------------------------------------


@contextmanager
def quiet_onnx():
    """Hide what the exporter and the quantizer say that users cannot act on (missing torchvision ops, pytree
    deprecations, axis-renaming notes, the pre-processing hint)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "torch.onnx", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def logits_module(model, names: list[str]):
    """A module taking the inputs by name (token_type_ids optional) and returning only the logits."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{n: inputs[n] for n in names}).logits

    return Logits().eval()


def _first_line(err: Exception) -> str:
    """The line that says what went wrong: torch.export's own summary when there is one, without colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        following = lines[lines.index("## Exception summary") + 1:]
        if following:
            return following[0]
    return lines[0] if lines else type(err).__name__


def onnx_session(path: str | Path, *, device: str = "cpu", threads: int | None = None, spinning: bool = True):
    """An onnxruntime session on the CPU or CUDA provider, with an explicit intra-op thread count if given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:  # idle threads stop busy-waiting, so they do not steal cores from the next model timed
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CompressError(f"--device {device}: this onnxruntime has no CUDA provider "
                                f"(available: {', '.join(ort.get_available_providers())})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CompressError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None


def export_onnx(model, tokenizer, path: Path) -> list[str]:
    """Trace `model` with the dynamo exporter at EXAMPLE_SHAPE, batch and sequence dynamic; returns input names."""
    import torch

    names = input_names(model, tokenizer)
    cfg = model.config
    example = random_inputs(names, *EXAMPLE_SHAPE, cfg.vocab_size, seed=0, pad_rows=False)
    batch = torch.export.Dim("batch", min=1, max=65536)
    sequence = torch.export.Dim("sequence", min=1, max=cfg.max_position_embeddings)
    dynamic = {n: {0: batch, 1: sequence} for n in names}
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _ONNX_MAX_BYTES
    with quiet_onnx(), torch.no_grad():
        try:
            program = torch.onnx.export(logits_module(model, names), (), kwargs=example, dynamo=True,
                                        input_names=names, output_names=["logits"], dynamic_shapes=dynamic,
                                        external_data=big, verbose=False)
        except Exception as err:
            raise CompressError(f"--format onnx: the dynamo exporter failed for {type(model).__name__}: "
                                f"{_first_line(err)}") from None
        program.save(str(path), external_data=big)
    return names


def parity(model, onnx_path: Path, names: list[str]) -> dict:
    """Max abs logit difference between PyTorch and onnxruntime on each of PARITY_SHAPES (not the traced shape)."""
    import numpy as np
    import torch

    cfg = model.config
    session = onnx_session(onnx_path)
    diffs = {}
    for i, (batch, seq) in enumerate(PARITY_SHAPES):
        seq = min(seq, cfg.max_position_embeddings)
        inputs = random_inputs(names, batch, seq, cfg.vocab_size, seed=100 + i,
                               type_vocab=getattr(cfg, "type_vocab_size", 1) or 1)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        got = session.run(["logits"], {n: t.numpy() for n, t in inputs.items()})[0]
        if got.shape != expected.shape:
            diffs[f"{batch}x{seq}"] = float("inf")
        else:
            diffs[f"{batch}x{seq}"] = float(np.abs(got - expected).max())
    return diffs


def quantize_int8(fp32: Path, int8: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights, activations quantized per batch at run time.

    Weights get one scale per output channel: on the SST-2 MiniLM-L6 teacher one scale per tensor lost 1.4 points
    of dev accuracy and per channel none, at the same size and speed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnx():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=fp32.stat().st_size > _ONNX_MAX_BYTES or
                         fp32.with_name(fp32.name + ".data").exists())


# --- scoring ------------------------------------------------------------------------------------------------------


def metric_value(metric: str, preds, labels) -> float:
    """GLUE's metrics on integer arrays: accuracy, F1 of class 1 (MRPC/QQP), or Matthews correlation (CoLA)."""
    import numpy as np

    preds, labels = np.asarray(preds), np.asarray(labels)
    if metric == "accuracy":
        return float((preds == labels).mean()) if len(labels) else 0.0
    if metric == "f1":
        tp = float(((preds == 1) & (labels == 1)).sum())
        wrong = float((preds != labels).sum())
        return tp / (tp + 0.5 * wrong) if tp else 0.0
    if metric == "matthews":
        k = int(max(preds.max(initial=0), labels.max(initial=0))) + 1
        confusion = np.zeros((k, k))
        np.add.at(confusion, (labels, preds), 1)
        t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
        denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
        return float((c * s - t @ p) / denom) if denom else 0.0
    raise CompressError(f"unknown metric {metric!r}")


def predict_dev(logits_fn, tokenizer, task, names: list[str], *, max_length: int, batch_size: int) -> list[int]:
    """Argmax predictions for the dev split; `logits_fn(dict of int64 numpy arrays) -> (B, C) array`."""
    import numpy as np

    preds: list[int] = []
    texts = task.dev_texts
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        first = [t[0] for t in chunk]
        second = [t[1] for t in chunk] if len(chunk[0]) > 1 else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        feed = {n: np.asarray(enc[n], dtype=np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                for n in names}
        preds += np.asarray(logits_fn(feed)).argmax(-1).tolist()
    return preds


def torch_logits_fn(model):
    import torch

    def run(feed):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.float().numpy()

    return run


def onnx_logits_fn(path: Path):
    session = onnx_session(path)
    return lambda feed: session.run(["logits"], feed)[0]


# --- lineage and the model card -----------------------------------------------------------------------------------


def source_run_info(run_id: str | None, stores: list[str]) -> dict:
    """Metrics, params, tags and the step count of the model's MLflow run, from the first store that has it."""
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    for uri in dict.fromkeys(s for s in stores if s):
        if not store_exists(uri):
            continue
        try:
            client = mlflow_client(uri)
        except CompressError:  # a store named in the model's record may since have become another tool's file
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        steps = None
        for key in ("epoch", "loss_epoch", "loss_step"):  # Lightning logs these at the global step
            if key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                steps = max(m.step for m in history) + 1 if history else None
                break
        metrics = {k: v for k, v in sorted(run.data.metrics.items()) if k != "epoch"}
        return {"run_id": run_id, "tracking": shown(uri), "experiment_id": run.info.experiment_id, "metrics": metrics,
                "params": dict(run.data.params), "tags": dict(run.data.tags), "steps": steps}
    return {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def model_card(*, name: str, folder: str, model, lineage: dict, run: dict, files: dict[str, dict],
               parity_diffs: dict | None, scores: dict, metric: str | None) -> str:
    """README.md: what the model is, where it came from (teacher, steps, data), its run's metrics, its files."""
    import compress

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
        f"{n_params:,} parameters) for {task or 'its task'}, exported by compress {compress.__version__}.", "",
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


# --- registering --------------------------------------------------------------------------------------------------


@contextmanager
def _tracking_uri(uri: str):
    """Point MLflow's global tracking URI at `uri` for the block, then put back whatever was there (even unset)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(for_mlflow(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register(folder: Path, name: str, *, tracking: str, experiment: str, source: dict, summary: dict) -> dict:
    """Log `folder` as the `model` artifact of a new export run and register runs:/<id>/model as NAME.

    MLflow 3's register_model wants an MLmodel file at a runs:/ path (or a logged model), so one describing the
    folder's formats goes in beside the files; the registered version's source is the artifact folder itself.
    """
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from compress.tracking import _prepare_store, run_tags

    artifacts = _prepare_store(tracking)
    client = mlflow_client(tracking)
    # the model's run can be the parent only in its own store (the record holds the URL with its password hidden)
    same_store = source.get("tracking") == shown(tracking)
    run_id = None
    try:
        tags = run_tags("cpu", "export")
        if same_store:
            exp_id = source["experiment_id"]
            tags |= {"compress.source_run": source["run_id"], "mlflow.parentRunId": source["run_id"]}
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts)
            if source.get("run_id"):
                tags["compress.source_run"] = source["run_id"]
        run_id = client.create_run(exp_id, run_name=f"export {name}", tags=tags).info.run_id
        for key, value in summary["params"].items():
            client.log_param(run_id, key, value)
        for key, value in summary["metrics"].items():
            client.log_metric(run_id, key, float(value))
        client.log_artifacts(run_id, str(folder), "model")
        mlmodel = Model(artifact_path="model", run_id=run_id)
        mlmodel.add_flavor("compress", formats=summary["params"]["formats"].split(","), files=summary["files"])
        with tempfile.TemporaryDirectory() as tmp:
            mlmodel.save(str(Path(tmp) / "MLmodel"))
            client.log_artifact(run_id, str(Path(tmp) / "MLmodel"), "model")
        client.set_terminated(run_id)
        version_tags = {"compress.formats": summary["params"]["formats"]}
        if source.get("run_id"):
            version_tags["compress.source_run"] = source["run_id"]
        with _tracking_uri(tracking):  # register_model has no tracking_uri argument; it reads the global one
            version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=version_tags)
    except MlflowException as err:
        if run_id:
            client.set_terminated(run_id, "FAILED")
        raise CompressError(f"--register {name}: MLflow refused it ({str(err).splitlines()[0]})") from None
    return {"name": version.name, "version": str(version.version), "run_id": run_id, "tracking": shown(tracking)}


# --- the command --------------------------------------------------------------------------------------------------


def export(
    model: str | None = None,
    run: str | None = None,
    format: str = "hf,onnx,int8",
    output: str | None = None,
    register: str | None = None,
    task: str | None = None,
    data: str | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    batch_size: int = 64,
    tracking: str = DEFAULT_TRACKING,
    experiment: str = DEFAULT_EXPERIMENT,
    overwrite: bool = False,
) -> None:
    """Export a trained classifier for deployment: HF weights with a model card, ONNX, and int8 ONNX.

    The ONNX export is checked against PyTorch on batch and sequence sizes other than the traced ones and
    fails (writing nothing) if any logit differs by more than 1e-4. The output folder appears only when
    everything succeeded. The table goes to stderr; stdout gets the same result as one JSON line, for scripts
    (`compress export ... > export.json`).

    Args:
        model: a saved model folder (what distill, finetune, prune or share wrote). Exclusive with --run.
        run: an MLflow run id; its model is the run's output folder, or else its 'model' artifact.
        format: comma-separated formats: hf (safetensors, tokenizer, config, README.md model card),
            onnx (fp32, dynamic batch and sequence), int8 (onnxruntime dynamic quantization of the ONNX).
        output: folder to write (default: outputs/export-MODEL).
        register: also register the export in the MLflow model registry under this name (a new version
            each time), logged as the 'model' artifact of a new export run.
        task: score the export on this task's dev split (fp32, and int8 beside it when made): a GLUE task
            or bbc-news. Exclusive with --data.
        data: score on the dev file of this folder of train and dev files (.tsv, .csv or .jsonl).
        text_column: column(s) holding the text, "a" or "a,b" for pairs.
        label_column: column holding the label.
        max_length: tokens per example when scoring; longer inputs are truncated.
        batch_size: examples per batch when scoring.
        tracking: MLflow tracking URI, for --run, --register and the model card's metrics.
        experiment: MLflow experiment for the export run when the model's own run is not in this store.
        overwrite: replace an existing --output.
    """
    import shutil
    import tempfile

    from compress.finetune import slug

    formats = parse_formats(format)
    if "onnx" in formats or "int8" in formats:
        require_onnx(f"--format {','.join(formats)}")
    if (model is None) == (run is None):
        raise CompressError("give exactly one of --model (a saved model folder) and --run (an MLflow run id)")
    if register is not None and not register.strip():
        raise CompressError("--register: the registered model name is empty")
    check_all(max_length=max_length, batch_size=batch_size)

    from compress.data import load_task
    from compress.models import resolve_model
    from compress.outputs import check_overwrite, check_run_paths
    from compress.training import quiet_libraries, read_lineage

    quiet_libraries()
    task_data = load_task(task, data, text_column=text_column, label_column=label_column) if task or data else None
    scratch = Path(tempfile.mkdtemp(prefix="compress-export-"))
    try:
        if run:
            path = model_from_run(run, tracking, scratch)
            name = get_run(run, tracking).data.params.get("output") or f"run-{run[:8]}"
        else:
            path, name = resolve_model(model, "--model"), model
        out = check_run_paths(output if output is not None else f"outputs/export-{slug(name)}", reads=(path, data),
                              tracking=tracking)  # read for --run and the card's lineage, written by --register
        check_overwrite(out, overwrite)
        net, tokenizer = load_for_export(path, "--run" if run else "--model", max_length)
        if task_data is not None and task_data.num_labels != net.config.num_labels:
            raise CompressError(f"--{'task' if task else 'data'}: {task_data.name} has {task_data.num_labels} labels "
                                f"but the model's head has {net.config.num_labels}")
        lineage = read_lineage(path)
        source = source_run_info(run or lineage.get("mlflow_run_id"), [tracking, lineage.get("tracking")])
        result = _write(out, overwrite, net, tokenizer, formats, lineage, source, task_data, scratch,
                        card_name=register or out.name, max_length=max_length, batch_size=batch_size,
                        origin=f"run {run}" if run else str(model), register_name=register, tracking=tracking,
                        experiment=experiment)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_summary(out, result)
    print(json.dumps(result))


def _write(out: Path, overwrite: bool, net, tokenizer, formats: list[str], lineage: dict, source: dict, task_data,
           scratch: Path, *, card_name: str, max_length: int, batch_size: int, origin: str,
           register_name: str | None, tracking: str, experiment: str) -> dict:
    """Everything that writes, inside the atomic output block: a failure anywhere leaves no --output."""
    from compress.measure import count_params
    from compress.training import atomic_output, write_lineage

    files: dict[str, dict] = {}
    scores: dict[str, float] = {}
    diffs: dict[str, float] | None = None
    names = input_names(net, tokenizer)
    metric = task_data.metric if task_data is not None else None
    with atomic_output(out, overwrite) as tmp:
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
            if "onnx" in formats:
                files["onnx"] = {"file": ONNX_FILE, "mb": _onnx_mb(fp32)}
        if "int8" in formats:
            print(f"quantizing to int8 (onnxruntime dynamic) -> {INT8_FILE}", file=sys.stderr)
            quantize_int8(fp32, tmp / INT8_FILE)
            files["int8"] = {"file": INT8_FILE, "mb": _onnx_mb(tmp / INT8_FILE)}
        if task_data is not None:
            print(f"scoring on {task_data.name} dev ({len(task_data.dev_labels)} rows)", file=sys.stderr)
            kw = dict(max_length=max_length, batch_size=batch_size)
            run_fp32 = onnx_logits_fn(fp32) if fp32 is not None else torch_logits_fn(net)
            scores["fp32"] = metric_value(metric, predict_dev(run_fp32, tokenizer, task_data, names, **kw),
                                          task_data.dev_labels)
            if "int8" in formats:
                scores["int8"] = metric_value(metric, predict_dev(onnx_logits_fn(tmp / INT8_FILE), tokenizer,
                                                                  task_data, names, **kw), task_data.dev_labels)
        summary = {
            "output": str(out), "source": origin, "formats": formats, "files": files, "params": count_params(net),
            "parity_max_abs_diff": diffs, "parity_limit": PARITY_TOL,
            "scores": {"task": task_data.name, "metric": metric, **scores} if task_data is not None else None,
            "source_run": source.get("run_id"),
        }
        card = model_card(name=card_name, folder=out.name, model=net, lineage=lineage, run=source, files=files,
                          parity_diffs=diffs, scores=scores, metric=metric)
        (tmp / "README.md").write_text(card)
        write_lineage(tmp, {**lineage, "label_names": lineage.get("label_names") or
                            [net.config.id2label[i] for i in range(net.config.num_labels)],
                            "export": {k: v for k, v in summary.items() if k != "output"}})
        if register_name:
            metrics = {f"{fmt}_mb": info["mb"] for fmt, info in files.items()}
            metrics |= {f"{k}_score": v for k, v in scores.items()}
            if diffs:
                metrics["parity_max_abs_diff"] = max(diffs.values())
            params = {"formats": ",".join(formats), "source": origin, "source_run": source.get("run_id") or ""}
            if task_data is not None:
                params |= {"task": task_data.name, "metric": metric}
            summary["registered"] = register(
                tmp, register_name, tracking=tracking, experiment=experiment, source=source,
                summary={"params": params, "metrics": metrics, "files": sorted(p.name for p in tmp.iterdir())})
    return summary


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
    if reg := result.get("registered"):
        print(f"  registered as {reg['name']} version {reg['version']} (MLflow run {reg['run_id']} in "
              f"{reg['tracking']})", file=sys.stderr)
