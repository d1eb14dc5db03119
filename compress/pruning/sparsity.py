"""Unstructured magnitude sparsity with torch.nn.utils.prune, and what it honestly buys.

While the masks are on, `weight = weight_orig * weight_mask` is recomputed before each forward, so recovery
training cannot revive a pruned weight. `make_permanent` folds the mask into a plain `weight` before saving:
the checkpoint holds ordinary dense tensors with zeros in them. That is the same size on disk and the same speed
with dense kernels; only a sparse runtime could turn the zeros into speed, so compress claims none.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def sparsifiable(model) -> list[nn.Linear]:
    """The encoder's projection and FFN Linears (embeddings, pooler and classifier stay dense), non-empty only."""
    encoder = model.bert.encoder
    linears = [lin for attn in encoder.attention for lin in (attn.query, attn.key, attn.value, attn.dense)]
    linears += [lin for ffn in encoder.ffn for lin in (ffn.intermediate, ffn.output)]
    return [lin for lin in linears if lin.weight.numel() > 0]


def apply_sparsity(model, ratio: float, scope: str = "layer") -> None:
    """Mask the `ratio` smallest-|w| weights: of each Linear (scope layer), or of all of them at once (global)."""
    if ratio <= 0:
        return
    linears = sparsifiable(model)
    if scope == "global":
        prune.global_unstructured([(lin, "weight") for lin in linears], pruning_method=prune.L1Unstructured,
                                  amount=ratio)
    else:
        for lin in linears:
            prune.l1_unstructured(lin, "weight", amount=ratio)


def make_permanent(model) -> None:
    """Fold every mask into a plain `weight` Parameter (no weight_orig / weight_mask left in the state dict)."""
    for lin in sparsifiable(model):
        if prune.is_pruned(lin):
            prune.remove(lin, "weight")


@torch.no_grad()
def sparsity_of(model) -> float:
    """Fraction of the sparsifiable weights that are zero (masked ones count as zero while masks are on)."""
    total = zeros = 0
    for lin in sparsifiable(model):
        weight = lin.weight_mask if hasattr(lin, "weight_mask") else lin.weight
        total += weight.numel()
        zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0
