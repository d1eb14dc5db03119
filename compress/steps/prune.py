"""compress prune: structured pruning that really shrinks, really speeds up, and reloads anywhere.

load the parent classifier -> convert it to CompressBert -> drop layers -> score heads and neurons -> slice them
out -> mask weights for unstructured sparsity -> score before recovery -> recover by distillation from the parent
(run_training: fit, score both, measure latency in the same run, save, log to MLflow).
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING


def _sizes_per_layer(config) -> tuple[list[int], list[int]]:
    heads = [config.attention_heads[a] for a in config.attention_map]
    widths = [config.intermediate_sizes[f] for f in config.ffn_map]
    return heads, widths


def prune(
    model: str,
    task: str | None = None,
    data: str | None = None,
    heads: float = 0.0,
    ffn: float = 0.0,
    drop_layers: int | list[int] | str | None = None,
    criterion: str = "taylor",
    scope: str = "layer",
    sparsity: float = 0.0,
    recover_epochs: int = 2,
    importance_batches: int = 32,
    output: str | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    temperature: float = 2.0,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.5,
    alpha_hidden: float = 1.0,
    cache_teacher: bool = False,
    teacher_cache: str = "outputs/teachers",
    max_length: int = 128,
    max_train: int | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    seed: int = 42,
    precision: str = "auto",
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    num_workers: int | None = None,
    checkpoint_every: int = 0,
    checkpoint_minutes: float = 5.0,
    latency_reps: int = 5,
    tracking: str = DEFAULT_TRACKING,
    experiment: str = DEFAULT_EXPERIMENT,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Prune heads, FFN neurons, layers and/or weights of a BERT-family classifier; recover by distilling from it.

    Score, size, FLOPs and speed measured against the unpruned parent in the same run are logged to MLflow.

    Heads, neurons and layers are sliced out, so the saved model is smaller and faster; it loads with
    AutoModelForSequenceClassification (after `import compress`) or anywhere with trust_remote_code=True.

    Args:
        model: the parent: a saved model folder (or hub name) with a classifier for the task, e.g. from
            `compress finetune`. Model type bert, ernie, electra, distilbert, roberta, xlm-roberta or
            camembert, or compress_bert from an earlier prune or share.
        task: a GLUE task (sst2, mnli, ...) or bbc-news, the offline demo task. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column.
        heads: fraction of the attention heads to remove, in [0, 1).
        ffn: fraction of the FFN neurons to remove, in [0, 1).
        drop_layers: whole layers to remove: a count N (the top N layers, nearest the classifier) or a list of
            0-based layer indices such as 0,3.
        criterion: importance of heads and neurons: taylor (accumulated |dL/dmask| over training batches, Michel
            et al. 2019), magnitude (L2 norm of their weights) or random (a baseline).
        scope: layer removes the same fraction in every layer; global ranks heads (and neurons) across layers,
            so each layer keeps its own number. Every layer keeps at least one head and one neuron unless
            --drop_layers is given.
        sparsity: fraction of the remaining encoder weights zeroed by magnitude (unstructured; per Linear with
            --scope layer, across all with global). Zeros are stored dense: no smaller on disk, no faster.
        recover_epochs: epochs of distillation from the parent after pruning; 0 saves the pruned model as is.
        importance_batches: training batches the taylor criterion accumulates gradients over.
        output: where the pruned model is written (default: outputs/prune-MODEL-TASK-hH-fF[-dN][-sS]).
        batch_size: examples per batch, for scoring importance and for recovery (per device).
        lr: peak learning rate of the recovery, after linear warmup then linear decay.
        warmup: fraction of the recovery steps spent warming the learning rate up.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
        temperature: softmax temperature of the parent's soft targets; the KL term is scaled by T².
        alpha_kd: weight of the soft-target KL.
        alpha_ce: weight of the hard-label cross-entropy.
        alpha_hidden: weight of the hidden-state cosine loss against the parent's layers; 0 turns it off.
        cache_teacher: keep the parent's logits from the first recovery epoch and skip it after that; they are also
            stored under --teacher_cache (keyed by its weights, the training rows, tokenizer, --max_length and
            precision), so the next run on the same parent and data never runs it. Needs --alpha_hidden 0.
        teacher_cache: folder holding cached teacher logits for reuse (shared with compress distill).
        max_length: tokens per example; longer inputs are truncated.
        max_train: use a seeded random subset of this many training rows (importance and recovery).
        text_column: column(s) holding the text, "a" or "a,b" for pairs (default: sentence or text, or a known pair).
        label_column: column holding the label.
        seed: seed for data order, the random criterion, and dropout.
        precision: auto (bf16-mixed on a GPU, 32-true on a CPU), 32-true, bf16-mixed or 16-mixed.
        accelerator: auto, cpu or cuda (importance is scored on it too).
        devices: devices for the Lightning Trainer (a count, or auto).
        strategy: Lightning strategy, e.g. auto, ddp, fsdp.
        num_workers: data loader worker processes (default: 4 on a GPU, 0 on a CPU).
        checkpoint_every: optimizer steps between checkpoints; 0 (the default) checkpoints by time instead.
        checkpoint_minutes: minutes of training between checkpoints when checkpoint_every is 0; a killed run
            loses at most this much.
        latency_reps: timed rounds for the latency measurement (pruned and parent interleaved).
        tracking: MLflow tracking URI (default: sqlite under ./mlruns).
        experiment: MLflow experiment name.
        resume: continue an interrupted run writing to the same --output (the pruning is recomputed, the same
            for the same seed and data).
        overwrite: replace an existing --output.
    """
    from compress.models.loading import check_encoder, load_config, require_task_head, resolve_model
    from compress.options.bounds import check_all, check_choice
    from compress.engine.run import TrainConfig, check_distill_flags

    # --- everything the user typed is checked before anything is loaded or written
    check_all(heads=heads, ffn=ffn, sparsity=sparsity, recover_epochs=recover_epochs,
              importance_batches=importance_batches)
    check_choice("criterion", criterion)
    check_choice("scope", scope)
    check_distill_flags(temperature, {"alpha_kd": alpha_kd, "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden},
                        training=recover_epochs > 0, cache_teacher=cache_teacher)
    if heads == ffn == sparsity == 0 and drop_layers in (None, 0, [], ""):
        raise CompressError("nothing to prune: give --heads, --ffn, --drop_layers or --sparsity")
    cfg = TrainConfig(epochs=recover_epochs, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                      max_length=max_length, seed=seed, precision=precision, accelerator=accelerator,
                      devices=devices, strategy=strategy, num_workers=num_workers,
                      checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                      latency_reps=latency_reps)
    cfg.validate(training=False)  # recover_epochs 0 skips recovery

    from compress.data.tasks import load_task
    from compress.pruning import parse_drop_layers
    from compress.infra.paths import check_run_paths
    from compress.engine.state import RunState
    from compress.engine.trainer import resolve_accelerator

    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=max_train,
                          seed=seed)
    path = resolve_model(model, "--model")
    config = load_config(path, "--model")
    check_encoder(config, "--model")  # every encoder distill takes converts to CompressBert (test_prune checks)
    require_task_head(config, task_data, model)
    dropped = parse_drop_layers(drop_layers, config.num_hidden_layers)
    accelerator_name = resolve_accelerator(accelerator)
    desc = f"h{heads:g}-f{ffn:g}" + (f"-d{len(dropped)}" if dropped else "") + (f"-s{sparsity:g}" if sparsity else "")
    default = f"outputs/prune-{slug(model)}-{slug(task_data.name)}-{desc}"
    out = check_run_paths(output if output is not None else default, reads=(path, data), tracking=tracking,
                          cache=teacher_cache if cache_teacher else None)
    RunState(out, resume, overwrite)  # refuses an existing --output now, not after minutes of scoring

    return _prune(path=path, model_name=model, task_data=task_data, cfg=cfg, out=out, heads=heads, ffn=ffn,
                  dropped=dropped, criterion=criterion, scope=scope, sparsity=sparsity,
                  importance_batches=importance_batches, accelerator=accelerator_name, desc=desc,
                  temperature=temperature, alpha_kd=alpha_kd, alpha_ce=alpha_ce, alpha_hidden=alpha_hidden,
                  tracking=tracking, experiment=experiment, resume=resume, overwrite=overwrite, max_train=max_train,
                  cache_teacher=cache_teacher, teacher_cache=teacher_cache)


def _prune(*, path: str, model_name: str, task_data, cfg, out: Path, heads: float, ffn: float, dropped: list[int],
           criterion: str, scope: str, sparsity: float, importance_batches: int, accelerator: str, desc: str,
           temperature: float, alpha_kd: float, alpha_ce: float, alpha_hidden: float, tracking: str,
           experiment: str, resume: bool, overwrite: bool, max_train: int | None, cache_teacher: bool,
           teacher_cache: str):
    import copy
    import functools
    import itertools

    import torch

    from compress.engine import logit_cache
    from compress.data.datamodule import TaskDataModule
    from compress.models.compress_bert import from_bert, to_compress_config
    from compress.models.loading import load_classifier, load_tokenizer
    from compress.engine.distill_module import LossWeights
    from compress.pruning import (CRITERIA, apply_sparsity, choose_kept, drop_layers, flops_per_token, make_permanent,
        slice_heads, slice_neurons, sparsity_of)
    from compress.engine.run import run_training
    from compress.engine.trainer import quiet_libraries, resolve_precision
    from compress.engine.scoring import score

    quiet_libraries()
    torch.manual_seed(cfg.seed)
    parent = load_classifier(path, task_data.label_names, "--model").eval()
    tokenizer = load_tokenizer(path, "--model", parent.config, cfg.max_length)
    student = from_bert(parent)
    if student is parent:  # already a CompressBert: prune a copy, the parent stays the teacher
        student = copy.deepcopy(parent)
    student.eval()

    drop_layers(student, dropped)
    # a layer may lose all its heads only when the user is removing layers anyway
    minimum = 0 if dropped else 1
    datamodule = TaskDataModule(task_data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                seed=cfg.seed)
    if heads or ffn:
        device = "cuda" if accelerator == "cuda" else "cpu"
        importance = CRITERIA[criterion]
        if criterion == "random":
            importance = functools.partial(importance, seed=cfg.seed)
        datamodule.setup()
        batches = itertools.islice(datamodule.train_dataloader(), importance_batches)
        what = f"{importance_batches} batches of {cfg.batch_size} on {device}" if criterion == "taylor" else "weights"
        print(f"scoring heads and neurons by {criterion} ({what})", file=sys.stderr)
        scores = importance(student.to(device), batches)
        student.cpu()
        if heads:
            slice_heads(student, choose_kept(scores.heads, heads, scope, minimum))
        if ffn:
            slice_neurons(student, choose_kept(scores.neurons, ffn, scope, minimum))
    apply_sparsity(student, sparsity, scope)

    p_config, s_config = parent.config, student.config
    head_layers, ffn_layers = _sizes_per_layer(s_config)
    parent_heads, parent_ffn = (sum(x) for x in _sizes_per_layer(to_compress_config(p_config)))
    flops_ratio = flops_per_token(s_config) / flops_per_token(p_config)
    print(f"pruned: {len(head_layers)} of {p_config.num_hidden_layers} layers, heads per layer {head_layers}, "
          f"FFN width per layer {ffn_layers}, FLOPs/token x{flops_ratio:.3f}"
          + (f", {sparsity_of(student):.1%} of encoder weights zeroed" if sparsity else ""), file=sys.stderr)

    precision = resolve_precision(cfg.precision, accelerator)
    before = score(student, datamodule, task_data.metric, task_data.num_labels, accelerator, precision)
    print(f"{task_data.metric} before recovery: {before:.4f}", file=sys.stderr)
    student.cpu()

    measured_sparsity = sparsity_of(student)
    extra = {"heads_kept": sum(head_layers), "ffn_kept": sum(ffn_layers), "layers_kept": len(head_layers),
             "heads_kept_fraction": sum(head_layers) / parent_heads, "ffn_kept_fraction": sum(ffn_layers) / parent_ffn,
             "sparsity": measured_sparsity, "flops_ratio": flops_ratio, "score_before_recovery": before}
    weights = LossWeights(kd=alpha_kd, ce=alpha_ce, hidden=alpha_hidden, attn=0.0)
    pruning = {"heads": heads, "ffn": ffn, "drop_layers": str(dropped), "criterion": criterion, "scope": scope,
               "sparsity_requested": sparsity, "importance_batches": importance_batches,
               "heads_per_layer": str(head_layers), "ffn_per_layer": str(ffn_layers)}
    cache_file = (logit_cache.file_for_run(Path(teacher_cache), path, task_data, tokenizer, cfg)
                  if cache_teacher else None)
    result = run_training(
        command="prune", run_name=f"prune {slug(model_name)} {desc} {criterion}/{scope}", student=student,
        teacher=parent, tokenizer=tokenizer, task=task_data, output=out, cfg=cfg, weights=weights,
        temperature=temperature, tracking=tracking, experiment=experiment, resume=resume, overwrite=overwrite,
        cache_teacher=cache_teacher, cache_file=cache_file,
        params={"model": model_name, "model_path": path, "recover_epochs": cfg.epochs, "temperature": temperature,
                "alpha_kd": alpha_kd, "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden, "max_train": max_train,
                "cache_teacher": cache_teacher, **pruning},
        lineage={"parent": model_name, "parent_path": path, "pruning": pruning},
        extra_metrics=extra, finalize=make_permanent,
    )
    if result is not None and measured_sparsity:
        print(f"sparsity: {measured_sparsity:.1%} of the encoder's Linear weights are zero, stored dense "
              f"({result.metrics['student_mb']:.1f} MB on disk); the measured speedup "
              f"{result.metrics.get('speedup', 0):.2f}x comes from the structural pruning alone", file=sys.stderr)
