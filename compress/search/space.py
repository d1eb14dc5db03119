"""The search space: its YAML format, its checks, and the steps and flags a trial's values turn into."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.infra.errors import CompressError

# objective name -> (the step's result metric, direction)
OBJECTIVES = {"score": ("student_score", "maximize"), "params": ("student_params", "minimize"),
              "latency_ms": ("latency_ms", "minimize"), "mb": ("student_mb", "minimize")}
SEARCHED = ("score", "params", "latency_ms")  # what compress search offers; compress auto minimises mb alone
STEPS = ("distill", "prune", "share")
# Flags search sets on every step itself (from its own flags or the chain); never searchable.
MANAGED = ("teacher", "model", "task", "data", "text_column", "label_column", "quoting", "output",
           "tracking", "experiment", "resume", "overwrite")
# Flags of the one-off teacher fine-tuning: the teacher is shared by every trial, so these are fixed per study.
STUDY_LEVEL = ("teacher_epochs", "teacher_lr", "teacher_cache")
PRUNE_SWITCHES = ("heads", "ffn", "hidden", "sparsity", "drop_layers", "vocab")
# Distill's soft-only rows, which a space may draw: unlabelled text on or off ([null, PATH]), augmented copies (counts)
SOFT_ROWS = ("unlabeled", "augment", "augment_model")
VOCAB_CHOICES = ("vocab_corpus", "vocab_top", "vocab_min_count")  # what --vocab keeps: given to a trial with vocab on


# --- the search space -------------------------------------------------------------------------------------------

@dataclass
class Dimension:
    """One space key: a fixed value, a categorical choice (a YAML list) or a range ({low, high, log, step})."""

    key: str
    kind: str  # fixed | choice | int | float
    value: Any = None
    choices: list = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def sample(self, trial) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def values(self) -> list:
        """What it can take, for deciding which steps can run: a range stands for its two ends."""
        if self.kind == "fixed":
            return [self.value]
        return self.choices if self.kind == "choice" else [self.low, self.high]


def step_functions() -> dict:
    from compress.steps.distill import distill
    from compress.steps.prune import prune
    from compress.steps.share import share

    return {"distill": distill, "prune": prune, "share": share}


def step_flags() -> dict[str, dict[str, Any]]:
    """Each step's searchable flags and their defaults, as its command defines them."""
    from compress.options.commands import flag_defaults

    return {name: {flag: default for flag, default in flag_defaults(name).items() if flag not in MANAGED}
            for name in STEPS}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_space(space: dict | str) -> dict:
    """--space as a mapping (inline YAML, or under space: in --config) or as the path of a YAML file holding one."""
    if not isinstance(space, str):
        return space
    path = Path(space)
    if not path.is_file() and (path.suffix in (".yaml", ".yml", ".json") or path.is_dir()):
        # a file's name, mistyped: "neither a mapping nor a YAML file" sent users looking for a YAML mistake
        raise CompressError(f"--space {space}: {'is a folder' if path.is_dir() else 'no such file'}; name a YAML "
                            "file holding the space, or give it inline, e.g. --space '{layers: [3, 4]}'")
    if not path.is_file():  # jsonargparse hands over as text whatever did not parse as a mapping
        raise CompressError(f"--space {space}: neither a mapping nor a YAML file; give it inline, e.g. --space "
                            "'{layers: [3, 4], temperature: {low: 1, high: 8}}', or the path of a YAML file holding it")
    import yaml

    class _OnceEach(yaml.SafeLoader):
        """YAML keeps the last of a key given twice, unsaid: `layers: 2` then `layers: 3` searched 3 alone."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # PyYAML's own check below says so
                    continue
                if key in seen:
                    raise CompressError(f"--space {space}: line {key_node.start_mark.line + 1}: {key!r} is given "
                                        "twice")
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        loaded = yaml.load(path.read_text(), Loader=_OnceEach)  # a SafeLoader: no Python objects
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise CompressError(f"--space {space}: not a readable YAML file ({' '.join(str(err).split())[:200]})") from None
    if isinstance(loaded, dict) and "space" in loaded and "teacher" in loaded:
        raise CompressError(f"--space {space}: this is a whole search config; run it with --config {space}")
    if not isinstance(loaded, dict):
        held = "nothing" if loaded is None else f"a {type(loaded).__name__}"
        raise CompressError(f"--space {space}: the file holds {held}, not a mapping of flags to values, lists "
                            "(choices) or {low, high} ranges")
    return loaded


def parse_space(space: dict, flags: dict[str, dict[str, Any]]) -> dict[str, Dimension]:
    """Check every key and value of the YAML space; raise a one-line CompressError naming the first bad one."""
    if not isinstance(space, dict) or not space:
        raise CompressError("--space: give a mapping of flags to values, lists (choices) or {low, high} ranges")
    valid = sorted(set().union(*flags.values()))
    dims = {}
    for key, spec in space.items():
        step, _, flag = str(key).rpartition(".")
        if step:
            if step not in flags or flag not in flags[step]:
                raise CompressError(f"space: unknown key '{key}': STEP.FLAG needs a step of {', '.join(STEPS)} and "
                                    f"one of its flags")
        elif key in MANAGED:
            raise CompressError(f"space: '{key}' is set by search itself; use compress search's own flag "
                                f"(--teacher, --task/--data, --output, --tracking, --experiment) instead")
        elif key not in valid:
            raise CompressError(f"space: unknown key '{key}'; valid keys (flags of distill, prune and share): "
                                f"{', '.join(valid)}; STEP.FLAG (e.g. prune.lr) sets one step only")
        where = f"space: {key}"
        if isinstance(spec, list):
            if not spec:
                raise CompressError(f"{where}: an empty list of choices")
            bad = [c for c in spec if not (c is None or isinstance(c, (bool, int, float, str)))]
            if bad:
                raise CompressError(f"{where}: choices must be numbers, strings, booleans or null, not {bad[0]!r} "
                                    "(write a list of layers as a string, e.g. '0,3')")
            dim = Dimension(key, "choice", choices=list(spec))
        elif isinstance(spec, dict):
            unknown = sorted(set(spec) - {"low", "high", "log", "step"})
            if unknown or "low" not in spec or "high" not in spec:
                raise CompressError(f"{where}: a range is {{low, high}} with optional log and step"
                                    + (f", not {', '.join(map(str, unknown))}" if unknown else ""))
            low, high, log, step_ = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
            if not (_is_number(low) and _is_number(high)) or not low < high:
                raise CompressError(f"{where}: low and high must be numbers with low < high (got {low!r}, {high!r})")
            if not isinstance(log, bool):
                raise CompressError(f"{where}: log must be true or false")
            if log and low <= 0:
                raise CompressError(f"{where}: a log range needs low > 0")
            if step_ is not None and (log or not _is_number(step_) or step_ <= 0):
                raise CompressError(f"{where}: step must be a positive number, and cannot go with log")
            kind = "int" if all(isinstance(v, int) for v in (low, high)) and isinstance(step_ or 1, int) else "float"
            dim = Dimension(key, kind, low=low, high=high, log=log, step=step_)
        elif spec is None or isinstance(spec, (bool, int, float, str)):
            dim = Dimension(key, "fixed", value=spec)
        else:
            raise CompressError(f"{where}: give a value, a list of choices or a {{low, high}} range")
        if flag in STUDY_LEVEL and dim.kind != "fixed":
            raise CompressError(f"{where}: the teacher is fine-tuned once per study, so {flag} takes one fixed value")
        dims[key] = dim
    _check_values(dims)
    _check_steps(dims)
    _check_soft_rows(dims)
    return dims


def _step_values(values: dict, step: str, flags: dict[str, dict[str, Any]]) -> dict:
    """The flags `values` sets for `step`: plain keys the step has, then STEP.FLAG keys, which win."""
    out = {k: v for k, v in values.items() if "." not in k and k in flags[step] and k not in STUDY_LEVEL}
    out |= {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(step + ".")}
    return out


def _runs(step: str, kwargs: dict) -> bool:
    if step == "distill":
        return kwargs.get("layers") is not None
    if step == "prune":
        return any(kwargs.get(k) not in (None, 0, 0.0, "", "0") for k in PRUNE_SWITCHES)
    return kwargs.get("groups") is not None


def _can_run(dims: dict[str, Dimension], step: str) -> tuple[bool, bool]:
    """(some trial runs `step`, some trial skips it)."""
    keys = {"distill": ("layers",), "prune": PRUNE_SWITCHES, "share": ("groups",)}[step]
    found = [d for d in dims.values() if d.key.rpartition(".")[2] in keys and d.key.rpartition(".")[0] in ("", step)]
    on, off = [], []
    for d in found:
        flag = d.key.rpartition(".")[2]
        on.append(any(_runs(step, {flag: v}) for v in d.values()))
        # a drawn float is never exactly 0: a range can turn its step off only if it is all zeros
        off.append(any(not _runs(step, {flag: v}) for v in d.values()) if d.kind in ("fixed", "choice")
                   else not _runs(step, {flag: d.high}))
    return any(on), all(off)


def _share_values(dims: dict[str, Dimension], flags: dict, flag: str) -> list:
    """What share's `flag` can be in a trial: its space key (share.FLAG winning over FLAG), else share's default."""
    for key in (f"share.{flag}", flag):
        if key in dims:
            return dims[key].values()
    return [flags["share"][flag]]


def _check_share_fits(config, dims: dict[str, Dimension], flags: dict) -> None:
    """Refuse a space whose share step cannot take the teacher's model type (every step keeps it): seconds now
    rather than one failed trial after another."""
    from compress.models.compress_bert.convert import HEAD_ACT, to_compress_config

    if config.model_type not in HEAD_ACT or not _can_run(dims, "share")[0]:
        return
    # share all is refused only where a trial can share the teacher's type itself: after a prune it is compress's
    if "all" in _share_values(dims, flags, "share") and _can_run(dims, "prune")[1]:
        raise CompressError(f"space: share all writes an ALBERT, whose head is tanh where the {config.model_type} "
                            f"teacher's is {HEAD_ACT[config.model_type]}; set share to attention or ffn (or a list "
                            "of those)")
    narrow = to_compress_config(config).projected_embedding_size  # ELECTRA-small's embedding block
    if narrow and any(e is not None for e in _share_values(dims, flags, "embedding")):
        raise CompressError(f"space: embedding: the ELECTRA teacher's embeddings are already {narrow} wide and "
                            f"projected to {config.hidden_size}; leave embedding out or null")


def _values(dim: Dimension) -> list:
    """The values a dimension can take that bound checks can judge: its value, choices, or a range's two ends."""
    values = [dim.value] if dim.kind == "fixed" else dim.choices if dim.kind == "choice" else [dim.low, dim.high]
    return [v for v in values if _is_number(v)]


def _check_values(dims: dict[str, Dimension]) -> None:
    """A value the command would refuse fails here, in a second, not trial after trial once the study (and its
    name) exist. The bounds are the commands' own (compress.flags)."""
    from compress.options.bounds import BOUNDS, CHOICES, finite

    for key, dim in dims.items():
        flag = key.rpartition(".")[2]
        bound = BOUNDS.get(flag)
        bad = [v for v in _values(dim) if bound and not (finite(v) and bound.ok(v))]  # YAML's .inf, .nan
        if bad:
            raise CompressError(f"space: {key}: {bad[0]!r} is out of range; {flag} must be {bound.text}")
        words = CHOICES.get(flag)
        odd = [v for v in _given(dim) if words and v is not None and v not in words]  # None: the step is off
        if odd:
            raise CompressError(f"space: {key}: {odd[0]!r} is not one of {flag}'s values ({', '.join(words)})")


def _given(dim: Dimension) -> list:
    """The values a fixed or choice dimension names, whatever their type (a range's are numbers)."""
    return [dim.value] if dim.kind == "fixed" else list(dim.choices) if dim.kind == "choice" else []


def _check_depths(config, dims: dict[str, Dimension], whose: str = "teacher's", layers: bool = True) -> None:
    """Sizes no trial can have: a student or a group count deeper than the model the students are cut from
    (`whose`: the teacher, or the space's student), layers to drop that it has not (a student has fewer still),
    inputs longer than its positions. `layers=False` checks the positions alone (a teacher that is not cut)."""
    from compress.models.loading import max_tokens

    positions = max_tokens(config)
    for key, dim in dims.items():
        if key.rpartition(".")[2] == "max_length" and positions and (long := [v for v in _values(dim)
                                                                               if v > positions]):
            raise CompressError(f"space: {key}: {long[0]!r} is more than the {whose} {positions} positions")
    if layers:
        _check_layer_counts(config.num_hidden_layers, dims, whose)


def _check_layer_counts(layers: int, dims: dict[str, Dimension], whose: str) -> None:
    from compress.pruning import parse_drop_layers

    for key, dim in dims.items():
        flag = key.rpartition(".")[2]
        if flag == "drop_layers":
            for value in _given(dim):
                try:
                    parse_drop_layers(value, layers)
                except CompressError as err:
                    raise CompressError(f"space: {key}: {err}") from None
        if flag in ("layers", "groups") and (deep := [v for v in _values(dim) if v > layers]):
            raise CompressError(f"space: {key}: {deep[0]!r} is more than the {whose} {layers} layers")


def _check_steps(dims: dict[str, Dimension]) -> None:
    """Refuse a space in which no trial runs a step, or one whose vocab_* keys no trial would use."""
    if not any(_can_run(dims, step)[0] for step in STEPS):
        raise CompressError("space: no trial would run a step; set layers (distill), heads, ffn, sparsity or "
                            "drop_layers or vocab (prune), or groups (share)")
    vocab = [d for k, d in dims.items() if k.rpartition(".")[2] == "vocab" and k.rpartition(".")[0] in ("", "prune")]
    given = [k for k in dims if k.rpartition(".")[2] in VOCAB_CHOICES]
    if given and not any(v for d in vocab for v in d.values()):
        raise CompressError(f"space: {given[0]} chooses what prune's vocab keeps, and no trial has vocab on; add "
                            "vocab: true (or [false, true]: it applies to the trials that draw true)")


def plan(values: dict, flags: dict[str, dict[str, Any]]) -> list[tuple[str, dict]]:
    """The steps a trial's values ask for, in order, each with the flags it gets."""
    steps = []
    for step in STEPS:
        kwargs = _step_values(values, step, flags)
        if _runs(step, kwargs):
            if step == "prune":  # a null ratio means "not this kind of pruning": the flag's default (none)
                kwargs = {k: v for k, v in kwargs.items() if not (k in PRUNE_SWITCHES and v is None)}
                if not kwargs.get("vocab"):  # the vocab_* flags choose what --vocab keeps; prune refuses them alone
                    kwargs = {k: v for k, v in kwargs.items() if k not in VOCAB_CHOICES}
            steps.append((step, kwargs))
    return steps


def with_logit_cache(step: str, kwargs: dict, values: dict, flags: dict[str, dict[str, Any]]) -> dict:
    """A step that learns from the study's teacher with no hidden-state or attention loss reads the teacher's logits
    from disk: every trial has the same teacher and rows, so only the first such trial runs the teacher. A space
    that sets cache_teacher itself (true or false) is left as it is."""
    def get(k):
        return kwargs.get(k, flags[step].get(k, 0))

    if "cache_teacher" in kwargs or get("alpha_hidden") or get("alpha_attn"):
        return kwargs
    # the study's teacher folder (a STUDY_LEVEL flag, so not among the step's own flags) holds the logits too
    return kwargs | {"cache_teacher": True, "teacher_cache": kwargs.get("teacher_cache", values.get(
        "teacher_cache", flags[step]["teacher_cache"]))}


def _check_soft_rows(dims: dict[str, Dimension]) -> None:
    """Distill's soft-only rows: unlabeled names a file of unlabelled texts, drawn on or off as [null, PATH], and
    those keys need a trial that distils. A missing file fails here, not in trial after trial."""
    for key, dim in dims.items():
        if key.rpartition(".")[2] != "unlabeled":
            continue
        odd = [v for v in _given(dim) if v is not None and not (isinstance(v, str) and Path(v).expanduser().is_file())]
        if dim.kind not in ("fixed", "choice") or odd:
            shown = f"{odd[0]!r} is not a file" if odd else "a range is no file"
            raise CompressError(f"space: {key}: {shown}; give the file of unlabelled texts, or [null, PATH] to draw "
                                "it on or off")
    given = [k for k in dims if k.rpartition(".")[2] in SOFT_ROWS]
    if given and not _can_run(dims, "distill")[0]:
        raise CompressError(f"space: {given[0]} adds rows to distill's training, and no trial distils; set layers")


def describe(step: str, kwargs: dict, flags: dict[str, dict[str, Any]]) -> str:
    """A step the way its command names its run: `distill L3 T=4`, `prune h0.5-f0.3`, `share all-g2-e128`; a distill
    that learns from unlabelled text or augmented copies says so (`distill L3 T=4 +unlabeled +augment2`)."""
    def get(k):
        return kwargs.get(k, flags[step].get(k))

    if step == "distill":
        return (f"distill L{get('layers')} T={get('temperature'):.3g}" + (" +unlabeled" if get("unlabeled") else "")
                + (f" +augment{get('augment')}" if get("augment") else ""))
    if step == "prune":
        dropped, sparsity, hidden = get("drop_layers"), get("sparsity"), get("hidden")
        return (f"prune h{get('heads'):.3g}-f{get('ffn'):.3g}" + (f"-w{hidden:.3g}" if hidden else "")
                + (f"-d{dropped}" if dropped else "")
                + (f"-s{sparsity:.3g}" if sparsity else "") + ("-v" if get("vocab") else ""))
    embedding = get("embedding")
    return f"share {get('share')}-g{get('groups')}" + (f"-e{embedding}" if embedding else "")


def step_epochs(step: str, kwargs: dict, flags: dict[str, dict[str, Any]]) -> int:
    key = "epochs" if step == "distill" else "recover_epochs"
    return int(kwargs.get(key, flags[step][key]))
