"""Attention masks that never make a training step wait for the GPU.

Before every forward pass, transformers 5 asks whether a 2D padding mask has any padding (`padding_mask.all()` in
masking_utils), so that it can drop the mask when nothing is padded. On a GPU that question is a host sync: two a step
in distillation, one for the student and one for the teacher. The collator that padded the batch on the CPU already
knows the answer, and says it ("padded"). The model then gets no mask when nothing is padded, which is what
transformers itself would do and which leaves SDPA free to pick its flash kernel. Otherwise it gets the 4D mask that
transformers would have built, and transformers uses a 4D mask exactly as given.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

# Implementations whose 4D mask we build: a boolean "may attend" mask for SDPA, and an additive one for eager
# attention, which adds it to the scores. Any other implementation (flash-attention, flex) gets the 2D mask as before.
_BUILT = ("sdpa", "eager")


def for_model(model: nn.Module, attention_mask: torch.Tensor, padded: bool | None) -> torch.Tensor | None:
    """The mask to pass to `model` for a (B, S) 1/0 `attention_mask`.

    `padded` says whether any row of the batch is padded, worked out before it left the CPU. None means it is not
    known, and the 2D mask is passed on for transformers to check."""
    if padded is None:
        return attention_mask
    if not padded:
        return None
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if config.model_type == "compress_bert" or impl not in _BUILT or not _takes_4d(model):
        return attention_mask  # compress_bert builds its own mask without a sync; others keep transformers' path
    b, s = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): every query may attend to the row's real keys
    if impl == "eager":
        # eager adds the mask to the scores, in the dtype transformers uses: that of the embeddings' output, which
        # is the weights' dtype (a bf16 teacher's is bf16; an autocast student's stays fp32)
        dtype = model.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        keep = torch.where(keep, zero, torch.finfo(dtype).min)
    return keep.expand(b, 1, s, s)  # (B, 1, S, S), a view, as transformers' own masks are


def _takes_4d(model: nn.Module) -> bool:
    """Whether the model's code builds its mask with transformers' masking_utils, which uses a 4D mask as given. A
    family with a mask rule of its own (DeBERTa's get_attention_mask takes 2D or 3D masks) keeps the 2D one."""
    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "create_bidirectional_mask")
