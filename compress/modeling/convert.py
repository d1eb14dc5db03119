"""Converting a standard BERT classifier into CompressBert, weight for weight (no change in the function)."""

from __future__ import annotations

import re

from compress.modeling.configuration_compress_bert import CompressBertConfig
from compress.modeling.modeling_compress_bert import CompressBertForSequenceClassification

# HF BERT sublayer names -> CompressBert's, for layer i
_RENAMES = [
    (r"attention\.self\.(query|key|value)\.", r"attention.{i}.\1."),
    (r"attention\.output\.dense\.", r"attention.{i}.dense."),
    (r"attention\.output\.LayerNorm\.", r"attention.{i}.LayerNorm."),
    (r"intermediate\.dense\.", r"ffn.{i}.intermediate."),
    (r"output\.dense\.", r"ffn.{i}.output."),
    (r"output\.LayerNorm\.", r"ffn.{i}.LayerNorm."),
]
_LAYER = re.compile(r"^(?P<prefix>.*encoder\.)layer\.(?P<i>\d+)\.(?P<rest>.*)$")
# RoBERTa and the models built on it: BERT's layers, position ids counted from the pad id, and the head below
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
# the RoBERTa head (dense, tanh, out_proj on the first token) is BERT's pooler and classifier under other names
_ROBERTA_HEAD = {"classifier.dense.": "bert.pooler.dense.", "classifier.out_proj.": "classifier."}
# what bert_named_state renames to BERT's weight names (what share maps); from_bert also takes its own class
BERT_LIKE_TYPES = ("bert", *ROBERTA_TYPES)
CONVERTIBLE_TYPES = (*BERT_LIKE_TYPES, "compress_bert")


def to_compress_config(config, **changes) -> CompressBertConfig:
    """A CompressBertConfig equal in function to a BERT or RoBERTa-family config (identity maps, full sizes), with
    `changes` (CompressBertConfig's own fields, e.g. attention_map or embedding_size) applied."""
    if isinstance(config, CompressBertConfig):
        return CompressBertConfig.from_dict(config.to_dict() | changes)
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    return CompressBertConfig(**values | changes, roberta_positions=config.model_type in ROBERTA_TYPES)


def rename_key(key: str) -> str:
    m = _LAYER.match(key)
    if not m:
        return key
    for pattern, repl in _RENAMES:
        if re.match(pattern, m["rest"]):
            return m["prefix"] + re.sub(pattern, repl.format(i=m["i"]), m["rest"], count=1)
    raise KeyError(f"unexpected BERT layer weight {key}")


def bert_named_state(model) -> dict:
    """A BERT or RoBERTa-family classifier's state dict in BertForSequenceClassification's names: `bert.` for the
    base model's prefix, and RoBERTa's head as BERT's pooler and classifier. Tensors are shared, not copied."""
    roberta = model.config.model_type in ROBERTA_TYPES
    prefix = model.base_model_prefix + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            key = "bert." + key[len(prefix):]
        if roberta:
            for theirs, ours in _ROBERTA_HEAD.items():
                if key.startswith(theirs):
                    key = ours + key[len(theirs):]
        state[key] = value
    return state


def from_bert(model) -> CompressBertForSequenceClassification:
    """The same classifier as a CompressBertForSequenceClassification: a BERT or RoBERTa-family one
    (CONVERTIBLE_TYPES), whose logits, hidden states and attention maps it keeps."""
    if isinstance(model, CompressBertForSequenceClassification):
        return model
    if model.config.model_type not in CONVERTIBLE_TYPES:
        raise ValueError(f"cannot convert model type {model.config.model_type}: only {', '.join(CONVERTIBLE_TYPES)}")
    config = to_compress_config(model.config)
    config._attn_implementation = "sdpa"
    out = CompressBertForSequenceClassification(config)
    state = {rename_key(key): value for key, value in bert_named_state(model).items()}
    missing, unexpected = out.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k and "token_type_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"cannot convert {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    return out
