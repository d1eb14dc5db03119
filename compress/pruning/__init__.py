"""Structured pruning of CompressBert classifiers: score, choose, slice; plus unstructured sparsity and FLOPs.

    scores = CRITERIA["taylor"](model, batches)              # importance.py: pluggable criteria
    keep = choose_kept(scores.heads, 0.5, "global")          # plan.py: what goes
    slice_heads(model, keep)                                 # slicing.py: physical removal
"""

from compress.pruning.flops import flops_per_token
from compress.pruning.importance import (CRITERIA, Importance, Scores, magnitude_importance, masked, random_importance,
    taylor_importance)
from compress.pruning.plan import choose_kept, parse_drop_layers
from compress.pruning.slicing import drop_layers, slice_heads, slice_neurons
from compress.pruning.sparsity import apply_sparsity, make_permanent, sparsifiable, sparsity_of

__all__ = ["CRITERIA", "Importance", "Scores", "apply_sparsity", "choose_kept", "drop_layers", "flops_per_token",
           "magnitude_importance", "make_permanent", "masked", "parse_drop_layers", "random_importance",
           "slice_heads", "slice_neurons", "sparsifiable", "sparsity_of", "taylor_importance"]
