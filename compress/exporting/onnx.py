"""ONNX files from a classifier: the dynamo export, parity against torch on new shapes, int8 quantisation and
onnxruntime sessions.

The ONNX file is checked against PyTorch on shapes it was not traced at: the dynamo exporter matched onnxruntime to
1e-8 here, but a graph that silently specialised on the example's batch or sequence length would only show on a new
shape.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from compress.infra.errors import CompressError


ONNX_FILE = "model.onnx"


INT8_FILE = "model.int8.onnx"


PARITY_TOL = 1e-4  # max abs logit difference allowed between PyTorch and onnxruntime (fp32)


EXAMPLE_SHAPE = (2, 16)  # (batch, sequence) of the traced example


PARITY_SHAPES = ((3, 29), (1, 7))  # new batch and sequence sizes, batch 1 included (torch.export may specialise 1)


MASKS_SHAPE = (4, 23)  # one more new shape whose rows are unpadded, right-padded, left-padded and holed: a fused
# graph may read the mask as one length per row (onnxruntime's default for BERT), which is right only for the first two


INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


_ONNX_MAX_BYTES = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph: beyond it weights go external


def require_onnx(flag: str) -> None:
    """onnx, onnxscript (the dynamo exporter's) and onnxruntime, or one line saying how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"{flag}: needs {', '.join(missing)}; pip install onnx onnxscript onnxruntime")


def load_for_export(path: str, flag: str = "--model", max_length: int | None = None):
    """The classifier in fp32 eval mode and its tokenizer; any model type the Auto classes know, no remote code."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import compress.models.compress_bert  # noqa: F401  (registers compress_bert, the class of pruned and shared models)
    from compress.models.loading import load_config, load_tokenizer, load_weights

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
    type_vocab = getattr(cfg, "type_vocab_size", 1) or 1
    cases = {}
    for i, (batch, seq) in enumerate(PARITY_SHAPES):
        seq = min(seq, cfg.max_position_embeddings)
        cases[f"{batch}x{seq}"] = random_inputs(names, batch, seq, cfg.vocab_size, seed=100 + i, type_vocab=type_vocab)
    batch, seq = MASKS_SHAPE[0], min(MASKS_SHAPE[1], cfg.max_position_embeddings)
    if seq >= 8:
        inputs = random_inputs(names, batch, seq, cfg.vocab_size, seed=100 + len(PARITY_SHAPES), type_vocab=type_vocab)
        mask = inputs["attention_mask"]  # row 0 unpadded, row 1 right-padded (random_inputs' odd rows)
        mask[2, :seq // 4] = 0  # left-padded
        mask[3] = 1
        mask[3, seq // 3:seq // 2] = 0  # a hole in the middle
        cases[f"{batch}x{seq} masks"] = inputs
    diffs = {}
    for key, inputs in cases.items():
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        got = session.run(["logits"], {n: t.numpy() for n, t in inputs.items()})[0]
        diffs[key] = float("inf") if got.shape != expected.shape else float(np.abs(got - expected).max())
    return diffs


def quantize_int8(fp32: Path, int8: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights, activations quantized per batch at run time.

    Weights get one scale per output channel: on the SST-2 MiniLM-L6 teacher one scale per tensor lost 1.4 points
    of dev accuracy and per channel none, at the same size and speed.
    """
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnx():
        # DefaultTensorType: ONNX shape inference gives no type to the outputs of onnxruntime's fused operators
        # (Attention, SkipLayerNormalization), and the quantizer stops at the first MatMul that reads one
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=fp32.stat().st_size > _ONNX_MAX_BYTES or
                         fp32.with_name(fp32.name + ".data").exists(),
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
