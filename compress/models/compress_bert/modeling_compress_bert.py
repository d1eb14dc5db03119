"""A BERT encoder with per-module head counts and FFN widths, and optional cross-layer sharing.
RoBERTa-family classifiers convert too: they are BERT with other position ids and the same head under other names;
so do ELECTRA (a narrow embedding block projected to the hidden size, a gelu head), ERNIE (BERT plus a task
embedding that compress never varies) and DistilBERT (BERT's layers under other names, no token types, a ReLU head).

transformers 5 dropped `prune_heads` and ignores `head_mask`, and BertConfig cannot describe layers of
different sizes, so pruned and partially shared models need this class. Embeddings and pooler are BERT's own,
so weights convert one to one. Saved beside the weights (auto_map): imports nothing but torch and transformers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler

try:
    from .configuration_compress_bert import CompressBertConfig
except ImportError:  # loaded as a top-level module (trust_remote_code copies files flat)
    from configuration_compress_bert import CompressBertConfig


class CompressAttention(nn.Module):
    """Multi-head self-attention with `heads` heads of width `head_size`, plus BERT's output projection and norm."""

    def __init__(self, config: CompressBertConfig, heads: int) -> None:
        super().__init__()
        self.heads, self.head_size = heads, config.attention_head_size
        inner = heads * self.head_size
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)
        self.dense = nn.Linear(inner, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, want_probs: bool):
        # hidden: (B, S, H); mask: (B, 1, 1, S) additive (0 or -inf-like), or None when nothing is padded
        if self.heads == 0:  # every head pruned: the sublayer contributes only its output bias
            out = self.dense.bias.expand_as(hidden)
            return self.LayerNorm(self.dropout(out) + hidden), None
        b, s, _ = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, s, self.heads, self.head_size).transpose(1, 2)  # (B, A, S, D)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        dropout = self.attn_dropout if self.training else 0.0
        if want_probs:  # eager path: the attention maps themselves are wanted (attention transfer)
            scores = q @ k.transpose(-1, -2) / self.head_size**0.5  # (B, A, S, S)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, dropout, self.training) @ v
        else:
            probs = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                                 dropout_p=dropout)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_size)  # (B, S, A*D)
        return self.LayerNorm(self.dropout(self.dense(ctx)) + hidden), probs


class CompressFeedForward(nn.Module):
    def __init__(self, config: CompressBertConfig, width: int) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, width)
        self.output = nn.Linear(width, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.output(self.act(self.intermediate(hidden)))) + hidden)


class CompressBertEncoder(nn.Module):
    def __init__(self, config: CompressBertConfig) -> None:
        super().__init__()
        self.attention_map, self.ffn_map = list(config.attention_map), list(config.ffn_map)
        self.attention = nn.ModuleList(CompressAttention(config, h) for h in config.attention_heads)
        self.ffn = nn.ModuleList(CompressFeedForward(config, w) for w in config.intermediate_sizes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, want_hidden: bool, want_probs: bool):
        all_hidden = [hidden] if want_hidden else None
        all_probs = [] if want_probs else None
        for a, f in zip(self.attention_map, self.ffn_map):
            hidden, probs = self.attention[a](hidden, mask, want_probs)
            hidden = self.ffn[f](hidden)
            if want_hidden:
                all_hidden.append(hidden)
            if want_probs:
                all_probs.append(probs)
        return hidden, all_hidden, all_probs


class FactorisedEmbedding(nn.Module):
    """A V x H word embedding stored as V x E (`embed`) times E x H (`project`, no bias), as in ALBERT."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=padding_idx)
        self.project = nn.Linear(embedding_size, hidden_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.embed(input_ids))  # (B, S) -> (B, S, E) -> (B, S, H)


def roberta_position_ids(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, pad: int) -> torch.Tensor:
    """RoBERTa's position ids: pad + 1, pad + 2, ... over the real tokens, `pad` on padding. Computed on the device,
    with no read back to the host. From embeddings alone the padding is unknown, so every token counts, as in
    RoBERTa."""
    if input_ids is None:
        b, s = inputs_embeds.shape[:2]
        return torch.arange(pad + 1, pad + 1 + s, device=inputs_embeds.device).expand(b, s)
    real = input_ids.ne(pad).int()  # (B, S)
    return (real.cumsum(dim=1) * real).long() + pad  # (B, S)


class CompressBertPreTrainedModel(PreTrainedModel):
    config_class = CompressBertConfig
    base_model_prefix = "bert"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            module.token_type_ids.zero_()


class CompressBertModel(CompressBertPreTrainedModel):
    def __init__(self, config: CompressBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        narrow = getattr(config, "projected_embedding_size", None)
        if narrow:  # ELECTRA-small's layout: every table and the LayerNorm E wide, then E -> H
            embedding_config = copy.copy(config)
            embedding_config.hidden_size = narrow
            self.embeddings = BertEmbeddings(embedding_config)
            self.embeddings_project = nn.Linear(narrow, config.hidden_size)
        else:
            self.embeddings = BertEmbeddings(config)
            self.embeddings_project = None
        if getattr(config, "embedding_size", None):  # factorised word embedding; position and type stay H wide
            self.embeddings.word_embeddings = FactorisedEmbedding(config.vocab_size, config.embedding_size,
                                                                  config.hidden_size, config.pad_token_id)
        self.encoder = CompressBertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        if self.pooler is not None and getattr(config, "pooler_act", "tanh") != "tanh":
            self.pooler.activation = ACT2FN[config.pooler_act]  # ELECTRA's gelu, DistilBERT's relu
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        if position_ids is None and self.config.roberta_positions:
            position_ids = roberta_position_ids(input_ids, inputs_embeds, self.config.pad_token_id)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds)
        if self.embeddings_project is not None:
            hidden = self.embeddings_project(hidden)  # (B, S, E) -> (B, S, H)
        # (B, S) 1/0 -> (B, 1, 1, S) additive, in the activations' dtype so bf16 stays bf16. No mask (nothing padded)
        # stays None, which lets SDPA pick its flash kernel.
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        last, all_hidden, all_probs = self.encoder(hidden, mask, bool(output_hidden_states), bool(output_attentions))
        pooled = self.pooler(last) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_probs) if all_probs is not None else None,
        )


class CompressBertForSequenceClassification(CompressBertPreTrainedModel):
    def __init__(self, config: CompressBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = CompressBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        # A converted RoBERTa, ELECTRA or DistilBERT head (dense, its activation, out_proj on the first token) is this
        # pooler and classifier; RoBERTa's and ELECTRA's also drop out the pooler's input in training.
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, C)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
