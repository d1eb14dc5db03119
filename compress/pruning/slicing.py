"""Physical removal from a CompressBert classifier: the saved model really has fewer parameters and FLOPs.

Heads are sliced out of query/key/value (rows) and `dense` (columns), neurons out of `intermediate` (rows) and
`output` (columns), and the config's per-module sizes follow, so save_pretrained / from_pretrained round-trip.
Each function changes the model in place and returns it.
"""

from __future__ import annotations

import torch
from torch import nn


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only rows (dim=0, output features) or columns (dim=1, input features) `index`."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            # output rows take their own biases; removing input columns leaves the bias whole
            new.bias.copy_(linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach())
    new.train(linear.training)
    return new


def slice_heads(model, keep: list[list[int]]):
    """Keep only heads keep[j] of attention module j (one list per module; [] leaves just the output bias)."""
    encoder = model.bert.encoder
    if len(keep) != len(encoder.attention):
        raise ValueError(f"{len(keep)} keep lists for {len(encoder.attention)} attention modules")
    for attn, heads in zip(encoder.attention, keep):
        d = attn.head_size
        # head h owns features h*D .. h*D+D-1 of q/k/v's output and of dense's input
        index = torch.tensor([h * d + k for h in heads for k in range(d)], dtype=torch.long)
        attn.query, attn.key, attn.value = (_slice_linear(lin, index, 0) for lin in (attn.query, attn.key, attn.value))
        attn.dense = _slice_linear(attn.dense, index, 1)
        attn.heads = len(heads)
    model.config.attention_heads = [len(h) for h in keep]
    return model


def slice_neurons(model, keep: list[list[int]]):
    """Keep only neurons keep[j] of FFN module j."""
    encoder = model.bert.encoder
    if len(keep) != len(encoder.ffn):
        raise ValueError(f"{len(keep)} keep lists for {len(encoder.ffn)} FFN modules")
    for ffn, neurons in zip(encoder.ffn, keep):
        index = torch.tensor(neurons, dtype=torch.long)
        ffn.intermediate = _slice_linear(ffn.intermediate, index, 0)
        ffn.output = _slice_linear(ffn.output, index, 1)
    model.config.intermediate_sizes = [len(n) for n in keep]
    return model


def drop_layers(model, layers: list[int]):
    """Remove whole layers (0-based); modules no remaining layer uses go too, and the maps are renumbered.

    Works for shared modules (a module stays while any remaining layer uses it).
    """
    if not layers:
        return model
    config, encoder = model.config, model.bert.encoder
    kept = [i for i in range(config.num_hidden_layers) if i not in set(layers)]
    if not kept:
        raise ValueError("cannot drop every layer")
    for kind, sizes in (("attention", "attention_heads"), ("ffn", "intermediate_sizes")):
        old_map = getattr(config, f"{kind}_map")
        layer_map = [old_map[i] for i in kept]
        used = sorted(set(layer_map))
        renumber = {old: new for new, old in enumerate(used)}
        modules = getattr(encoder, kind)
        setattr(encoder, kind, nn.ModuleList(modules[m] for m in used))
        setattr(config, sizes, [getattr(config, sizes)[m] for m in used])
        new_map = [renumber[m] for m in layer_map]
        setattr(config, f"{kind}_map", new_map)
        setattr(encoder, f"{kind}_map", list(new_map))
    config.num_hidden_layers = len(kept)
    return model
