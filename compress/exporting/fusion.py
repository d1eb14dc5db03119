"""onnxruntime's transformer graph fusions on an exported classifier: Attention, EmbedLayerNormalization,
SkipLayerNormalization and BiasGelu, each one operator in place of the dozen it stands for.

The fusions are pattern matches (`onnxruntime.transformers.optimizer`), and the dynamo exporter's graph does not
match the attention pattern: transformers 5 builds its mask there with a GatherND that no pattern knows. On MiniLM-L6
only SkipLayerNormalization and BiasGelu fused in it, and onnxruntime's session makes those two itself when it loads
a graph. The TorchScript exporter (`dynamo=False`) with eager attention gives the patterns the optimizer knows:
every attention layer fuses, the layers of a pruned model with their own head counts included. That graph passes
the same parity check as the dynamo one (`onnx.parity`: new shapes, masks padded on either side or holed), and one
that fails is never returned.

A fused graph holds com.microsoft operators, so it runs on onnxruntime (CPU or CUDA) only.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compress.exporting.onnx import (_ONNX_MAX_BYTES, EXAMPLE_SHAPE, PARITY_TOL, _first_line, input_names, parity,
                                     quiet_onnx, random_inputs)
from compress.infra.errors import CompressError


FUSE_MODES = ("auto", "on", "off")


ATTENTION_OPS = ("Attention", "MultiHeadAttention")


OPSET = 17  # the first with LayerNormalization as one ONNX operator; the fusions match 14's decomposed form as well


@dataclass
class Fusion:
    """A fused graph that passed parity."""

    ops: dict[str, int]
    """fused operator -> how many (optimize_model's get_fused_operator_statistics, zeros left out)."""
    diffs: dict[str, float]
    """parity: max abs logit difference to PyTorch on each parity shape."""


def check_fuse(mode: str) -> str:
    if mode not in FUSE_MODES:
        raise CompressError(f"--fuse {mode}: use {', '.join(FUSE_MODES[:-1])} or {FUSE_MODES[-1]}")
    return mode


def ops_text(ops: dict[str, int]) -> str:
    """'Attention x6, SkipLayerNormalization x12' or 'nothing'."""
    return ", ".join(f"{op} x{n}" for op, n in ops.items()) or "nothing"


def fused_onnx(model, tokenizer, path: Path, work: Path) -> Fusion:
    """Export `model` for the fusions, fuse it and check it against PyTorch; the graph goes to `path` only if its
    attention fused and parity holds.

    Raises CompressError, in one line, when the export or the optimizer fails, when no attention fused, or when the
    fused graph's logits differ from PyTorch's by more than PARITY_TOL.
    """
    names = input_names(model, tokenizer)
    if sum(p.numel() * p.element_size() for p in model.parameters()) > _ONNX_MAX_BYTES:
        raise CompressError("the model is past protobuf's 2 GB, which the TorchScript exporter cannot write")
    work.mkdir(parents=True, exist_ok=True)
    traced, fused = work / "traced.onnx", work / "fused.onnx"
    try:
        _export_traced(model, names, traced)
        ops = _fuse(traced, fused, model.config)
    except Exception as err:  # the exporter and the optimizer raise whatever their passes raise
        raise CompressError(f"the fusion export failed for {type(model).__name__}: {_first_line(err)}") from None
    if not any(ops.get(op) for op in ATTENTION_OPS):  # the rest onnxruntime's session fuses itself at load
        raise CompressError(f"no attention layer fused (fused: {ops_text(ops)})")
    diffs = parity(model, fused, names)
    worst = max(diffs.values())
    if not worst <= PARITY_TOL:
        raise CompressError(f"the fused graph differs from PyTorch by {worst:.3g} in the logits (limit "
                            f"{PARITY_TOL:g}) at shapes {', '.join(f'{k}: {v:.3g}' for k, v in diffs.items())}")
    shutil.move(str(fused), str(path))
    return Fusion(ops, diffs)


@contextmanager
def _eager_attention(model):
    """transformers' eager attention while tracing: its matmul, scale, mask add, softmax, matmul is the pattern the
    optimizer fuses, where sdpa's trace scales q and k apart and guards the softmax against NaN."""
    previous = getattr(model.config, "_attn_implementation", None)
    switched = False
    if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except (ValueError, ImportError):  # a model without eager attention keeps its own; the fusion count tells
            pass
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(previous)


def _export_traced(model, names: list[str], path: Path) -> None:
    """The TorchScript export at EXAMPLE_SHAPE, batch and sequence dynamic, logits only."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            # output_attentions: compress's own class takes its eager path only when the maps are asked for; the
            # maps are not graph outputs, so the export drops them
            return self.model(**dict(zip(names, inputs)), output_attentions=True).logits

    cfg = model.config
    example = random_inputs(names, *EXAMPLE_SHAPE, cfg.vocab_size, seed=0, pad_rows=False)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with quiet_onnx(), torch.no_grad(), _eager_attention(model):
        torch.onnx.export(Logits().eval(), tuple(example[n] for n in names), str(path), dynamo=False,
                          input_names=names, output_names=["logits"], dynamic_axes=dynamic, opset_version=OPSET)


def _fuse(src: Path, dst: Path, config) -> dict[str, int]:
    """onnxruntime's Python fusions alone (opt_level 0), so nothing specific to this machine's CPU is baked in; the
    session applies its own optimisations when it loads the graph, wherever it runs."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # the mask as given, (batch, sequence): BERT's default turns it into one length per row, which gave logits off by
    # 1.2 on MiniLM-L6 for a left-padded row and for a row with a hole
    options.use_raw_attention_mask(True)
    # compress's own class reshapes to each layer's own head count, which the optimizer reads per layer (0: detect);
    # transformers' BERT reshapes to (-1, head size), so its head count and width must be given
    per_layer = getattr(config, "attention_heads", None) is not None
    heads = 0 if per_layer else getattr(config, "num_attention_heads", 0)
    hidden = 0 if per_layer else getattr(config, "hidden_size", 0)
    with quiet_onnx():
        optimized = optimize_model(str(src), "bert", heads, hidden, optimization_options=options, opt_level=0)
        optimized.save_model_to_file(str(dst))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
