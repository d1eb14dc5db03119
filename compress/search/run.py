"""compress search: Optuna over the whole recipe, scored on accuracy against size (or speed) together.

One trial runs the steps its parameters name, through the commands' own functions:
  teacher (fine-tuned once per study when it has no classifier) -> distill (when `layers` is set)
  -> prune (when heads, ffn, sparsity or drop_layers is non-zero) -> share (when `groups` is set)
MLflow: one parent run per study, one nested run per trial carrying the final student's metrics under distill's
names, and the steps' own runs nested under their trial. At the end the Pareto front goes onto the parent run as a
CSV and a plot, and to the terminal as a table. Optuna keeps the study in an RDB (sqlite under mlruns/ by default),
so the same --study resumes, several processes share it, and a trial whose worker died is failed and retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.infra.errors import CompressError, Terminated, stop_said
from compress.options.bounds import check_all
from compress.infra.paths import check_folder, check_output
from compress.infra.identity import slug
from compress.infra.signals import CtrlC, release_frames, sigterm_raises, stops_held_between_trials, stops_raise
from compress.infra.tracking import (DEFAULT_EXPERIMENT, DEFAULT_TRACKING, _prepare_store, mlflow_client,
    resolve_tracking, shown, where_to_look)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# how a spawned worker's exit code (errors.stop_said) says it was stopped
STOPPED_BY = {stop_said(kind())[1]: kind for kind in (KeyboardInterrupt, Terminated)}
# objective name -> (metric in compress.json, direction)
OBJECTIVES = {"score": ("student_score", "maximize"), "params": ("student_params", "minimize"),
              "latency_ms": ("latency_ms", "minimize")}
STEPS = ("distill", "prune", "share")
# Flags search sets on every step itself (from its own flags or the chain); never searchable.
MANAGED = ("teacher", "model", "student", "task", "data", "text_column", "label_column", "output", "tracking",
           "experiment", "resume", "overwrite")
# Flags of the one-off teacher fine-tuning: the teacher is shared by every trial, so these are fixed per study.
STUDY_LEVEL = ("teacher_epochs", "teacher_lr", "teacher_cache")
PRUNE_SWITCHES = ("heads", "ffn", "sparsity", "drop_layers")
SAMPLERS = ("auto", "nsga2", "tpe", "random")
PRUNERS = ("median", "hyperband", "none")


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
    """Each step's searchable flags and their defaults, read from the command's own signature."""
    import inspect

    return {name: {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.name not in MANAGED}
            for name, fn in step_functions().items()}


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


def _check_depths(config, dims: dict[str, Dimension]) -> None:
    """Sizes no trial can have: a student or a group count deeper than the teacher, layers to drop that the teacher
    has not (a student has fewer still), inputs longer than its positions."""
    from compress.models.loading import max_tokens
    from compress.pruning import parse_drop_layers

    layers, positions = config.num_hidden_layers, max_tokens(config)
    for key, dim in dims.items():
        flag = key.rpartition(".")[2]
        if flag == "drop_layers":
            for value in _given(dim):
                try:
                    parse_drop_layers(value, layers)
                except CompressError as err:
                    raise CompressError(f"space: {key}: {err}") from None
        if flag in ("layers", "groups") and (deep := [v for v in _values(dim) if v > layers]):
            raise CompressError(f"space: {key}: {deep[0]!r} is more than the teacher's {layers} layers")
        if flag == "max_length" and positions and (long := [v for v in _values(dim) if v > positions]):
            raise CompressError(f"space: {key}: {long[0]!r} is more than the teacher's {positions} positions")


def _check_steps(dims: dict[str, Dimension]) -> None:
    """Refuse a space in which no trial runs a step."""
    if not any(_can_run(dims, step)[0] for step in STEPS):
        raise CompressError("space: no trial would run a step; set layers (distill), heads, ffn, sparsity or "
                            "drop_layers (prune), or groups (share)")


def plan(values: dict, flags: dict[str, dict[str, Any]]) -> list[tuple[str, dict]]:
    """The steps a trial's values ask for, in order, each with the flags it gets."""
    steps = []
    for step in STEPS:
        kwargs = _step_values(values, step, flags)
        if _runs(step, kwargs):
            if step == "prune":  # a null ratio means "not this kind of pruning": the flag's default (none)
                kwargs = {k: v for k, v in kwargs.items() if not (k in PRUNE_SWITCHES and v is None)}
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


def describe(step: str, kwargs: dict, flags: dict[str, dict[str, Any]]) -> str:
    """A step the way its command names its run: `distill L3 T=4`, `prune h0.5-f0.3`, `share all-g2-e128`."""
    def get(k):
        return kwargs.get(k, flags[step].get(k))

    if step == "distill":
        return f"distill L{get('layers')} T={get('temperature'):.3g}"
    if step == "prune":
        dropped, sparsity = get("drop_layers"), get("sparsity")
        return (f"prune h{get('heads'):.3g}-f{get('ffn'):.3g}" + (f"-d{dropped}" if dropped else "")
                + (f"-s{sparsity:.3g}" if sparsity else ""))
    embedding = get("embedding")
    return f"share {get('share')}-g{get('groups')}" + (f"-e{embedding}" if embedding else "")


def step_epochs(step: str, kwargs: dict, flags: dict[str, dict[str, Any]]) -> int:
    key = "epochs" if step == "distill" else "recover_epochs"
    return int(kwargs.get(key, flags[step][key]))


# --- one trial --------------------------------------------------------------------------------------------------

@dataclass
class Context:
    """Everything a worker process needs to run trials (pickled into spawned workers)."""

    study: str
    storage: str
    objectives: list[str]
    space: dict
    sampler: str
    pruner: str
    sampler_seed: int | None
    heartbeat: int
    retries: int
    teacher: str
    teacher_path: str
    task: str | None
    data: str | None
    text_column: str | None
    label_column: str
    output: str
    tracking: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    progress: bool = False
    trials: int = 10  # this run's trials: sizes the samplers' random start


class _OffsetTrial:
    """A trial whose report() steps continue across a trial's steps: distill's epochs 0-1, then prune's 2-3.

    PyTorchLightningPruningCallback reports the fit's own epoch; each step is a new fit starting at epoch 0.
    """

    def __init__(self, trial, offset: int) -> None:
        self._trial, self._offset = trial, offset

    def report(self, value: float, step: int) -> None:
        self._trial.report(value, step + self._offset)

    def __getattr__(self, name: str):
        return getattr(self._trial, name)


def close_runs(tracking: str, run_id: str | None, status: str) -> None:
    """End a trial's MLflow run and any step run under it still marked running (its process died or was pruned)."""
    if not run_id:
        return
    client = mlflow_client(tracking)
    try:
        run = client.get_run(run_id)
    except Exception:  # the run is gone or the store moved: nothing to close
        return
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    for child in children:
        if child.info.status == "RUNNING" or (status == "KILLED" and child.info.status == "FAILED"):
            client.set_terminated(child.info.run_id, status)
    client.set_terminated(run_id, status)


def trial_metrics(first: dict, last: dict) -> dict[str, float]:
    """The final student's metrics against the original teacher (the first step's teacher).

    A later step's own teacher_* values describe the step's input (the distilled student), so they are replaced.
    """
    out = {k: v for k, v in last.items()
           if not k.startswith("teacher_") and k not in ("retention", "compression", "speedup")}
    for key in ("teacher_score", "teacher_params", "teacher_latency_ms"):
        if key in first:
            out[key] = first[key]
    if out.get("teacher_score"):
        out["retention"] = out["student_score"] / out["teacher_score"]
    if out.get("teacher_params"):
        out["compression"] = out["teacher_params"] / out["student_params"]
    if out.get("teacher_latency_ms") and out.get("latency_ms"):
        out["speedup"] = out["teacher_latency_ms"] / out["latency_ms"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def retried_from(trial) -> int | None:
    """The number of the dead worker's trial this one retries (Optuna 5's Trial has no system_attrs; FrozenTrial
    has)."""
    from optuna.trial import TrialState

    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    frozen = [t for t in running if t.number == trial.number]
    return frozen[0].system_attrs.get("failed_trial") if frozen else None


def objective(trial, ctx: Context, dims: dict[str, Dimension], flags: dict[str, dict[str, Any]]):
    """One trial (run_trial); a stop anywhere in it marks it interrupted, so the next run of the study re-runs its
    values first. Marked only where the steps run, a stop while the trial sampled or opened its MLflow run left it
    an ordinary failure, never re-run."""
    try:
        with stops_raise():  # and one held back since the last trial, as this one starts
            return run_trial(trial, ctx, dims, flags)
    except KeyboardInterrupt:  # Optuna fails the trial and re-raises; requeue_interrupted finds the mark
        with contextlib.suppress(Exception):
            trial.set_user_attr("interrupted", True)
        raise


def run_trial(trial, ctx: Context, dims: dict[str, Dimension], flags: dict[str, dict[str, Any]]):
    """Sample, run the steps through the commands, log the trial's run; return the objectives' values."""
    import optuna
    from mlflow.entities import Metric, Param

    from compress.engine.run import run_hooks

    values = {key: dim.sample(trial) for key, dim in dims.items()}
    steps = plan(values, flags)
    recipe = " -> ".join(describe(s, kw, flags) for s, kw in steps) or "nothing"
    trial.set_user_attr("recipe", recipe)
    trial.set_user_attr("worker", os.getpid())
    names = [s for s, _ in steps]
    if not steps:
        reason = "its values run no step"
        trial.set_user_attr("skipped", reason)
        print(f"trial {trial.number}: {recipe}: skipped, {reason}", file=sys.stderr)
        raise optuna.TrialPruned(reason)
    trial.set_user_attr("mlflow_run_id", "")  # a retried trial inherits its dead original's attributes
    retry_of, rerun_of = retried_from(trial), trial.user_attrs.get("rerun_of")
    title = f"trial {trial.number}" + (f" (retry of {retry_of})" if retry_of is not None else
                                       f" (rerun of interrupted trial {rerun_of})" if rerun_of is not None else "")
    print(f"{title}: {recipe}", file=sys.stderr)

    client = mlflow_client(ctx.tracking)
    run = client.create_run(ctx.experiment_id, run_name=f"{title}: {recipe}", tags={
        "mlflow.parentRunId": ctx.parent_run_id, "compress.command": "search-trial", "optuna.study": ctx.study,
        "optuna.trial": str(trial.number), "compress.steps": ",".join(names)})
    run_id = run.info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    params = {k: "" if v is None else v for k, v in values.items()} | {"recipe": recipe, "steps": ",".join(names)}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    single = len(ctx.objectives) == 1
    folder = Path(ctx.output) / f"trial-{trial.number:03d}"
    model, first, last, offset, status, stopped = ctx.teacher_path, None, None, 0, "FAILED", False
    functions = step_functions()
    try:
        for step, kwargs in steps:
            # the folder name shows in the next step's run name: "prune trial3-distill h0.5-f0.3 taylor/layer"
            out = folder / f"trial{trial.number}-{step}"
            callbacks = []
            if single:  # per-epoch val_score reaches the pruner; multi-objective studies cannot prune
                from optuna_integration import PyTorchLightningPruningCallback

                callbacks.append(PyTorchLightningPruningCallback(_OffsetTrial(trial, offset), monitor="val_score"))
            source = {"teacher": model} if step == "distill" else {"model": model}
            if model == ctx.teacher_path:  # a later step learns from this trial's own model: nothing to share
                kwargs = with_logit_cache(step, kwargs, values, flags)
            tags = {"mlflow.parentRunId": run_id, "optuna.study": ctx.study, "optuna.trial": str(trial.number)}
            with run_hooks(callbacks=callbacks, tags=tags, progress=ctx.progress):
                functions[step](**source, task=ctx.task, data=ctx.data, text_column=ctx.text_column,
                                label_column=ctx.label_column, output=str(out), tracking=ctx.tracking,
                                experiment=ctx.experiment, overwrite=True, **kwargs)
            lineage = json.loads((out / "compress.json").read_text())
            first, last = first or lineage["metrics"], lineage["metrics"]
            trial.set_user_attr("metric", lineage.get("metric", "score"))
            model, offset = str(out), offset + step_epochs(step, kwargs, flags)
        metrics = trial_metrics(first, last)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        client.log_param(run_id, "model", model)
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("model", model)
        status = "FINISHED"
        return tuple(metrics[OBJECTIVES[o][0]] for o in ctx.objectives)
    except optuna.TrialPruned:
        status = "KILLED"
        client.set_tag(run_id, "compress.pruned", "true")
        raise
    except KeyboardInterrupt:
        status, stopped = "KILLED", True
        raise
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
        client.set_tag(run_id, "compress.error", f"{type(err).__name__}: {err}"[:5000])
        raise
    finally:
        close_after(stopped, lambda: close_runs(ctx.tracking, run_id, status))


def close_after(stopped: bool, close) -> None:
    """Close MLflow runs; after a Ctrl-C, at best. A Ctrl-C that cut an MLflow write leaves SQLite locked, and the
    error from closing would replace the KeyboardInterrupt: Optuna would take it for a failed trial and go on to
    the next, so the study ran on after the user stopped it. The runs stay RUNNING in MLflow instead."""
    if stopped:
        release_frames(sys.exc_info()[1])  # a Ctrl-C inside an MLflow query left SQLite locked until its frames go
    try:
        close()
    except Exception as err:
        if not stopped:
            raise
        print(f"note: MLflow runs left open ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
              file=sys.stderr)


# --- the study --------------------------------------------------------------------------------------------------

class RetryStale:
    """Heartbeat-stale trial (its worker died): close its MLflow runs as failed, then queue it again.

    Optuna 5's RetryHeartbeatStaleTrialCallback replaces RetryFailedTrialCallback (deprecated in 4.9).
    """

    def __init__(self, max_retry: int, tracking: str) -> None:
        self.max_retry, self.tracking = max_retry, tracking

    def __call__(self, study, trial) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        retried = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
        print(f"trial {trial.number}: its worker stopped sending heartbeats; marked failed"
              + ("; queued to run again" if retried else f"; not retried (--retries {self.max_retry} used up)"),
              file=sys.stderr)
        close_runs(self.tracking, trial.user_attrs.get("mlflow_run_id"), "FAILED")
        RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, trial)


def _quiet_optuna() -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=r".*SADeprecationWarning.*|.*noload.*")
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoCtrlCTraceback) for f in log.filters):
        log.addFilter(_NoCtrlCTraceback())


class _NoCtrlCTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C as a failure, with the traceback of the user's keypress and a second
    "failed with value None" line; compress says instead that the search was interrupted and how to go on."""

    def __init__(self) -> None:
        super().__init__()
        self._drop_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and issubclass(record.exc_info[0], KeyboardInterrupt):  # SIGTERM's Terminated too
            self._drop_next = True
            return False
        if self._drop_next and "failed with value" in record.getMessage():
            self._drop_next = False
            return False
        return True


def check_storage(url: str) -> Path | None:
    """The sqlite file of --storage (None for a server database), checked read-only before anything writes: Optuna's
    RDBStorage adds its tables to whatever database it opens, an MLflow store included, and only then fails on that
    store's alembic revision."""
    from compress.infra.tracking import check_kind, check_spelling, sqlite_file

    check_spelling(url, "--storage")
    db = sqlite_file(url)
    if db is not None:
        check_folder(db.parent, "--storage")
    check_kind(url, "--storage", "optuna")
    return db


def make_storage(url: str, heartbeat: int, retries: int, tracking: str):
    import optuna

    _quiet_optuna()
    import sqlalchemy.exc

    kwargs = {}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              heartbeat_stale_trial_callback=RetryStale(retries, tracking), **kwargs)
        except sqlalchemy.exc.IntegrityError:
            # two processes creating a new database's tables at once (workers on several machines): one wins
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
        except sqlalchemy.exc.ArgumentError as err:
            raise CompressError(f"--storage {shown(url)}: not a database URL SQLAlchemy knows ({err})") from None


def make_sampler(name: str, objectives: list[str], trials: int, seed: int | None):
    """auto: NSGA-II for several objectives, TPE for one. Both start from random trials; for a small search the
    random start is a third of the trials (NSGA-II's generation, TPE's startup) so the rest can exploit it."""
    import optuna

    start = max(4, min(50, trials // 3))
    if name == "auto":
        name = "nsga2" if len(objectives) > 1 else "tpe"
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=start, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=min(start, 10), seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str, objectives: list[str]):
    import optuna

    if len(objectives) > 1 or name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def load_study(ctx: Context, worker: int = 0):
    import optuna

    storage = make_storage(ctx.storage, ctx.heartbeat, ctx.retries, ctx.tracking)
    study = optuna.load_study(study_name=ctx.study, storage=storage, pruner=make_pruner(ctx.pruner, ctx.objectives))
    # a different seed per worker and per start, or two workers (or a resumed study) would draw the same values
    seed = ctx.sampler_seed
    if seed is not None:
        seed += 1000 * worker + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(ctx.sampler, ctx.objectives, ctx.trials, seed)
    return study


def work(ctx: Context, n_trials: int, worker: int = 0, wait: float = 0.0) -> None:
    """One worker: run `n_trials` trials of the study (in this process, or a spawned one)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # spawned with Ctrl-C ignored (run_workers): take it up now
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from compress.engine.trainer import quiet_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    _quiet_optuna()
    flags = step_flags()
    dims = parse_space(ctx.space, flags)
    study = load_study(ctx, worker)
    if wait:  # a replacement for a dead worker: let the dead one's heartbeat go stale, so its trial is retried first
        time.sleep(wait)
    # Exceptions fail the trial and the study goes on (Optuna logs each with its traceback); Ctrl-C stops it.
    try:
        with sigterm_raises(), CtrlC() as ctrl_c, stops_held_between_trials():
            study.optimize(lambda trial: objective(trial, ctx, dims, flags), n_trials=n_trials, catch=(Exception,),
                           gc_after_trial=True, callbacks=[ctrl_c.stop_if_pressed])
            ctrl_c.stop_if_pressed()
    except KeyboardInterrupt as stop:
        if multiprocessing.parent_process() is None:
            raise
        # a spawned worker: multiprocessing would print the whole traceback of the keypress; the exit code tells
        # the parent which stop it was, and the parent says how to go on
        raise SystemExit(stop_said(stop)[1]) from None


def interrupted_trials(study) -> list:
    """The trials a stop cut short that no later trial has re-run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    return [t for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in rerun]


def requeue_interrupted(study) -> list[int]:
    """Queue again the parameters of each trial a Ctrl-C cut short and no later trial has re-run, so the next run of
    the study starts with them; returns their numbers."""
    cut = interrupted_trials(study)
    for t in cut:
        # a queued trial stopped as it started has sampled nothing: its values are still the ones queued
        study.enqueue_trial({**t.system_attrs.get("fixed_params", {}), **t.params}, user_attrs={"rerun_of": t.number})
    return [t.number for t in cut]


def _finished_by(study, pid: int) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.user_attrs.get("worker") == pid)


def run_workers(ctx: Context, trials: int, workers: int) -> list[str]:
    """K spawned processes share the trials; one killed by a signal is replaced for the trials it had left.

    Returns a line for each worker that exited with an error (its traceback is above, in its own output).
    """
    import multiprocessing

    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    spawn = multiprocessing.get_context("spawn")  # fork would copy torch's threads and open sqlite connections
    study = load_study(ctx)
    procs, restarts, errors = {}, 0, []

    def start(i: int, n: int, wait: float = 0.0):
        proc = spawn.Process(target=work, args=(ctx, n, i, wait), name=f"compress-search-{i}")
        # the worker starts with Ctrl-C ignored (it imports torch and compress first, where a Ctrl-C was a 40-line
        # traceback each) and takes it up in work(); this process passes the stop on to it either way
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        procs[i] = (proc, n)

    for i, n in enumerate(shares):
        if n:
            start(i, n)
    try:
        while procs:
            for i, (proc, n) in list(procs.items()):
                proc.join(timeout=0.5)
                if proc.exitcode is None:
                    continue
                del procs[i]
                left = n - _finished_by(study, proc.pid)
                # killed by a signal (kill -9, the OOM killer): replace it; an error would only repeat, so report it
                if proc.exitcode in STOPPED_BY:  # it was stopped (a signal to it alone): stop them all alike
                    raise STOPPED_BY[proc.exitcode]
                if proc.exitcode < 0 and left > 0 and restarts < max(ctx.retries, 1) * workers:
                    restarts += 1
                    print(f"worker {i} (pid {proc.pid}) was killed (signal {-proc.exitcode}); starting a replacement "
                          f"for its {left} trial(s), after {2 * ctx.heartbeat + 1} s so its running trial is "
                          "detected as failed and retried", file=sys.stderr)
                    start(i, left, wait=2 * ctx.heartbeat + 1)
                elif proc.exitcode != 0:
                    errors.append(f"worker {i} (pid {proc.pid}) exited with code {proc.exitcode}")
    except KeyboardInterrupt:
        _stop_workers([proc for proc, _ in procs.values()])
        raise
    return errors


def _stop_workers(procs: list) -> None:
    """Pass the stop on to every worker at once, as SIGTERM: SIGTERM (`kill PID`, a scheduler, whose grace period is
    short) and SIGINT (`kill -INT PID`) reach only this process, and a terminal's Ctrl-C reached the workers
    already. Each closes its trial as interrupted; one still going after the deadline is killed, and its trial
    retried later. A second Ctrl-C here is ignored: it used to end the wait and leave the workers to print their
    tracebacks last."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # SIGTERM either way: inside a fit Lightning stops at the batch boundary, where a SIGINT could land inside an
        # MLflow write and leave SQLite locked for the others; a worker already stopping (a terminal's Ctrl-C) takes
        # it as nothing new. 30 s outlasts SQLite's 20 s busy timeout; a second signal would only quit the workers
        # without closing their runs (signals.py), so the next is SIGKILL.
        for sent, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            alive = [p for p in procs if p.exitcode is None]
            for p in alive:
                with contextlib.suppress(ProcessLookupError):  # it exited just now
                    os.kill(p.pid, sent)
            deadline = time.monotonic() + wait_s
            for p in alive:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            if sent == signal.SIGTERM and (late := [p for p in alive if p.exitcode is None]):
                print(f"compress: {len(late)} worker(s) did not close their trial within {wait_s} s of the stop; "
                      "killing them (each trial left running is retried when the study resumes)", file=sys.stderr,
                      flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _study_config(teacher: str, task: str | None, data: str | None, objectives: list[str], space: dict) -> dict:
    def where(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return {"teacher": where(teacher), "task": task, "data": where(data), "objectives": objectives, "space": space}


def open_study(ctx: Context, config: dict):
    """Create the study, or open it again (resume) after checking it was made for the same search."""
    import optuna

    storage = make_storage(ctx.storage, ctx.heartbeat, ctx.retries, ctx.tracking)
    try:
        existing = optuna.load_study(study_name=ctx.study, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        before = existing.user_attrs.get("compress_config")
        if before is not None and json.dumps(before, sort_keys=True) != json.dumps(config, sort_keys=True):
            changed = [k for k in config if before.get(k) != config[k]]
            raise CompressError(f"--study {ctx.study}: already exists in {shown(ctx.storage)} with another "
                                f"{', '.join(changed)}; pass a new --study, or the same settings to add trials to it")
        return existing
    directions = [OBJECTIVES[o][1] for o in ctx.objectives]
    study = optuna.create_study(storage=storage, study_name=ctx.study, directions=directions, load_if_exists=True)
    study.set_metric_names(list(ctx.objectives))
    study.set_user_attr("compress_config", config)
    return study


def _parent_run(ctx_fields: dict, study, tracking: str, experiment: str, study_name: str) -> tuple[str, str]:
    """The study's MLflow parent run (created once, found again on resume) and its experiment id."""
    from compress.infra.tracking import git_commit

    client = mlflow_client(tracking)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                    artifact_location=_prepare_store(tracking))
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id and study.user_attrs.get("mlflow_tracking") == shown(tracking):
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, exp_id
        except Exception:  # the MLflow store was reset: start a new parent
            pass
    title = f"search {study_name}: {' vs '.join(ctx_fields['objectives'].split(','))}"
    run = client.create_run(exp_id, run_name=title, tags={
        "compress.command": "search", "optuna.study": study_name, "optuna.storage": ctx_fields["storage"],
        "git_commit": git_commit()})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in ctx_fields.items()])
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    study.set_user_attr("mlflow_tracking", shown(tracking))
    return run.info.run_id, exp_id


def resolve_teacher(teacher: str, task: str | None, data: str | None, text_column: str | None, label_column: str,
                    dims: dict[str, Dimension], flags: dict):
    """Check the teacher and the data (seconds, before anything is written). Returns a function giving the teacher
    every trial starts from: as given when it has a classifier for the task, else fine-tuned once (distill's own
    fine-tuning and cache, with the study's fixed values), its run nested under the study's parent run."""
    from compress.data.tasks import load_task
    from compress.models.loading import check_encoder, has_task_head, load_config, resolve_model

    fixed = {k.rpartition(".")[2]: d.value for k, d in dims.items()
             if d.kind == "fixed" and k.rpartition(".")[0] in ("", "distill")}
    defaults = flags["distill"]

    def get(key):
        return fixed.get(key, defaults[key])

    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=get("max_train"),
                          seed=get("seed"))
    path = resolve_model(teacher, "--teacher")
    config = load_config(path, "--teacher")
    check_encoder(config, "--teacher")
    _check_share_fits(config, dims, flags)
    _check_depths(config, dims)
    if has_task_head(config, task_data.label_names):
        return lambda *_: path
    from compress.engine.teacher import ensure_task_teacher
    from compress.engine.run import TrainConfig, run_hooks

    cfg = TrainConfig(epochs=get("teacher_epochs"), lr=get("teacher_lr"), warmup=0.1, weight_decay=0.01,
                      batch_size=get("batch_size"), max_length=get("max_length"), seed=get("seed"),
                      precision=get("precision"), accelerator=get("accelerator"), devices=get("devices"),
                      strategy=get("strategy"), num_workers=get("num_workers"),
                      checkpoint_every=get("checkpoint_every"), checkpoint_minutes=get("checkpoint_minutes"),
                      latency_reps=get("latency_reps"))
    cfg.validate()

    def finetuned(parent_run_id: str, tracking: str, experiment: str, progress: bool | None = None) -> str:
        from compress.engine.trainer import quiet_libraries

        quiet_libraries()
        with run_hooks(tags={"mlflow.parentRunId": parent_run_id}, progress=progress):
            return ensure_task_teacher(path, teacher, task_data, cfg, tracking=tracking, experiment=experiment,
                                       cache_root=Path(get("teacher_cache")))
    return finetuned


# --- the end of a study: the Pareto front -----------------------------------------------------------------------

def pareto(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows no other row beats on every key at once (score up, the rest down), sorted by score."""
    sign = {k: -1.0 if OBJECTIVES[k][1] == "maximize" else 1.0 for k in keys}

    def dominates(a, b):
        return (all(sign[k] * a[k] <= sign[k] * b[k] for k in keys)
                and any(sign[k] * a[k] < sign[k] * b[k] for k in keys))

    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: -r["score"])


def trial_rows(study, dims: dict[str, Dimension]) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "student_score" not in a:
            continue
        row = {"trial": t.number, "score": a["student_score"], "params": a["student_params"],
               "latency_ms": a.get("latency_ms", math.nan), "mb": a.get("student_mb", math.nan),
               "retention": a.get("retention", math.nan), "compression": a.get("compression", math.nan),
               "speedup": a.get("speedup", math.nan), "recipe": a.get("recipe", ""), "model": a.get("model", ""),
               "mlflow_run_id": a.get("mlflow_run_id", ""), "metric": a.get("metric", "score"),
               "teacher_score": a.get("teacher_score"), "teacher_params": a.get("teacher_params"),
               "teacher_latency_ms": a.get("teacher_latency_ms")}
        row |= {k: t.params.get(k, d.value) for k, d in dims.items()}
        rows.append(row)
    return rows


def teacher_point(rows: list[dict]) -> dict | None:
    """The teacher's score and size (the same in every trial) and its latency (the median over the trials)."""
    with_teacher = [r for r in rows if r["teacher_score"] is not None]
    if not with_teacher:
        return None
    lat = sorted(r["teacher_latency_ms"] for r in with_teacher if r["teacher_latency_ms"] is not None)
    return {"score": with_teacher[0]["teacher_score"], "params": with_teacher[0]["teacher_params"],
            "latency_ms": lat[len(lat) // 2] if lat else math.nan}


def front_table(front: list[dict], teacher: dict | None) -> str:
    metric = front[0]["metric"] if front else "score"
    lines = [f"| trial | {metric} | params | latency ms | MB | retention | recipe |", "|---|---|---|---|---|---|---|"]
    if teacher:
        lines.append(f"| teacher | {teacher['score']:.4f} | {teacher['params']:,.0f} | {teacher['latency_ms']:.1f} "
                     "| - | 1.000 | - |")
    for r in front:
        lines.append(f"| {r['trial']} | {r['score']:.4f} | {r['params']:,.0f} | {r['latency_ms']:.1f} | "
                     f"{r['mb']:.1f} | {r['retention']:.3f} | {r['recipe']} |")
    return "\n".join(lines)


def plot_front(path: Path, rows: list[dict], front: list[dict], teacher: dict | None, title: str) -> None:
    """Two panels, score against params and score against latency: every trial, the front, the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"] if rows else "score"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("params", "parameters"), ("latency_ms", "latency ms (batch 32 x 128)"))):
        ax.scatter([r[key] for r in rows], [r["score"] for r in rows], s=25, c="0.75", label="trial")
        ax.scatter([r[key] for r in front], [r["score"] for r in front], s=45, c="tab:blue", label="Pareto front")
        for r in front:
            ax.annotate(str(r["trial"]), (r[key], r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        panel = sorted(pareto(rows, ["score", key]), key=lambda r: r[key])  # this panel's own trade-off curve
        ax.step([r[key] for r in panel], [r["score"] for r in panel], where="post", c="tab:blue", lw=0.8, ls="--")
        if teacher and not math.isnan(teacher[key]):
            ax.scatter([teacher[key]], [teacher["score"]], marker="*", s=220, c="tab:red", label="teacher",
                       zorder=3)
        values = [r[key] for r in rows] + ([teacher[key]] if teacher else [])
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SearchResult:
    study: str
    front: list[dict]
    rows: list[dict]
    teacher: dict | None
    parent_run_id: str
    counts: dict[str, int]
    artifacts: dict[str, str]


def summarise(ctx: Context, dims: dict[str, Dimension]) -> SearchResult:
    """Log the front on the parent run (CSV, PNG, counts), write them beside the trials, print the table."""
    import optuna
    from optuna.trial import TrialState

    study = load_study(ctx)
    optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed now, queued for the next run
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    rows = trial_rows(study, dims)
    keys = ctx.objectives if len(ctx.objectives) > 1 else ["score", "params"]
    front = pareto(rows, keys)
    teacher = teacher_point(rows)
    out = Path(ctx.output)
    out.mkdir(parents=True, exist_ok=True)
    files = {"front_csv": out / "pareto_front.csv", "trials_csv": out / "trials.csv", "plot": out / "pareto_front.png"}
    write_csv(files["front_csv"], front)
    write_csv(files["trials_csv"], [r | {"pareto": r in front} for r in rows])
    plot_front(files["plot"], rows, front, teacher,
               f"compress search {ctx.study}: {len(rows)} trials, front by {' / '.join(keys)}")

    client = mlflow_client(ctx.tracking)
    for path in files.values():
        client.log_artifact(ctx.parent_run_id, str(path))
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = {f"trials_{k}": v for k, v in counts.items() if k in ("complete", "pruned", "fail", "waiting")}
    metrics |= {"pareto_size": len(front)}
    if rows:
        best = max(rows, key=lambda r: r["score"])
        metrics |= {"best_score": best["score"], "best_score_params": best["params"]}
    if teacher:
        metrics |= {"teacher_score": teacher["score"], "teacher_params": teacher["params"]}
    client.log_batch(ctx.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    running = counts.get("running", 0) + counts.get("waiting", 0)
    client.set_terminated(ctx.parent_run_id, "FINISHED")

    cut = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("interrupted"))
    print(f"\nsearch {ctx.study}: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned or skipped, "
          f"{counts.get('fail', 0) - cut} failed" + (f", {cut} interrupted" if cut else "")
          + f" trials in {shown(ctx.storage)}; Pareto front by {' / '.join(keys)}:\n", file=sys.stderr)
    print(front_table(front, teacher))
    if running:
        print(f"\n{running} trial(s) still running or queued (another worker, or a retry of a dead worker's trial): "
              "run the same command again to add them", file=sys.stderr)
    print(f"\nfront: {files['front_csv']}, plot: {files['plot']}; MLflow parent run {ctx.parent_run_id} in "
          f"{shown(ctx.tracking)} (open it: {where_to_look(ctx.tracking)})", file=sys.stderr)
    return SearchResult(ctx.study, front, rows, teacher, ctx.parent_run_id, counts,
                        {k: str(v) for k, v in files.items()})


# --- the command ------------------------------------------------------------------------------------------------

def run_search(
    teacher: str,
    space: dict | str,
    task: str | None = None,
    data: str | None = None,
    objectives: str | list[str] = "score,params",
    trials: int = 10,
    workers: int = 1,
    study: str | None = None,
    storage: str = DEFAULT_STORAGE,
    sampler: str = "auto",
    pruner: str = "median",
    sampler_seed: int | None = 0,
    heartbeat: int = 30,
    retries: int = 2,
    output: str | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    tracking: str = DEFAULT_TRACKING,
    experiment: str = DEFAULT_EXPERIMENT,
) -> SearchResult:
    """`compress search` returning its result (the front, every trial's row, the parent run id) for scripts."""
    objs = [o.strip() for o in (objectives.split(",") if isinstance(objectives, str) else objectives) if o.strip()]
    unknown = [o for o in objs if o not in OBJECTIVES]
    if not objs or unknown or len(set(objs)) != len(objs) or "score" not in objs:
        given = ",".join(map(str, objectives)) if isinstance(objectives, list) else objectives
        raise CompressError(f"--objectives {given}: use score alone or with params and/or latency_ms, each once "
                            "(e.g. score,params)")
    checks = [
        (trials >= 1, f"--trials {trials}: must be at least 1"),
        (workers >= 1, f"--workers {workers}: must be at least 1"),
        (sampler in SAMPLERS, f"--sampler {sampler}: use {', '.join(SAMPLERS)}"),
        (pruner in PRUNERS, f"--pruner {pruner}: use {', '.join(PRUNERS)}"),
        (heartbeat >= 1, f"--heartbeat {heartbeat}: seconds between heartbeats, at least 1"),
        (retries >= 0, f"--retries {retries}: must be >= 0"),
        ("://" in storage, f"--storage {storage}: an RDB URL such as sqlite:///mlruns/optuna.db or "
                           "postgresql://user:pass@host/db"),
        (task is None or data is None, "--task and --data are exclusive"),
        (task is not None or data is not None, "give --task or --data"),
    ]
    for ok, message in checks:
        if not ok:
            raise CompressError(message)
    check_all(sampler_seed=sampler_seed)
    try:
        import optuna  # noqa: F401
        import optuna_integration  # noqa: F401
    except ImportError as err:
        raise CompressError(f"compress search needs Optuna: pip install 'optuna>=4.9' optuna-integration "
                            f"({err})") from None
    flags = step_flags()
    space = load_space(space)
    dims = parse_space(space, flags)
    if sampler == "nsga2" and len(objs) == 1:
        print("--sampler nsga2 with one objective: TPE usually does better there", file=sys.stderr)
    if workers > 1 and "latency_ms" in objs:
        print(f"note: {workers} workers share this machine's cores, so a trial's latency is measured while other "
              "trials train; use --workers 1 when latency is an objective and the numbers matter", file=sys.stderr)
    if workers > 1 and storage.startswith("sqlite:") and ":memory:" in storage:
        raise CompressError("--storage: an in-memory sqlite database cannot be shared by workers")
    teacher_for = resolve_teacher(teacher, task, data, text_column, label_column, dims, flags)
    # after every check, so a refused study leaves no mlruns/ behind
    db = check_storage(storage)
    _prepare_store(resolve_tracking(tracking))  # a bad --tracking fails here once, not in every trial
    if db is not None:  # only now: a study refused for its --tracking left an empty mlruns/ behind
        db.parent.mkdir(parents=True, exist_ok=True)
    name = study or f"{slug(teacher)}-{slug(task or data)}"
    out = str(check_output(output if output is not None else f"outputs/search-{name}"))
    config = _study_config(teacher, task, data, objs, space)
    ctx = Context(study=name, storage=storage, objectives=objs, space=space, sampler=sampler, pruner=pruner,
                  sampler_seed=sampler_seed, heartbeat=heartbeat, retries=retries, teacher=teacher, teacher_path="",
                  task=task, data=data, text_column=text_column, label_column=label_column, output=out,
                  tracking=tracking, experiment=experiment, experiment_id="", parent_run_id="",
                  progress=workers == 1 and sys.stderr.isatty(), trials=trials)
    opened = open_study(ctx, config)
    before = len(opened.trials)
    requeued = requeue_interrupted(opened)
    ctx.parent_run_id, ctx.experiment_id = _parent_run(
        {"teacher": teacher, "task": task or "", "data": data or "", "objectives": ",".join(objs),
         "storage": shown(storage), "sampler": sampler,
         "pruner": pruner if len(objs) == 1 else "none (multi-objective)", "space": json.dumps(space)},
        opened, tracking, experiment, name)
    try:  # from here the parent run exists, and any stop closes it
        print(f"search {name}: {trials} trial(s) on {workers} worker(s), objectives {' / '.join(objs)}"
              + (f", adding to its {before} earlier trial(s)" if before else "")
              + (f" (interrupted trial(s) {', '.join(map(str, requeued))} run again first)" if requeued else "")
              + f"; study in {shown(storage)}, models under {out}, MLflow parent run {ctx.parent_run_id}",
              file=sys.stderr)
        started = time.time()
        ctx.teacher_path = teacher_for(ctx.parent_run_id, tracking, experiment, ctx.progress)
        errors = []
        if workers == 1:
            work(ctx, trials)
        else:
            errors = run_workers(ctx, trials, workers)
        result = summarise(ctx, dims)
        if errors:
            raise CompressError(f"{'; '.join(errors)}: see its error above")
    except KeyboardInterrupt as stop:
        said = stop_said(stop)[0]
        close_after(True, lambda: mlflow_client(tracking).set_terminated(ctx.parent_run_id, "KILLED"))
        cut = True  # said unless the study shows none (a stop between trials cuts none short)
        with contextlib.suppress(Exception):  # at best: a stop can leave the store locked
            cut = bool(interrupted_trials(load_study(ctx)))
        print(f"compress: search {said}; rerun the same command (--study {name}) to continue the study"
              + (" (a trial it cut short runs again first)" if cut else ""), file=sys.stderr)
        stop.reported = True
        raise
    except BaseException:
        mlflow_client(tracking).set_terminated(ctx.parent_run_id, "FAILED")
        raise
    _raise_if_all_failed(ctx, started)
    return result


def _raise_if_all_failed(ctx: Context, since: float) -> None:
    """Every trial of this run failed: that is a problem to report, not a study to show."""
    import datetime

    from optuna.trial import TrialState

    study = load_study(ctx)
    start = datetime.datetime.fromtimestamp(since)
    mine = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_start >= start]
    failed = [t for t in mine if t.state == TrialState.FAIL]
    if mine and len(failed) == len(mine):
        first = next((t.user_attrs["error"] for t in failed if "error" in t.user_attrs), "see the log above")
        raise CompressError(f"all {len(mine)} trial(s) of this run failed; the first: {first}")


def search(
    teacher: str,
    space: dict[str, Any] | str,
    task: str | None = None,
    data: str | None = None,
    objectives: str | list[str] = "score,params",
    trials: int = 10,
    workers: int = 1,
    study: str | None = None,
    storage: str = DEFAULT_STORAGE,
    sampler: str = "auto",
    pruner: str = "median",
    sampler_seed: int | None = 0,
    heartbeat: int = 30,
    retries: int = 2,
    output: str | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    tracking: str = DEFAULT_TRACKING,
    experiment: str = DEFAULT_EXPERIMENT,
) -> None:
    """Search the whole recipe (distill, prune, share, in that order) with Optuna, for accuracy against size or speed.

    Each trial runs the steps its values name through the commands themselves, each from the one before: distill
    when layers is set, prune when heads, ffn, sparsity or drop_layers is non-zero, share when groups is set (after
    a prune, --share all shares both sublayers in compress's own class, since ALBERT has one layer size). Every
    trial is an MLflow run nested under the study's run; at the end the Pareto front is printed and logged there as
    CSV and PNG. Give the search as a YAML file with --config.

    Args:
        teacher: the model every trial starts from: hub name, alias (minilm-l6, bert-base) or folder. One with no
            classifier for the task is fine-tuned once for the study (distill's teacher_* values, fixed in space).
        space: flags of distill, prune and share to search: a list is a categorical choice, {low, high} a range
            (int when both are ints; add log: true for a log scale, or step), a single value is fixed. null in a
            list skips that step (layers: distill, groups: share, a prune fraction: that pruning). STEP.FLAG
            (e.g. prune.lr) sets a flag for one step only; a plain flag goes to every step that has it. Inline YAML
            (--space '{layers: [3, 4]}'), a YAML file holding the mapping, or space: in --config.
        task: a GLUE task (sst2, mnli, ...) or bbc-news. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column.
        objectives: score, score,params or score,latency_ms (or all three): score is maximised, the others
            minimised. Several objectives search for the Pareto front; score alone prunes bad trials early.
        trials: trials to run now (added to the study's earlier ones).
        workers: local processes running trials of the study at once (each trains on its own; trials' latencies
            are then measured while others train).
        study: Optuna study name; the same name again resumes it (default: TEACHER-DATA).
        storage: Optuna storage, an RDB URL: sqlite under ./mlruns by default; postgresql://... lets workers on
            several machines share one study.
        sampler: auto (NSGA-II for several objectives, TPE for one), nsga2, tpe or random.
        pruner: with one objective, stop trials whose per-epoch validation score trails: median or hyperband
            (or none). Several objectives cannot prune.
        sampler_seed: seed of the sampler (each worker and each restart offsets it); null for a random seed.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for twice this long (its worker
            died) is marked failed and retried.
        retries: how many times a dead worker's trial is retried.
        output: folder for the trials' models and the front's CSV and plot (default: outputs/search-STUDY).
        text_column: column(s) holding the text, "a" or "a,b" for pairs (default: sentence or text, or a known pair).
        label_column: column holding the label.
        tracking: MLflow tracking URI (default: sqlite under ./mlruns).
        experiment: MLflow experiment name.
    """
    try:
        run_search(teacher=teacher, space=space, task=task, data=data, objectives=objectives, trials=trials,
                   workers=workers, study=study, storage=storage, sampler=sampler, pruner=pruner,
                   sampler_seed=sampler_seed, heartbeat=heartbeat, retries=retries, output=output,
                   text_column=text_column, label_column=label_column, tracking=tracking, experiment=experiment)
    except KeyboardInterrupt as stop:  # the CLI's hint (--resume) is wrong for a search: the same command goes on
        said, code = stop_said(stop)
        if not getattr(stop, "reported", False):  # stopped before its study had a parent run to close
            print(f"compress: search {said}; rerun the same command to continue", file=sys.stderr)
        raise SystemExit(code) from None
