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


def to_compress_config(config) -> CompressBertConfig:
    """A CompressBertConfig equal in function to a BertConfig (identity maps, full sizes)."""
    if isinstance(config, CompressBertConfig):
        return CompressBertConfig.from_dict(config.to_dict())
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    return CompressBertConfig(**values)


def rename_key(key: str) -> str:
    m = _LAYER.match(key)
    if not m:
        return key
    for pattern, repl in _RENAMES:
        if re.match(pattern, m["rest"]):
            return m["prefix"] + re.sub(pattern, repl.format(i=m["i"]), m["rest"], count=1)
    raise KeyError(f"unexpected BERT layer weight {key}")


def from_bert(model) -> CompressBertForSequenceClassification:
    """The same classifier as a CompressBertForSequenceClassification (BERT-named weights, any BERT-family)."""
    if isinstance(model, CompressBertForSequenceClassification):
        return model
    config = to_compress_config(model.config)
    config._attn_implementation = "sdpa"
    out = CompressBertForSequenceClassification(config)
    prefix = model.base_model_prefix
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            key = "bert." + key[len(prefix) + 1:]
        state[rename_key(key)] = value
    missing, unexpected = out.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k and "token_type_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"cannot convert {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    return out
