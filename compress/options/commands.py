"""Each command's flat flags: which config group holds each, its order in --help, and the few defaults and help lines
that differ by command.

The CLI turns a command's flags into its groups with `to_groups`; `compress search` reads a step's searchable flags
and their defaults with `flag_defaults`, and builds a trial's groups with `to_groups` too, so the command line, the
API and a search space always mean the same thing by a flag.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from compress.options.groups import (AutoConfig, BenchConfig, DataConfig, DistillConfig, EvaluateConfig,
                                     ExportConfig, FinetuneConfig, LossConfig, OutputConfig, PruneConfig,
                                     RuntimeConfig, SearchConfig, ShareConfig, TrackingConfig, TrainingConfig,
                                     field_docs)


@dataclass(frozen=True)
class Command:
    summary: str
    """the command's description in --help: its first line is the line in `compress --help`."""
    groups: dict[str, type]
    """the step function's parameter name -> the config group it takes."""
    flags: tuple[str, ...]
    """the flat flags, in --help order."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """flag -> this command's default, where it is not the field's."""
    helps: dict[str, str] = field(default_factory=dict)
    """flag -> this command's help line, where the field's general one would not say what the flag does here."""
    renamed: dict[str, tuple[str, str]] = field(default_factory=dict)
    """flag -> (group, field), for a flag not named as its field (prune's --recover_epochs is training.epochs)."""


_DATA = ("task", "data")
_COLUMNS = ("text_column", "label_column", "quoting")
_TRAINING = ("batch_size", "lr", "warmup", "weight_decay")
_LOSS = ("temperature", "alpha_kd", "alpha_ce", "alpha_hidden")
_RUN = ("seed", "precision", "accelerator", "devices", "strategy", "num_workers", "checkpoint_every",
        "checkpoint_minutes", "latency_reps")
_TRAINING_GROUPS = {"data": DataConfig, "training": TrainingConfig, "runtime": RuntimeConfig,
                    "tracking": TrackingConfig, "output": OutputConfig}
_RECOVER = {"recover_epochs": ("training", "epochs")}

COMMANDS: dict[str, Command] = {
    "distill": Command(
        summary="Distil a teacher into a smaller student on a task, and log both scores, sizes and speeds to "
                "MLflow.\n\nThe default student is DistilBERT-style: the teacher's width, its embeddings, and every "
                "other layer.",
        groups={"step": DistillConfig, "loss": LossConfig, **_TRAINING_GROUPS},
        flags=("teacher", *_DATA, "student", "layers", "unlabeled", "augment", "augment_model", "epochs", "output",
               *_TRAINING, *_LOSS, "alpha_attn", "cache_teacher", "compile", "teacher_device_map", "max_length",
               "max_train", *_COLUMNS, *_RUN, "teacher_epochs", "teacher_lr", "teacher_cache", "tracking",
               "experiment", "resume", "overwrite"),
        helps={"output": "where the student is written (default: outputs/distill-TEACHER-TASK-LN)."},
    ),
    "finetune": Command(
        summary="Fine-tune a pretrained encoder on a task, making a teacher for distill.",
        groups={"step": FinetuneConfig, **_TRAINING_GROUPS},
        flags=("model", *_DATA, "output", "epochs", *_TRAINING, "max_length", "max_train", *_COLUMNS, *_RUN,
               "tracking", "experiment", "resume", "overwrite"),
        defaults={"lr": 5e-5},
        helps={"output": "where the fine-tuned model is written (default: outputs/finetune-MODEL-TASK)."},
    ),
    "prune": Command(
        summary="Prune heads, FFN neurons, layers and/or weights of a BERT-family classifier; recover by distilling "
                "from it.\n\nScore, size, FLOPs and speed measured against the unpruned parent in the same run are "
                "logged to MLflow.\n\nHeads, neurons and layers are sliced out, so the saved model is smaller and "
                "faster; it loads with\nAutoModelForSequenceClassification (after `import compress`) or anywhere "
                "with trust_remote_code=True.",
        groups={"step": PruneConfig, "loss": LossConfig, **_TRAINING_GROUPS},
        flags=("model", *_DATA, "heads", "ffn", "hidden", "drop_layers", "criterion", "scope", "sparsity", "vocab",
               "vocab_corpus", "vocab_top", "vocab_min_count", "recover_epochs", "importance_batches", "output",
               *_TRAINING, *_LOSS, "cache_teacher", "teacher_cache", "max_length", "max_train", *_COLUMNS, *_RUN,
               "tracking", "experiment", "resume", "overwrite"),
        defaults={"recover_epochs": 2},
        helps={"recover_epochs": "epochs of distillation from the parent after pruning; 0 saves the pruned model as "
                                 "is.",
               "output": "where the pruned model is written (default: outputs/prune-MODEL-TASK-hH-fF[-dN][-sS])."},
        renamed=_RECOVER,
    ),
    "share": Command(
        summary="Share weights across layers, factorise the embedding of a BERT-family classifier; recover by "
                "distilling.\n\nSharing cuts parameters and size, not FLOPs: every layer still runs. Score, size and "
                "the measured speed are\nlogged to MLflow against the original, in the same run.",
        groups={"step": ShareConfig, "loss": LossConfig, **_TRAINING_GROUPS},
        flags=("model", *_DATA, "groups", "share", "embedding", "init", "calibration", "recover_epochs", "output",
               *_TRAINING, *_LOSS, "alpha_attn", "cache_teacher", "teacher_cache", "max_length", "max_train",
               *_COLUMNS, *_RUN, "tracking", "experiment", "resume", "overwrite"),
        defaults={"recover_epochs": 3},
        helps={"recover_epochs": "epochs of distillation from the original after sharing; 0 saves the shared model "
                                 "as is.",
               "output": "where the shared model is written (default: outputs/share-MODEL-TASK-SHARE-gG[-eE])."},
        renamed=_RECOVER,
    ),
    "evaluate": Command(
        summary="Report a model's task metric on the dev split, its parameters, size on disk and latency.\n\n"
                "The table goes to stderr; stdout gets the same result as one JSON line, for scripts.",
        groups={"step": EvaluateConfig, "data": DataConfig, "runtime": RuntimeConfig},
        flags=("model", *_DATA, "batch_size", "max_length", *_COLUMNS, "accelerator", "latency_batch",
               "latency_seq", "latency_reps", "json_out"),
        helps={"data": "a folder with train and dev files (.tsv, .csv or .jsonl); the dev file is scored.",
               "text_column": "column(s) holding the text, \"a\" or \"a,b\" for pairs.",
               "accelerator": "auto, cpu or cuda."},
    ),
    "export": Command(
        summary="Export a trained classifier for deployment: HF weights with a model card, ONNX, and int8 ONNX.\n\n"
                "The ONNX export is checked against PyTorch on batch and sequence sizes other than the traced ones "
                "and\nfails (writing nothing) if any logit differs by more than 1e-4. The output folder appears only "
                "when\neverything succeeded. The table goes to stderr; stdout gets the same result as one JSON line, "
                "for scripts\n(`compress export ... > export.json`).",
        groups={"step": ExportConfig, "data": DataConfig, "tracking": TrackingConfig, "output": OutputConfig},
        flags=("model", "run", "format", "fuse", "output", "register", *_DATA, *_COLUMNS, "max_length", "batch_size",
               "tracking", "experiment", "overwrite"),
        helps={"output": "folder to write (default: outputs/export-MODEL).",
               "task": "score the export on this task's dev split (fp32, and int8 beside it when made): a GLUE task "
                       "or bbc-news. Exclusive with --data.",
               "data": "score on the dev file of this folder of train and dev files (.tsv, .csv or .jsonl).",
               "text_column": "column(s) holding the text, \"a\" or \"a,b\" for pairs.",
               "max_length": "tokens per example when scoring; longer inputs are truncated (default: the smaller of "
                             "128 and the model's positions).",
               "tracking": "MLflow tracking URI, for --run, --register and the model card's metrics.",
               "experiment": "MLflow experiment for the export run when the model's own run is not in this store."},
    ),
    "bench": Command(
        summary="Time models side by side: p50 and p95 latency and throughput, with speed-ups relative to the "
                "first.\n\nAll models see the same random batch and run in interleaved rounds (A, B, A, B, ...) "
                "after warm-up, with\nthe same thread count for PyTorch and onnxruntime. PyTorch runs in bf16 "
                "autocast on a GPU, fp32 on a CPU.",
        groups={"step": BenchConfig, "tracking": TrackingConfig},
        flags=("model", "batch", "seq", "device", "warmup", "reps", "threads", "json", "run", "tracking"),
        helps={"tracking": "MLflow tracking URI of --run."},
    ),
    "search": Command(
        summary="Search the whole recipe (distill, prune, share, in that order) with Optuna, for accuracy against "
                "size or speed.\n\nEach trial runs the steps its values name through the commands themselves, each "
                "from the one before: distill\nwhen layers is set, prune when heads, ffn, sparsity or drop_layers is "
                "non-zero or vocab is true, share when groups is set (after\na prune, --share all shares both "
                "sublayers in compress's own class, since ALBERT has one layer size). Every\ntrial is an MLflow run "
                "nested under the study's run; at the end the Pareto front is printed and logged there as\nCSV and "
                "PNG. Give the search as a YAML file with --config.",
        groups={"step": SearchConfig, "data": DataConfig, "tracking": TrackingConfig, "output": OutputConfig},
        flags=("teacher", "space", *_DATA, "objectives", "trials", "workers", "study", "storage", "sampler", "pruner",
               "sampler_seed", "heartbeat", "retries", "output", *_COLUMNS, "tracking", "experiment"),
        helps={"task": "a GLUE task (sst2, mnli, ...) or bbc-news. Exclusive with --data.",
               "output": "folder for the trials' models and the front's CSV and plot (default: outputs/search-STUDY)."},
    ),
    "auto": Command(
        summary="The smallest model that meets a budget: latency, accuracy and size, in one command.\n\ncompress "
                "search over the whole chain (distilled depth, head, FFN, hidden-size and vocabulary pruning, "
                "sharing,\nKD temperature and weights) with the budget as Optuna constraints. Before a trial trains, "
                "its model is built\nwith random weights, exported and timed on each runtime beside the teacher: a "
                "trial over a size or latency cap\nis pruned then, and one below the accuracy floor at a checkpoint "
                "is stopped. The smallest trial meeting it all\nis exported (HF, ONNX, int8, with export's parity "
                "checks) and measured again, and report.md holds the budget,\nits measured values, the recipe, the "
                "Pareto front and the closest runner-up. When nothing meets the budget it\nsays which constraint "
                "bound and exits 1, report written.",
        groups={"step": AutoConfig, "data": DataConfig, "tracking": TrackingConfig, "output": OutputConfig},
        flags=("teacher", *_DATA, "max_latency_ms", "latency_shape", "min_retention", "min_score", "max_params",
               "max_mb", "runtime", "space", "unlabeled", "trials", "time_budget", "workers", "study", "storage",
               "sampler", "sampler_seed", "latency_reps", "heartbeat", "retries", "max_length", "max_train",
               "output", *_COLUMNS, "tracking", "experiment"),
        helps={"task": "a GLUE task (sst2, mnli, ...) or bbc-news. Exclusive with --data.",
               "max_length": "tokens per example in every trial (default: the smaller of 128 and the teacher's "
                             "positions).",
               "max_train": "use a seeded random subset of this many training rows in every trial.",
               "output": "folder for the trials' models, the winner's export (model/) and report.md (default: "
                         "outputs/auto-STUDY)."},
    ),
}


def locate(command: str, flag: str) -> tuple[str, str]:
    """(group parameter, field name) holding `flag` in `command`."""
    spec = COMMANDS[command]
    if flag in spec.renamed:
        return spec.renamed[flag]
    for group, cls in spec.groups.items():
        if any(f.name == flag for f in fields(cls)):
            return group, flag
    raise KeyError(f"{command} has no flag {flag}")


def _field(cls: type, name: str):
    return next(f for f in fields(cls) if f.name == name)


def flag_defaults(command: str) -> dict[str, Any]:
    """Each flag of `command` and its default (`inspect.Parameter.empty` for a required one)."""
    spec = COMMANDS[command]
    out = {}
    for flag in spec.flags:
        group, name = locate(command, flag)
        f = _field(spec.groups[group], name)
        if flag in spec.defaults:
            out[flag] = spec.defaults[flag]
        elif f.default is not MISSING:
            out[flag] = f.default
        elif f.default_factory is not MISSING:
            out[flag] = f.default_factory()
        else:
            out[flag] = inspect.Parameter.empty
    return out


def flag_help(command: str, flag: str) -> str:
    spec = COMMANDS[command]
    if flag in spec.helps:
        return spec.helps[flag]
    group, name = locate(command, flag)
    return field_docs(spec.groups[group])[name]


def signature(command: str) -> inspect.Signature:
    """The command's flat signature, as jsonargparse reads a function's: one keyword per flag, typed, with its
    default."""
    spec = COMMANDS[command]
    defaults = flag_defaults(command)
    params = []
    for flag in spec.flags:
        group, name = locate(command, flag)
        hint = typing.get_type_hints(spec.groups[group])[name]
        params.append(inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[flag],
                                        annotation=hint))
    return inspect.Signature(params)


def docstring(command: str) -> str:
    """The summary, then one `name: help` line a flag, as jsonargparse reads a Google-style docstring."""
    lines = [COMMANDS[command].summary, "", "Args:"]
    lines += [f"    {flag}: {flag_help(command, flag)}" for flag in COMMANDS[command].flags]
    return "\n".join(lines)


def to_groups(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """Flat flag values (missing ones take the command's defaults) -> the command's config groups, by parameter."""
    spec = COMMANDS[command]
    unknown = set(values) - set(spec.flags)
    if unknown:
        raise TypeError(f"{command} has no flag {', '.join(sorted(unknown))}")
    defaults = flag_defaults(command)
    per_group: dict[str, dict[str, Any]] = {group: {} for group in spec.groups}
    for flag in spec.flags:
        value = values.get(flag, defaults[flag])
        if value is inspect.Parameter.empty:
            raise TypeError(f"{command} needs --{flag}")
        group, name = locate(command, flag)
        per_group[group][name] = value
    return {group: spec.groups[group](**kwargs) for group, kwargs in per_group.items()}


def default_group(command: str, group: str):
    """`command`'s default for one of its groups: the group's own defaults, with the command's where they differ
    (finetune's lr, prune's and share's epochs), for API callers who leave that group out."""
    spec = COMMANDS[command]
    cls = spec.groups[group]
    changes = {locate(command, flag)[1]: value for flag, value in spec.defaults.items()
               if locate(command, flag)[0] == group}
    return cls(**changes)


def with_defaults(command: str, **groups: Any) -> tuple:
    """The groups given, in order, each one left None replaced by `command`'s default for it (`default_group`):
    `data, training = with_defaults("finetune", data=data, training=training)`."""
    return tuple(value if value is not None else default_group(command, name) for name, value in groups.items())
