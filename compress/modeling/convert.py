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
# CompressBert's module names -> BERT's layer names, when module j is layer j's (identity maps)
_MODULE = re.compile(r"^(?P<prefix>.*encoder\.)(?P<kind>attention|ffn)\.(?P<j>\d+)\.(?P<sub>\w+)\.(?P<tensor>\w+)$")
_BACK = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
         "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
         "attention.LayerNorm": "attention.output.LayerNorm", "ffn.intermediate": "intermediate.dense",
         "ffn.output": "output.dense", "ffn.LayerNorm": "output.LayerNorm"}
# RoBERTa and the models built on it: BERT's layers, position ids counted from the pad id, and the head below
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
# The RoBERTa head (dense, tanh, out_proj on the first token) is BERT's pooler and classifier under other names;
# so is ELECTRA's, with gelu for tanh, and DistilBERT's (pre_classifier, ReLU, classifier), with ReLU.
_HEAD = {"classifier.dense.": "bert.pooler.dense.", "classifier.out_proj.": "classifier.",
         "pre_classifier.": "bert.pooler.dense."}
_HEAD_TYPES = (*ROBERTA_TYPES, "electra", "distilbert")
# The heads whose activation is not BERT's tanh (CompressBertConfig.pooler_act); ALBERT cannot hold them.
HEAD_ACT = {"electra": "gelu", "distilbert": "relu"}
# DistilBERT is BERT without token types, under other names: its layer i at `transformer.layer.<i>.`
_DISTIL_LAYER = re.compile(r"^bert\.transformer\.layer\.(?P<i>\d+)\.(?P<sub>.+)\.(?P<tensor>weight|bias)$")
_DISTIL = {"attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
           "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
           "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense", "ffn.lin2": "output.dense",
           "output_layer_norm": "output.LayerNorm"}
# DistilBERT's config under BertConfig's names (its LayerNorm eps is fixed in its code)
_DISTIL_CONFIG = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                  "attention_dropout": "attention_probs_dropout_prob", "seq_classif_dropout": "classifier_dropout"}
# ERNIE is BERT plus a task-type embedding added to every token (task_type_ids are all 0 unless a caller passes
# them, and compress never does), so its row 0 folds into every token-type row.
_TASK_TYPE = "bert.embeddings.task_type_embeddings.weight"
# what bert_named_state renames to BERT's weight names (what share maps); from_bert also takes its own class, and
# so does bert_named_state when nothing in it is shared (is_unshared): a pruned model
BERT_LIKE_TYPES = ("bert", "ernie", "electra", "distilbert", *ROBERTA_TYPES)
CONVERTIBLE_TYPES = (*BERT_LIKE_TYPES, "compress_bert")


def is_unshared(config) -> bool:
    """A CompressBertConfig whose layers each run their own modules and whose word table is whole: what prune writes
    from a BERT, which share can map (its layers may differ in size)."""
    layers = list(range(config.num_hidden_layers))
    return config.attention_map == layers and config.ffn_map == layers and not config.embedding_size


def to_compress_config(config, **changes) -> CompressBertConfig:
    """A CompressBertConfig equal in function to a config of BERT_LIKE_TYPES (identity maps, full sizes), with
    `changes` (CompressBertConfig's own fields, e.g. attention_map or embedding_size) applied."""
    if isinstance(config, CompressBertConfig):
        return CompressBertConfig.from_dict(config.to_dict() | changes)
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "use_task_id",
                "task_type_vocab_size"):
        values.pop(key, None)
    if config.model_type == "electra":
        # ELECTRA's embedding_size is the width of its whole embedding block, not a factorised word table
        narrow = values.pop("embedding_size")
        values |= {"projected_embedding_size": narrow if narrow != config.hidden_size else None}
    if config.model_type == "distilbert":
        # one token type whose row is zero stands in for DistilBERT's none (H parameters more); a sinusoidal
        # position table is copied as it is, and then trains like BERT's
        values = {_DISTIL_CONFIG.get(k, k): v for k, v in values.items()
                  if k not in ("qa_dropout", "sinusoidal_pos_embds")}
        values |= {"type_vocab_size": 1, "layer_norm_eps": 1e-12}
    if config.model_type in HEAD_ACT:
        values["pooler_act"] = HEAD_ACT[config.model_type]
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
    """A classifier of BERT_LIKE_TYPES, or an unshared CompressBert, as a state dict in
    BertForSequenceClassification's names: `bert.` for the base model's prefix, RoBERTa's, ELECTRA's and
    DistilBERT's heads as BERT's pooler and classifier, ERNIE's task embedding folded into the token-type table,
    DistilBERT's layers under BERT's names with one zero token-type row, and CompressBert's modules as the layers
    they are. ELECTRA's `embeddings_project` (when it has one) stays as `bert.embeddings_project`. Tensors are
    shared, not copied, except ERNIE's folded table and DistilBERT's zero row. A pruned CompressBert's layers keep
    their own sizes."""
    head = model.config.model_type in _HEAD_TYPES
    compress = model.config.model_type == "compress_bert"
    distil = model.config.model_type == "distilbert"
    if compress and not is_unshared(model.config):
        raise ValueError("a CompressBert that shares modules or factorises its word table has no BERT layer names")
    prefix = model.base_model_prefix + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            key = "bert." + key[len(prefix):]
        m = _MODULE.match(key) if compress else None
        if m:
            key = f"{m['prefix']}layer.{m['j']}.{_BACK[m['kind'] + '.' + m['sub']]}.{m['tensor']}"
        m = _DISTIL_LAYER.match(key) if distil else None
        if m:
            key = f"bert.encoder.layer.{m['i']}.{_DISTIL[m['sub']]}.{m['tensor']}"
        if head:
            for theirs, ours in _HEAD.items():
                if key.startswith(theirs):
                    key = ours + key[len(theirs):]
        state[key] = value
    if distil:  # no token types: one zero row, which BERT's embeddings add to every token
        word = state["bert.embeddings.word_embeddings.weight"]
        state["bert.embeddings.token_type_embeddings.weight"] = word.new_zeros(1, word.shape[1])  # (1, H)
    if _TASK_TYPE in state:
        task = state.pop(_TASK_TYPE)[0]  # (H,): what every token gets with task_type_ids 0
        types = "bert.embeddings.token_type_embeddings.weight"
        state[types] = state[types] + task  # (T, H)
    return state


def from_bert(model) -> CompressBertForSequenceClassification:
    """The same classifier as a CompressBertForSequenceClassification: one of CONVERTIBLE_TYPES, whose logits, hidden
    states and attention maps it keeps (an ERNIE's as long as no task_type_ids other than 0 are passed)."""
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
