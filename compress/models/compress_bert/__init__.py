"""compress's own BERT variant (per-layer sizes, cross-layer sharing), registered with the Auto classes.

Importing this package registers it, so `AutoModelForSequenceClassification.from_pretrained(dir)` loads a
pruned or partly shared model; the code saved beside the weights (auto_map) lets
`from_pretrained(dir, trust_remote_code=True)` load it where compress is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from compress.models.compress_bert.configuration_compress_bert import CompressBertConfig
from compress.models.compress_bert.convert import from_bert, to_compress_config
from compress.models.compress_bert.modeling_compress_bert import (CompressBertForSequenceClassification,
    CompressBertModel)

AutoConfig.register(CompressBertConfig.model_type, CompressBertConfig, exist_ok=True)
AutoModel.register(CompressBertConfig, CompressBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(CompressBertConfig, CompressBertForSequenceClassification, exist_ok=True)
# save_pretrained then writes auto_map into config.json and copies both code files beside the weights
CompressBertConfig.register_for_auto_class()
CompressBertModel.register_for_auto_class("AutoModel")
CompressBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["CompressBertConfig", "CompressBertForSequenceClassification", "CompressBertModel", "from_bert",
           "to_compress_config"]
