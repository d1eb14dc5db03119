"""How much each attention head and FFN neuron matters: small pluggable criteria over a CompressBert classifier.

A criterion is any callable `(model, batches) -> Scores`; a new one is a few lines. Shapes: B batch, S sequence,
A heads of a module, D head width, W FFN width of a module, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Scores:
    """heads[j]: (A_j,) importance of attention module j's heads; neurons[j]: (W_j,) of FFN module j's neurons.

    Higher means more important. Modules, not layers: a module shared by several layers is scored once.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]


Importance = Callable[..., Scores]  # (model, batches) -> Scores


@contextmanager
def masked(model, head_masks: list[torch.Tensor], neuron_masks: list[torch.Tensor]):
    """Multiply each head's context and each FFN neuron's activation by its mask entry, inside the block.

    transformers 5 ignores `head_mask`, so the mask goes in as forward pre-hooks: on attention module j's output
    projection `dense`, whose input (B, S, A_j * D) is the heads' contexts side by side, and on FFN module j's
    `output`, whose input (B, S, W_j) is the activated neurons. A zero entry is exactly the same function as slicing
    that head or neuron out (tested), and the gradient of the loss with respect to a ones mask is Michel et al.'s
    head importance.
    """
    encoder = model.bert.encoder
    handles = []

    def scale_heads(mask: torch.Tensor, head_size: int):
        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype).repeat_interleave(head_size),)  # (B, S, A*D)

        return hook

    def scale_neurons(mask: torch.Tensor):
        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype),)  # (B, S, W)

        return hook

    try:
        for attn, mask in zip(encoder.attention, head_masks, strict=True):
            handles.append(attn.dense.register_forward_pre_hook(scale_heads(mask, attn.head_size)))
        for ffn, mask in zip(encoder.ffn, neuron_masks, strict=True):
            handles.append(ffn.output.register_forward_pre_hook(scale_neurons(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def mask_gradients(model, masks: list[torch.Tensor], batches: Iterable[dict], applied) -> list[torch.Tensor]:
    """Each mask's accumulated |dL/dmask| over `batches`, with the masks applied by the context manager `applied`.

    L is the task cross-entropy on each batch's labels. Runs where the model is (a GPU when the caller put it
    there), in eval mode so dropout does not add noise to the estimate. A mask no layer reaches stays zero.
    """
    device = _device(model)
    totals = [torch.zeros_like(m) for m in masks]
    was_training = model.training
    # Only the masks need gradients; freezing the weights keeps autograd from building (and storing) theirs.
    grad_state = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    seen = 0
    try:
        with applied:
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items()
                          if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
                grads = torch.autograd.grad(model(**inputs).loss, masks, allow_unused=True)
                for total, grad in zip(totals, grads):
                    if grad is not None:  # None for a module no layer reaches
                        total += grad.abs()
                seen += 1
    finally:
        for p, flag in zip(model.parameters(), grad_state):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("taylor importance needs at least one batch")
    return [t.detach() for t in totals]


def taylor_importance(model, batches: Iterable[dict], normalise: bool = True) -> Scores:
    """Accumulated |dL/dmask| over `batches` for every head and neuron (Michel et al. 2019, first-order Taylor).

    With `normalise`, each module's scores are divided by their L2 norm, as Michel et al. do before ranking across
    layers: otherwise a layer with small gradients everywhere would lose all its heads under --scope global.
    """
    device = _device(model)
    encoder = model.bert.encoder
    head_masks = [torch.ones(a.heads, device=device, requires_grad=True) for a in encoder.attention]
    neuron_masks = [torch.ones(f.output.in_features, device=device, requires_grad=True) for f in encoder.ffn]
    totals = mask_gradients(model, head_masks + neuron_masks, batches, masked(model, head_masks, neuron_masks))
    if normalise:
        totals = [t / t.norm().clamp_min(1e-12) if t.numel() else t for t in totals]
    n = len(head_masks)
    return Scores(heads=totals[:n], neurons=totals[n:])


@torch.no_grad()
def magnitude_importance(model, batches: Iterable[dict] | None = None) -> Scores:
    """L2 norm of every weight a head or neuron owns; needs no data.

    A head owns D rows of each of query, key and value and the same D columns of `dense`; a neuron owns one row of
    `intermediate` and one column of `output`. Biases are left out, as in most magnitude pruning.
    """
    encoder = model.bert.encoder
    heads = []
    for attn in encoder.attention:
        a, d, h = attn.heads, attn.head_size, attn.dense.out_features
        sq = sum(lin.weight.float().pow(2).view(a, d, h).sum(dim=(1, 2)) for lin in (attn.query, attn.key, attn.value))
        sq = sq + attn.dense.weight.float().pow(2).view(h, a, d).sum(dim=(0, 2))  # (A,)
        heads.append(sq.sqrt())
    neurons = [(f.intermediate.weight.float().pow(2).sum(dim=1) + f.output.weight.float().pow(2).sum(dim=0)).sqrt()
               for f in encoder.ffn]  # (W,)
    return Scores(heads=heads, neurons=neurons)


def random_importance(model, batches: Iterable[dict] | None = None, *, seed: int = 0) -> Scores:
    """Uniform random scores from `seed`: the baseline any real criterion has to beat."""
    generator = torch.Generator().manual_seed(seed)
    encoder = model.bert.encoder
    return Scores(heads=[torch.rand(a.heads, generator=generator) for a in encoder.attention],
                  neurons=[torch.rand(f.output.in_features, generator=generator) for f in encoder.ffn])


CRITERIA: dict[str, Importance] = {
    "taylor": taylor_importance,
    "magnitude": magnitude_importance,
    "random": random_importance,
}
