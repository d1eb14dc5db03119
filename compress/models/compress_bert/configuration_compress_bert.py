"""Config of a BERT whose layers may differ in size and may share weights: what prune and share produce.

Saved beside the weights (auto_map), so it must import nothing but transformers.
"""

from transformers import BertConfig


class CompressBertConfig(BertConfig):
    """BertConfig plus per-module sizes and a layer -> module map for each sublayer kind.

    attention_heads[j]: heads kept in attention module j (0 is allowed: the sublayer is then just its bias).
    intermediate_sizes[j]: FFN neurons kept in feed-forward module j.
    embedding_size: if set, the word embedding is V x E times E x H (no bias) instead of V x H.
    roberta_positions: position ids count from pad_token_id + 1 over the non-pad tokens, as RoBERTa's (and
    XLM-R's, CamemBERT's) do, instead of from 0; the rest of those models is BERT's, weight for weight.
    projected_embedding_size: if set, the whole embedding block (word, position and type tables, LayerNorm) is this
    wide and `embeddings_project` (a Linear with bias) maps it to hidden_size: ELECTRA-small's layout. Exclusive
    with embedding_size.
    pooler_act: the pooler's activation: tanh (BERT's, RoBERTa's), gelu (ELECTRA's head: dense, gelu, out_proj) or
    relu (DistilBERT's: pre_classifier, ReLU, classifier).
    attention_map[i] / ffn_map[i]: which attention / feed-forward module layer i runs. Identity maps give an
    ordinary (possibly pruned) BERT; repeated entries share one module across layers, as ALBERT does.
    """

    model_type = "compress_bert"

    def __init__(
        self,
        attention_heads: list[int] | None = None,
        intermediate_sizes: list[int] | None = None,
        attention_map: list[int] | None = None,
        ffn_map: list[int] | None = None,
        attention_head_size: int | None = None,
        embedding_size: int | None = None,
        roberta_positions: bool = False,
        projected_embedding_size: int | None = None,
        pooler_act: str = "tanh",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # None: BERT's V x H word embedding; E: factorised into V x E and E x H (ALBERT's idea; compress share)
        self.embedding_size = embedding_size
        self.roberta_positions = roberta_positions
        self.projected_embedding_size = projected_embedding_size
        self.pooler_act = pooler_act
        if embedding_size and projected_embedding_size:
            raise ValueError("embedding_size (a factorised word table) and projected_embedding_size (a narrow "
                             "embedding block) are exclusive")
        layers = self.num_hidden_layers
        self.attention_map = list(attention_map) if attention_map is not None else list(range(layers))
        self.ffn_map = list(ffn_map) if ffn_map is not None else list(range(layers))
        n_attn, n_ffn = max(self.attention_map, default=-1) + 1, max(self.ffn_map, default=-1) + 1
        self.attention_heads = (
            list(attention_heads) if attention_heads is not None else [self.num_attention_heads] * n_attn
        )
        self.intermediate_sizes = (
            list(intermediate_sizes) if intermediate_sizes is not None else [self.intermediate_size] * n_ffn
        )
        # the per-head width stays the parent's after heads are removed
        self.attention_head_size = attention_head_size or self.hidden_size // self.num_attention_heads
        if len(self.attention_map) != layers or len(self.ffn_map) != layers:
            raise ValueError("attention_map and ffn_map need one entry per hidden layer")
        if len(self.attention_heads) != n_attn or len(self.intermediate_sizes) != n_ffn:
            raise ValueError("attention_heads / intermediate_sizes need one entry per module in the maps")
