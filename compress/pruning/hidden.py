"""Hidden-size pruning: remove the same residual-stream dimensions everywhere in a CompressBert classifier.

Every module that reads or writes the residual stream loses those dimensions: the embedding tables (or the
projection that makes the stream: ELECTRA's `embeddings_project`, ALBERT's factorised `project`) and their
LayerNorm; each attention's q/k/v inputs, output projection rows and LayerNorm; each FFN's input, output rows and
LayerNorm; the pooler (in and out) and the classifier's input. Head width and FFN width stay as they are.

Unlike a head or a neuron, a residual dimension also takes part in every LayerNorm's mean and variance, so cutting
it changes the function even when its weights are small: the cut is only ever approximate, and recovery by
distillation is what brings the accuracy back. Shapes: H hidden, B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from compress.pruning.importance import mask_gradients
from compress.pruning.slicing import _slice_linear


def stream_writers(model) -> list[nn.Module]:
    """The modules whose output is the residual stream (B, S, H): where the embeddings hand it over, and every
    sublayer's closing LayerNorm. A shared module is listed once; it writes the stream each time it runs."""
    bert = model.bert
    first = bert.embeddings_project if bert.embeddings_project is not None else bert.embeddings
    encoder = bert.encoder
    return [first, *(a.LayerNorm for a in encoder.attention), *(f.LayerNorm for f in encoder.ffn)]


@contextmanager
def masked_stream(model, mask: torch.Tensor):
    """Multiply the residual stream by `mask` (H,) wherever it is written, so a zero entry silences that dimension
    for every reader. The gradient of the loss with respect to a ones mask is the first-order (Taylor) importance
    of each dimension, as CoFi's hidden mask gives."""

    def hook(module, args, output):
        return output * mask.to(output.dtype)  # (B, S, H) * (H,)

    handles = [m.register_forward_hook(hook) for m in stream_writers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def taylor_hidden(model, batches: Iterable[dict]) -> torch.Tensor:
    """(H,) accumulated |dL/dmask| of each residual dimension over `batches` (task cross-entropy, eval mode)."""
    mask = torch.ones(model.config.hidden_size, device=next(model.parameters()).device, requires_grad=True)
    (total,) = mask_gradients(model, [mask], batches, masked_stream(model, mask))
    return total


def _stream_weights(model) -> list[tuple[torch.Tensor, int]]:
    """Every weight that holds residual dimensions, with the axis they lie along."""
    bert, encoder = model.bert, model.bert.encoder
    emb = bert.embeddings
    if bert.embeddings_project is not None:  # the narrow embedding block is not the stream; its projection writes it
        tensors = [(bert.embeddings_project.weight, 0)]
    else:
        word = emb.word_embeddings
        tensors = [(word.project.weight, 0) if hasattr(word, "project") else (word.weight, 1),
                   (emb.position_embeddings.weight, 1), (emb.token_type_embeddings.weight, 1),
                   (emb.LayerNorm.weight, 0)]
    for attn in encoder.attention:
        tensors += [(attn.query.weight, 1), (attn.key.weight, 1), (attn.value.weight, 1), (attn.dense.weight, 0),
                    (attn.LayerNorm.weight, 0)]
    for ffn in encoder.ffn:
        tensors += [(ffn.intermediate.weight, 1), (ffn.output.weight, 0), (ffn.LayerNorm.weight, 0)]
    if bert.pooler is not None:
        tensors += [(bert.pooler.dense.weight, 0), (bert.pooler.dense.weight, 1)]
    tensors.append((model.classifier.weight, 1))
    return [(t, axis) for t, axis in tensors if t.numel()]


@torch.no_grad()
def magnitude_hidden(model, batches: Iterable[dict] | None = None) -> torch.Tensor:
    """(H,) summed squared weight of each residual dimension across every tensor that holds it; needs no data.

    Each tensor's per-dimension sums are divided by their mean first, so that a 30k-row word table does not outvote
    the layers, and a LayerNorm gain counts as much as a projection.
    """
    total = torch.zeros(model.config.hidden_size)
    for weight, axis in _stream_weights(model):
        squares = weight.float().pow(2)
        per_dim = (squares.sum(dim=1 - axis) if squares.dim() == 2 else squares).cpu()  # (H,)
        total += per_dim / per_dim.mean().clamp_min(1e-12)
    return total


def random_hidden(model, batches: Iterable[dict] | None = None, *, seed: int = 0) -> torch.Tensor:
    """(H,) uniform random scores from `seed`: the baseline."""
    return torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


HIDDEN_CRITERIA = {"taylor": taylor_hidden, "magnitude": magnitude_hidden, "random": random_hidden}


def kept_dimensions(scores: torch.Tensor, ratio: float, multiple: int = 1) -> list[int]:
    """The residual dimensions (ascending) left when `ratio` of them go, the least important first. The number
    kept is rounded up to a multiple of `multiple` (matrix kernels run fastest on widths that are multiples of 8)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio {ratio} outside [0, 1)")
    width = scores.numel()
    keep = max(1, width - round(ratio * width))
    keep = min(width, -(-keep // multiple) * multiple)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return sorted(order[:keep].tolist())


def _slice_embedding(emb: nn.Embedding, index: torch.Tensor) -> nn.Embedding:
    new = nn.Embedding(emb.num_embeddings, len(index), padding_idx=emb.padding_idx, device=emb.weight.device,
                       dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(emb.weight.detach().index_select(1, index))
    return new


def _slice_norm(norm: nn.LayerNorm, index: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(index), eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight.detach().index_select(0, index))
        new.bias.copy_(norm.bias.detach().index_select(0, index))
    return new


def slice_hidden(model, keep: list[int]):
    """Keep only residual dimensions `keep` everywhere (see the module's docstring); the config's hidden_size
    follows, so save_pretrained / from_pretrained round-trip. Changes `model` in place and returns it."""
    if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= model.config.hidden_size:
        raise ValueError(f"keep must be distinct dimensions in 0..{model.config.hidden_size - 1}")
    index = torch.tensor(sorted(keep), dtype=torch.long)
    bert, encoder = model.bert, model.bert.encoder
    emb = bert.embeddings
    if bert.embeddings_project is not None:
        bert.embeddings_project = _slice_linear(bert.embeddings_project, index, 0)
    else:
        word = emb.word_embeddings
        if hasattr(word, "project"):  # factorised: V x E stays, E x H loses rows
            word.project = _slice_linear(word.project, index, 0)
        else:
            emb.word_embeddings = _slice_embedding(word, index)
        emb.position_embeddings = _slice_embedding(emb.position_embeddings, index)
        emb.token_type_embeddings = _slice_embedding(emb.token_type_embeddings, index)
        emb.LayerNorm = _slice_norm(emb.LayerNorm, index)
    for attn in encoder.attention:
        attn.query, attn.key, attn.value = (_slice_linear(lin, index, 1) for lin in (attn.query, attn.key, attn.value))
        attn.dense = _slice_linear(attn.dense, index, 0)
        attn.LayerNorm = _slice_norm(attn.LayerNorm, index)
    for ffn in encoder.ffn:
        ffn.intermediate = _slice_linear(ffn.intermediate, index, 1)
        ffn.output = _slice_linear(ffn.output, index, 0)
        ffn.LayerNorm = _slice_norm(ffn.LayerNorm, index)
    if bert.pooler is not None:
        bert.pooler.dense = _slice_linear(_slice_linear(bert.pooler.dense, index, 0), index, 1)
    model.classifier = _slice_linear(model.classifier, index, 1)
    # the head width (attention_head_size) is stored in the config, so it stays the parent's
    model.config.hidden_size = len(index)
    # where each kept dimension was in the first parent's stream (not saved: it means something only beside that
    # parent), for distillation from it to start its hidden-state map there
    before = getattr(model, "hidden_kept", None)
    model.hidden_kept = [before[i] for i in index.tolist()] if before is not None else index.tolist()
    return model
