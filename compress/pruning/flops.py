"""FLOPs per token of a BERT classifier, analytically from its config (1 multiply-add = 2 FLOPs).

Counted: the q/k/v and output projections, the attention scores QKᵀ and the weighted sum over values (these two
grow with the sequence length S), the FFN, the pooler and classifier (once per sequence, so divided by S), and
ELECTRA-small's projection of its narrow embeddings to the hidden size.
Not counted: embedding lookups, softmax, GELU, LayerNorm and residual adds, a few percent of the total, which
pruning shrinks less than proportionally; that is one reason measured speed-ups fall short of 1 / flops_ratio.
"""

from __future__ import annotations


def flops_per_token(config, seq: int = 128) -> float:
    """For a BertConfig or a CompressBertConfig (per-layer head counts and FFN widths, shared modules run per layer)."""
    from compress.models.compress_bert import to_compress_config

    c = to_compress_config(config)
    hidden, head_size = c.hidden_size, c.attention_head_size
    total = 0.0
    for a, f in zip(c.attention_map, c.ffn_map):
        inner = c.attention_heads[a] * head_size
        total += 2 * hidden * inner * 3  # query, key, value
        total += 2 * seq * inner * 2  # scores q·k over S keys, then the weighted sum of S values
        total += 2 * inner * hidden  # output projection
        total += 2 * hidden * c.intermediate_sizes[f] * 2  # FFN in and out
    total += (2 * hidden * hidden + 2 * hidden * c.num_labels) / seq  # pooler and classifier on [CLS]
    if c.projected_embedding_size:
        total += 2 * c.projected_embedding_size * hidden  # embeddings_project, E -> H
    return total
