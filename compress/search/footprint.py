"""A trial's footprint before it trains: the model its values make, its parameters, and what each runtime ships
(compress export's own files) with its size and its latency at --latency_shape, timed interleaved with the teacher.

Weights change neither a model's size nor its speed; its shape does. So the model is built with random weights by
the functions the steps themselves run (distill's student_from_teacher, prune's slicing and vocabulary cut, share's
conversion), exported by compress export, and timed: a trial sure to break a size or latency cap is known before
anything trains, and the numbers it is judged by are those of the artefact it would ship as.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.infra.errors import CompressError
from compress.search.budget import Budget, distance, violations

# the file compress export writes for each runtime (torch: the folder's safetensors), and the --format that makes it
RUNTIME_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torch": None}
_FORMATS = {"onnx": "onnx", "onnx-int8": "int8"}
# per worker process: a shape is built, exported and timed once, however many trials draw it
_MEASURED: dict[str, Footprint] = {}
_CACHE: dict[Any, Any] = {}


@dataclass
class Footprint:
    """What a trial's model weighs and how fast each runtime runs it, beside the teacher in the same rounds."""

    params: int
    shape: str
    runtimes: dict[str, dict[str, float]]
    """runtime -> mb, p50_ms, p95_ms."""
    teacher: dict[str, float]
    """the teacher's p50_ms and p95_ms (PyTorch fp32, the model as the user has it)."""
    notes: list[str] = field(default_factory=list)

    def values(self, runtime: str) -> dict[str, float]:
        """A runtime's numbers under the names a trial's metrics use (what the budget judges)."""
        m = self.runtimes[runtime]
        return {"student_params": self.params, "student_mb": m["mb"], "latency_ms": m["p50_ms"],
                "latency_p95_ms": m["p95_ms"], "teacher_latency_ms": self.teacher["p50_ms"],
                "teacher_latency_p95_ms": self.teacher["p95_ms"]}

    def choose(self, budget: Budget) -> tuple[str, bool]:
        """The runtime the trial ships as: the fastest that meets every cap, else the one closest to them (and
        False: the trial cannot meet the budget, whatever it learns)."""
        judged = {rt: violations(budget, self.values(rt)) for rt in self.runtimes}
        fitting = [rt for rt, found in judged.items() if all(v <= 0 for v in found.values())]
        if fitting:
            return min(fitting, key=lambda rt: self.runtimes[rt]["p50_ms"]), True
        return min(judged, key=lambda rt: (distance(judged[rt]), self.runtimes[rt]["p50_ms"])), False


def measure(ctx, steps: list[tuple[str, dict]], flags: dict[str, dict[str, Any]]) -> Footprint:
    """The footprint of the model a trial's `steps` make from `ctx.teacher_path`, on each of the budget's runtimes."""
    from compress.models.measure import count_params

    budget: Budget = ctx.budget
    model, tokenizer = shaped_model(ctx, steps, flags)
    key = json.dumps([_shape_key(model.config), budget.runtimes, budget.latency_shape, budget.latency_reps])
    if key in _MEASURED:
        return _MEASURED[key]
    params = count_params(model)
    with tempfile.TemporaryDirectory(prefix="compress-footprint-") as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        files, notes = {}, []
        if "torch" in budget.runtimes:
            files["torch"] = folder
        wanted = [rt for rt in budget.runtimes if rt != "torch"]
        if wanted:
            try:
                files |= _export(folder, Path(tmp) / "export", wanted, ctx.tracking)
            except CompressError as err:  # the same refusal the winner's export would meet: not a runtime for it
                notes.append(f"{'/'.join(wanted)} left out: {err}")
        if not files:
            raise CompressError(f"--runtime {'/'.join(budget.runtimes)}: {notes[0]}")
        times, mb = time_artefacts(files, ctx.teacher_path, budget.latency_shape, budget.latency_reps)
    from compress.steps.bench import percentile

    runtimes = {rt: {"mb": mb[rt], "p50_ms": percentile(times[rt], 50), "p95_ms": percentile(times[rt], 95)}
                for rt in files}
    teacher = {"p50_ms": percentile(times["teacher"], 50), "p95_ms": percentile(times["teacher"], 95)}
    found = Footprint(params, describe_shape(model.config), runtimes, teacher, notes)
    _MEASURED[key] = found
    return found


# --- the model a trial would train, with random weights ---------------------------------------------------------

def shaped_model(ctx, steps: list[tuple[str, dict]], flags: dict[str, dict[str, Any]]):
    """The model and tokenizer `steps` end with, built as the steps build them, random weights throughout."""
    import copy

    from compress.models.loading import student_from_teacher, teacher_layer_map
    from compress.steps.share import convert

    base, tokenizer = _random_teacher(ctx.teacher_path)
    model = base
    for step, kwargs in steps:
        def get(flag, step=step, kwargs=kwargs):
            return kwargs.get(flag, flags[step].get(flag))

        if step == "distill":
            model = student_from_teacher(base, teacher_layer_map(base.config.num_hidden_layers, get("layers")))
        elif step == "prune":
            model, tokenizer = _pruned(copy.deepcopy(model) if model is base else model, tokenizer, get, ctx)
        elif step == "share":
            model, _ = convert(model, share=get("share"), groups=get("groups"), embedding=get("embedding"),
                               init="first")
    return model.eval(), tokenizer


def _random_teacher(path: str):
    """The teacher's architecture with random weights, and its tokenizer (once per process)."""
    if ("teacher", path) not in _CACHE:
        import torch
        from transformers import AutoModelForSequenceClassification

        import compress.models.compress_bert  # noqa: F401  (registers compress_bert: a pruned teacher)
        from compress.models.loading import load_config, load_tokenizer

        config = load_config(path, "--teacher")
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
        _CACHE[("teacher", path)] = (model, load_tokenizer(path, "--teacher", config))
    return _CACHE[("teacher", path)]


def _pruned(model, tokenizer, get, ctx):
    """prune's cuts on `model` (steps.prune._prune, with every score equal): the same counts per layer, the same
    rounding of the hidden width, the same vocabulary."""
    import torch

    from compress.models.compress_bert import from_bert
    from compress.options.commands import to_groups
    from compress.pruning import (choose_kept, drop_layers, kept_dimensions, parse_drop_layers, prune_vocabulary,
                                  slice_heads, slice_hidden, slice_neurons)
    from compress.steps.prune import _structural

    step = to_groups("prune", {"model": "-", **{f: get(f) for f in ("heads", "ffn", "hidden", "drop_layers",
                                                                     "sparsity", "scope", "vocab")}})["step"]
    if _structural(step):
        model = from_bert(model)
        dropped = parse_drop_layers(step.drop_layers, model.config.num_hidden_layers)
        drop_layers(model, dropped)
        minimum = 0 if dropped else 1
        encoder = model.bert.encoder
        if step.heads:
            slice_heads(model, choose_kept([torch.zeros(a.heads) for a in encoder.attention], step.heads, step.scope,
                                           minimum))
        if step.ffn:
            slice_neurons(model, choose_kept([torch.zeros(f.intermediate.out_features) for f in encoder.ffn],
                                             step.ffn, step.scope, minimum))
        if step.hidden:
            slice_hidden(model, kept_dimensions(torch.zeros(model.config.hidden_size), step.hidden, multiple=8))
    if step.vocab:
        _, tokenizer, _ = prune_vocabulary(model, tokenizer, _vocab_kept(tokenizer, get, ctx))
    return model, tokenizer


def _vocab_kept(tokenizer, get, ctx) -> list[int]:
    """The ids prune --vocab keeps for these rows and flags (the training rows' tokens: loaded and counted once)."""
    from compress.data.tasks import load_task
    from compress.pruning import kept_ids
    from compress.steps.prune import _read_corpus

    key = ("vocab", ctx.teacher_path, get("max_train"), get("seed"), get("vocab_min_count"), get("vocab_corpus"),
           get("vocab_top"))
    if key not in _CACHE:
        task = load_task(ctx.task, ctx.data, text_column=ctx.text_column, label_column=ctx.label_column,
                         max_train=get("max_train"), seed=get("seed"), quoting=ctx.quoting)
        corpus = _read_corpus(get("vocab_corpus")) if get("vocab_corpus") else []
        _CACHE[key] = kept_ids(tokenizer, task.train_texts, corpus_texts=corpus, top_n=get("vocab_top"),
                               min_count=get("vocab_min_count"))
    return _CACHE[key]


def _shape_key(config) -> dict:
    """What in a config decides size and speed (names and label texts do not)."""
    drop = {"_name_or_path", "id2label", "label2id", "architectures", "transformers_version", "auto_map"}
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in drop}


def describe_shape(config) -> str:
    """'3 layers, heads [6, 6, 6], FFN [1536, 1536, 1536], hidden 384, vocab 9,876' (and what a shared model
    shares)."""
    parts = [f"{config.num_hidden_layers} layer{'s' if config.num_hidden_layers != 1 else ''}"]
    heads = getattr(config, "attention_heads", None)
    ffn = getattr(config, "intermediate_sizes", None)
    parts.append(f"heads {heads}" if heads else f"{getattr(config, 'num_attention_heads', '?')} heads")
    parts.append(f"FFN {ffn}" if ffn else f"FFN {getattr(config, 'intermediate_size', '?')}")
    parts.append(f"hidden {config.hidden_size}")
    parts.append(f"vocab {config.vocab_size:,}")
    if getattr(config, "attention_map", None) and len(set(config.attention_map)) < config.num_hidden_layers:
        parts.append(f"shared attention {config.attention_map}")
    if getattr(config, "ffn_map", None) and len(set(config.ffn_map)) < config.num_hidden_layers:
        parts.append(f"shared FFN {config.ffn_map}")
    if getattr(config, "num_hidden_groups", None):
        parts.append(f"{config.num_hidden_groups} shared group(s)")
    if getattr(config, "embedding_size", None) and config.embedding_size != config.hidden_size:
        parts.append(f"embedding {config.embedding_size}")
    return ", ".join(parts)


# --- the artefacts and their timing -----------------------------------------------------------------------------

def _export(folder: Path, out: Path, runtimes: list[str], tracking: str) -> dict[str, Path]:
    """compress export's ONNX files of `folder` for `runtimes` (its fusions and parity check included)."""
    from compress.options.groups import DataConfig, ExportConfig, OutputConfig, TrackingConfig
    from compress.steps.export import export

    formats = [_FORMATS[rt] for rt in ("onnx", "onnx-int8") if rt in runtimes]
    with contextlib.redirect_stderr(io.StringIO()):  # its table, once per shape, would bury the trials' lines
        export(ExportConfig(model=str(folder), format=",".join(formats)), DataConfig(), TrackingConfig(tracking),
               OutputConfig(output=str(out), overwrite=True))
    return {rt: out / RUNTIME_FILES[rt] for rt in runtimes}


def time_artefacts(files: dict[str, Path], teacher: str, shape: tuple[int, int], reps: int
          ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each artefact's and the teacher's forward times (ms) on one random batch of `shape`, in interleaved rounds
    (compress bench's candidates and runners), and each artefact's MB."""
    import numpy as np
    import torch

    from compress.models.measure import interleaved_ms
    from compress.steps.bench import load_candidate, make_runner

    threads = torch.get_num_threads()
    if ("bench-teacher", teacher, threads) not in _CACHE:
        _CACHE[("bench-teacher", teacher, threads)] = load_candidate(teacher, set(), "cpu", threads)
    candidates = {"teacher": _CACHE[("bench-teacher", teacher, threads)]}
    taken = {"teacher"}
    candidates |= {rt: load_candidate(str(path), taken, "cpu", threads) for rt, path in files.items()}
    vocab = min(c.vocab_size for c in candidates.values() if c.vocab_size)
    ids = np.random.default_rng(0).integers(1, max(2, vocab), shape, dtype=np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    runners = {name: make_runner(c, batch, "cpu") for name, c in candidates.items()}
    times = interleaved_ms(runners, warmup=2, reps=reps)
    return times, {rt: candidates[rt].mb for rt in files}
