"""Structured pruning of CompressBert classifiers: score, choose, slice; plus unstructured sparsity, FLOPs, and the
vocabulary of any BERT-family model (the word-embedding rows and tokenizer entries its task text never uses).

    scores = CRITERIA["taylor"](model, batches)              # importance.py: pluggable criteria
    keep = choose_kept(scores.heads, 0.5, "global")          # plan.py: what goes
    slice_heads(model, keep)                                 # slicing.py: physical removal
    slice_hidden(model, kept_dimensions(HIDDEN_CRITERIA["taylor"](model, batches), 0.25))  # hidden.py: the stream
    prune_vocabulary(model, tokenizer, kept_ids(tokenizer, texts))   # vocab.py: the embedding rows text never uses
"""

from compress.pruning.flops import flops_per_token
from compress.pruning.hidden import HIDDEN_CRITERIA, kept_dimensions, masked_stream, slice_hidden
from compress.pruning.importance import (CRITERIA, Importance, Scores, magnitude_importance, masked, random_importance,
    taylor_importance)
from compress.pruning.plan import choose_kept, parse_drop_layers
from compress.pruning.slicing import drop_layers, slice_heads, slice_neurons
from compress.pruning.sparsity import apply_sparsity, make_permanent, sparsifiable, sparsity_of
from compress.pruning.vocab import count_tokens, dropped_rate, kept_ids, prune_vocabulary, pruned_order, unk_rate

__all__ = ["CRITERIA", "HIDDEN_CRITERIA", "Importance", "Scores", "apply_sparsity", "choose_kept", "count_tokens",
           "drop_layers", "dropped_rate", "flops_per_token", "kept_dimensions", "kept_ids", "magnitude_importance",
           "make_permanent", "masked", "masked_stream", "parse_drop_layers", "prune_vocabulary", "pruned_order",
           "random_importance", "slice_heads", "slice_hidden", "slice_neurons", "sparsifiable", "sparsity_of",
           "taylor_importance", "unk_rate"]
