"""Converting a standard BERT classifier into CompressBert, weight for weight (no change in the function)."""

from __future__ import annotations

import re

from compress.models.compress_bert.configuration_compress_bert import CompressBertConfig
from compress.models.compress_bert.modeling_compress_bert import CompressBertForSequenceClassification

# BERT's sublayers (names after `encoder.layer.<i>.`) -> CompressBert's `<kind>.<part>`, run as `<kind>.<i>.<part>`
_TO_COMPRESS = {"attention.self.query": "attention.query", "attention.self.key": "attention.key",
                "attention.self.value": "attention.value", "attention.output.dense": "attention.dense",
                "attention.output.LayerNorm": "attention.LayerNorm", "intermediate.dense": "ffn.intermediate",
                "output.dense": "ffn.output", "output.LayerNorm": "ffn.LayerNorm"}
_LAYER = re.compile(r"^(?P<prefix>.*encoder\.)layer\.(?P<i>\d+)\.(?P<sub>.+)\.(?P<tensor>\w+)$")
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
    """A BERT-named weight's name in CompressBert with identity maps (`encoder.layer.3.output.dense.weight` ->
    `encoder.ffn.3.output.weight`); names outside the layers are the same in both."""
    m = _LAYER.match(key)
    if not m:
        return key
    if m["sub"] not in _TO_COMPRESS:
        raise KeyError(f"unexpected BERT layer weight {key}")
    kind, part = _TO_COMPRESS[m["sub"]].split(".")
    return f"{m['prefix']}{kind}.{m['i']}.{part}.{m['tensor']}"


def layer_modules(model) -> list[dict[str, str]]:
    """Per encoder layer of `model` (one of BERT_LIKE_TYPES, or an unshared CompressBert), each BERT sublayer name
    (`attention.self.query`, ...) -> the path of the module that is that sublayer in `model`."""
    base, layers = model.base_model_prefix, range(model.config.num_hidden_layers)
    if model.config.model_type == "distilbert":
        return [{bert: f"{base}.transformer.layer.{i}.{theirs}" for theirs, bert in _DISTIL.items()} for i in layers]
    if model.config.model_type == "compress_bert":  # module i is layer i's (is_unshared)
        return [{bert: f"{base}.encoder.{ours.replace('.', f'.{i}.', 1)}" for bert, ours in _TO_COMPRESS.items()}
                for i in layers]
    return [{bert: f"{base}.encoder.layer.{i}.{bert}" for bert in _TO_COMPRESS} for i in layers]


def bert_named_state(model) -> dict:
    """A classifier of BERT_LIKE_TYPES, or an unshared CompressBert, as a state dict in
    BertForSequenceClassification's names: `bert.` for the base model's prefix, RoBERTa's, ELECTRA's and
    DistilBERT's heads as BERT's pooler and classifier, ERNIE's task embedding folded into the token-type table,
    DistilBERT's layers under BERT's names with one zero token-type row, and CompressBert's modules as the layers
    they are. ELECTRA's `embeddings_project` (when it has one) stays as `bert.embeddings_project`. Tensors are
    shared, not copied, except ERNIE's folded table and DistilBERT's zero row. A pruned CompressBert's layers keep
    their own sizes."""
    head = model.config.model_type in _HEAD_TYPES
    if model.config.model_type == "compress_bert" and not is_unshared(model.config):
        raise ValueError("a CompressBert that shares modules or factorises its word table has no BERT layer names")
    # each layer's modules by their BERT names, whatever the model calls them
    to_bert = {path: f"bert.encoder.layer.{i}.{sub}"
               for i, layer in enumerate(layer_modules(model)) for sub, path in layer.items()}
    prefix = model.base_model_prefix + "."
    state = {}
    for key, value in model.state_dict().items():
        module, tensor = key.rsplit(".", 1)
        if module in to_bert:
            key = f"{to_bert[module]}.{tensor}"
        elif key.startswith(prefix):
            key = "bert." + key[len(prefix):]
        if head:
            for theirs, ours in _HEAD.items():
                if key.startswith(theirs):
                    key = ours + key[len(theirs):]
        state[key] = value
    if model.config.model_type == "distilbert":  # no token types: one zero row, added to every token as in BERT
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
