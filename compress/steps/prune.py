"""compress prune: structured pruning that really shrinks, really speeds up, and reloads anywhere.

load the parent classifier -> convert it to CompressBert -> drop layers -> score heads and neurons -> slice them
out -> mask weights for unstructured sparsity -> score before recovery -> recover by distillation from the parent
(run_training: fit, score both, measure latency in the same run, save, log to MLflow).
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.engine.run import RunHooks, RunPlan, TrainConfig
from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.results import StepResult
from compress.options.groups import (DataConfig, LossConfig, OutputConfig, PruneConfig, RuntimeConfig, TrackingConfig,
                                     TrainingConfig)


def _sizes_per_layer(config) -> tuple[list[int], list[int]]:
    heads = [config.attention_heads[a] for a in config.attention_map]
    widths = [config.intermediate_sizes[f] for f in config.ffn_map]
    return heads, widths


def prune(step: PruneConfig, data: DataConfig | None = None, loss: LossConfig | None = None,
          training: TrainingConfig | None = None, runtime: RuntimeConfig | None = None,
          tracking: TrackingConfig | None = None, output: OutputConfig | None = None,
          hooks: RunHooks | None = None) -> StepResult | None:
    """Prune heads, FFN neurons, layers and/or weights of `step.model`, then recover by distilling from it.

    `training.epochs` is the recovery's (--recover_epochs; 0 saves the pruned model as is). A group left None takes
    prune's defaults (`compress prune --help`). Returns the pruned model's folder, its metrics against the parent
    (flops_ratio, heads_kept, score_before_recovery, ...), the MLflow run id and the lineage.
    """
    from compress.data.tasks import load_task
    from compress.engine.state import RunState
    from compress.engine.trainer import resolve_accelerator
    from compress.infra.writes import check_run_paths
    from compress.models.loading import (check_encoder, load_config, require_task_head, resolve_max_length,
                                         resolve_model)
    from compress.options.bounds import check_all
    from compress.options.commands import with_defaults
    from compress.pruning import parse_drop_layers

    data, loss, training, runtime, tracking, output = with_defaults(
        "prune", data=data, loss=loss, training=training, runtime=runtime, tracking=tracking, output=output)
    # --- everything the user typed is checked before anything is loaded or written
    check_all(recover_epochs=training.epochs)
    step.validate()
    loss.validate(training=training.epochs > 0)
    if not step.vocab and (step.vocab_corpus is not None or step.vocab_top is not None or step.vocab_min_count != 1):
        raise CompressError("--vocab_corpus, --vocab_top and --vocab_min_count choose what --vocab keeps: give --vocab "
                            "with them")
    if not _structural(step) and not step.vocab:
        raise CompressError("nothing to prune: give --heads, --ffn, --hidden, --drop_layers, --sparsity or --vocab")
    if step.vocab_top is not None and step.vocab_corpus is None:
        raise CompressError(f"--vocab_top {step.vocab_top}: it keeps the most frequent tokens of --vocab_corpus; "
                            "give that file too")
    corpus = _read_corpus(step.vocab_corpus) if step.vocab_corpus is not None else []
    cfg = TrainConfig(training, runtime, data.max_length, loss)
    cfg.validate(training=False)  # recover_epochs 0 skips recovery

    task_data = load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                          max_train=data.max_train, seed=training.seed, quoting=data.quoting)
    path = resolve_model(step.model, "--model")
    config = load_config(path, "--model")
    cfg.max_length = resolve_max_length(data.max_length, [config])
    check_encoder(config, "--model")  # every encoder distill takes converts to CompressBert (test_prune checks)
    require_task_head(config, task_data, step.model)
    dropped = parse_drop_layers(step.drop_layers, config.num_hidden_layers)
    desc = (f"h{step.heads:g}-f{step.ffn:g}" + (f"-w{step.hidden:g}" if step.hidden else "")
            + (f"-d{len(dropped)}" if dropped else "")
            + (f"-s{step.sparsity:g}" if step.sparsity else "") + ("-v" if step.vocab else ""))
    default = f"outputs/prune-{slug(step.model)}-{slug(task_data.name)}-{desc}"
    out = check_run_paths(output.output if output.output is not None else default, reads=(path, data.data),
                          tracking=tracking.tracking, cache=loss.teacher_cache if loss.cache_teacher else None)
    RunState(out, output.resume, output.overwrite)  # refuses an existing --output now, not after minutes of scoring

    plan = RunPlan(command="prune", name=f"prune {slug(step.model)} {desc} {step.criterion}/{step.scope}", output=out,
                   resume=output.resume, overwrite=output.overwrite)
    return _prune(step, path, (dropped, corpus), resolve_accelerator(runtime.accelerator), task_data, cfg, plan,
                  tracking, hooks)


def _structural(step: PruneConfig) -> bool:
    """Whether the step cuts heads, neurons, hidden dimensions, layers or weights (else only the vocabulary)."""
    return not (step.heads == step.ffn == step.hidden == step.sparsity == 0
                and step.drop_layers in (None, 0, [], ""))


def _read_corpus(path: str) -> list[str]:
    """--vocab_corpus: one text a line, blank lines skipped."""
    file = Path(path)
    if not file.is_file():
        raise CompressError(f"--vocab_corpus {path}: no such file (give a text file, one text a line)")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise CompressError(f"--vocab_corpus {path}: not UTF-8 text (byte {err.start})") from None
    texts = [line for line in lines if line]
    if not texts:
        raise CompressError(f"--vocab_corpus {path}: the file holds no text")
    return texts


def _prune(step: PruneConfig, path: str, cuts: tuple[list[int], list[str]], accelerator: str, task_data,
           cfg: TrainConfig, plan: RunPlan, tracking: TrackingConfig, hooks: RunHooks | None) -> StepResult | None:
    """`cuts`: the layers to drop, and the --vocab_corpus texts."""
    import copy
    import functools
    import itertools

    import torch

    from compress.data.datamodule import TaskDataModule
    from compress.engine import logit_cache
    from compress.engine.run import RunModels, run_training
    from compress.engine.scoring import score
    from compress.engine.trainer import quiet_libraries, resolve_precision
    from compress.models.compress_bert import from_bert, to_compress_config
    from compress.models.loading import load_classifier, load_tokenizer
    from compress.pruning import (CRITERIA, HIDDEN_CRITERIA, apply_sparsity, choose_kept, drop_layers, flops_per_token,
                                  kept_dimensions, make_permanent, slice_heads, slice_hidden, slice_neurons,
                                  sparsity_of)

    heads, ffn, sparsity, criterion, scope = step.heads, step.ffn, step.sparsity, step.criterion, step.scope
    seed, batch_size, loss = cfg.training.seed, cfg.training.batch_size, cfg.loss
    dropped, corpus = cuts
    quiet_libraries()
    torch.manual_seed(seed)
    parent = load_classifier(path, task_data.label_names, "--model").eval()
    tokenizer = load_tokenizer(path, "--model", parent.config, cfg.max_length)
    # what --vocab keeps, now: a tokenizer it cannot rewrite, or texts that use every token, fail before any work
    kept = _vocab_kept(parent, tokenizer, task_data, corpus, step) if step.vocab else None
    # a vocabulary cut alone keeps the parent's class (a BERT stays a BERT, loaded without compress)
    student = from_bert(parent) if _structural(step) else parent
    if student is parent:  # already a CompressBert, or nothing structural: prune a copy, the parent stays the teacher
        student = copy.deepcopy(parent)
    student.eval()

    drop_layers(student, dropped)
    # a layer may lose all its heads only when the user is removing layers anyway
    minimum = 0 if dropped else 1
    datamodule = TaskDataModule(task_data, tokenizer, batch_size=batch_size, max_length=cfg.max_length, seed=seed)
    device = "cuda" if accelerator == "cuda" else "cpu"
    what = f"{step.importance_batches} batches of {batch_size} on {device}" if criterion == "taylor" else "weights"

    def scored(criteria: dict, kind: str):
        importance = functools.partial(criteria[criterion], seed=seed) if criterion == "random" else criteria[criterion]
        datamodule.setup()
        print(f"scoring {kind} by {criterion} ({what})", file=sys.stderr)
        scores = importance(student.to(device), itertools.islice(datamodule.train_dataloader(),
                                                                 step.importance_batches))
        student.cpu()
        return scores

    if heads or ffn:
        scores = scored(CRITERIA, "heads and neurons")
        if heads:
            slice_heads(student, choose_kept(scores.heads, heads, scope, minimum))
        if ffn:
            slice_neurons(student, choose_kept(scores.neurons, ffn, scope, minimum))
    if step.hidden:
        # scored after the heads and neurons go, so each dimension is judged by the model that will keep it
        slice_hidden(student, kept_dimensions(scored(HIDDEN_CRITERIA, "hidden dimensions"), step.hidden,
                                              multiple=8))
    apply_sparsity(student, sparsity, scope)

    p_config, s_config = parent.config, student.config
    head_layers, ffn_layers = _sizes_per_layer(to_compress_config(s_config))
    parent_heads, parent_ffn = (sum(x) for x in _sizes_per_layer(to_compress_config(p_config)))
    flops_ratio = flops_per_token(s_config) / flops_per_token(p_config)
    print(f"pruned: {len(head_layers)} of {p_config.num_hidden_layers} layers, heads per layer {head_layers}, "
          f"FFN width per layer {ffn_layers}, hidden size {s_config.hidden_size} of {p_config.hidden_size}, "
          f"FLOPs/token x{flops_ratio:.3f}"
          + (f", {sparsity_of(student):.1%} of encoder weights zeroed" if sparsity else ""), file=sys.stderr)

    precision = resolve_precision(cfg.runtime.precision, accelerator)
    before = score(student, datamodule, task_data.metric, task_data.num_labels, accelerator, precision)
    print(f"{task_data.metric} before recovery: {before:.4f}", file=sys.stderr)
    student.cpu()

    measured_sparsity = sparsity_of(student) if _structural(step) else 0.0
    extra = {"heads_kept": sum(head_layers), "ffn_kept": sum(ffn_layers), "layers_kept": len(head_layers),
             "heads_kept_fraction": sum(head_layers) / parent_heads, "ffn_kept_fraction": sum(ffn_layers) / parent_ffn,
             "hidden_size": s_config.hidden_size, "hidden_kept_fraction": s_config.hidden_size / p_config.hidden_size,
             "sparsity": measured_sparsity, "flops_ratio": flops_ratio, "score_before_recovery": before}
    pruning = {"heads": heads, "ffn": ffn, "hidden": step.hidden, "drop_layers": str(dropped), "criterion": criterion,
               "scope": scope, "sparsity_requested": sparsity, "importance_batches": step.importance_batches,
               "heads_per_layer": str(head_layers), "ffn_per_layer": str(ffn_layers)}
    if step.vocab:
        pruning |= {"vocab": True, "vocab_corpus": step.vocab_corpus or "", "vocab_top": step.vocab_top,
                    "vocab_min_count": step.vocab_min_count}
        if not _structural(step) and cfg.training.epochs:
            print(f"note: --vocab alone leaves the logits of kept text as they were, so it needs no recovery; the "
                  f"{cfg.training.epochs} recovery epoch(s) train the copy on its parent (--recover_epochs 0 skips "
                  "them)", file=sys.stderr)
    cache_file = (logit_cache.file_for_run(Path(loss.teacher_cache), path, task_data, tokenizer, cfg)
                  if loss.cache_teacher else None)
    plan.params = {"model": step.model, "model_path": path, "recover_epochs": cfg.training.epochs,
                   "temperature": loss.temperature, "alpha_kd": loss.alpha_kd, "alpha_ce": loss.alpha_ce,
                   "alpha_hidden": loss.alpha_hidden, "max_train": task_data.flags.get("max_train"),
                   "cache_teacher": loss.cache_teacher, **pruning}
    plan.lineage = {"parent": step.model, "parent_path": path, "pruning": pruning}
    plan.extra_metrics = extra
    plan.finalize = make_permanent if kept is None else functools.partial(
        _finalize_vocab, plan=plan, task=task_data, tokenizer=tokenizer, kept=kept, masked=_structural(step))
    models = RunModels(student=student, tokenizer=tokenizer, teacher=parent, cache_file=cache_file)
    result = run_training(plan, models, task_data, cfg, tracking, hooks)
    if result is not None and measured_sparsity:
        print(f"sparsity: {measured_sparsity:.1%} of the encoder's Linear weights are zero, stored dense "
              f"({result.metrics['student_mb']:.1f} MB on disk); the measured speedup "
              f"{result.metrics.get('speedup', 0):.2f}x comes from the structural pruning alone", file=sys.stderr)
    return result


def _vocab_kept(parent, tokenizer, task_data, corpus: list[str], step: PruneConfig) -> list[int]:
    """The ids --vocab keeps (the training texts', the corpus's), refused now, not after recovery, if the cut cannot
    be made (a tokenizer it cannot rewrite, texts that use every token)."""
    from compress.pruning import kept_ids, pruned_order

    kept = kept_ids(tokenizer, task_data.train_texts, corpus_texts=corpus, top_n=step.vocab_top,
                    min_count=step.vocab_min_count)
    pruned_order(parent, tokenizer, kept)
    return kept


def _finalize_vocab(student, *, plan: RunPlan, task, tokenizer, kept: list[int], masked: bool):
    """After recovery: masks made permanent (`masked`: a structural cut came first), then the vocabulary cut.
    Returns the pruned tokenizer, which the run saves and scores the student with; the dev set's unk_rate and
    dropped_rate go into the run's metrics."""
    from compress.pruning import dropped_rate, make_permanent, prune_vocabulary, unk_rate

    if masked:
        make_permanent(student)
    before = student.get_input_embeddings().num_embeddings
    _, pruned, _ = prune_vocabulary(student, tokenizer, kept)
    after = student.config.vocab_size
    rates = {"unk_rate": unk_rate(pruned, task.dev_texts, tokenizer),
             "dropped_rate": dropped_rate(tokenizer, task.dev_texts, kept)}
    plan.extra_metrics |= {"vocab_size": after, "vocab_size_before": before, **rates}
    print(f"vocabulary: {before:,} -> {after:,} tokens; on the dev set {rates['unk_rate']:.3%} of tokens became "
          f"{pruned.unk_token or 'unknown'} and {rates['dropped_rate']:.2%} were spelled from smaller kept pieces or "
          "lost", file=sys.stderr)
    return pruned
