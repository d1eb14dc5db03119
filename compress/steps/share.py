"""compress share: ALBERT's cross-layer sharing and factorised embedding, applied to a BERT that is already trained.

load the classifier -> (regmean: record its layers' input Grams on training rows) -> convert: groups of
consecutive layers share one set of weights, the word embedding is cut to rank E -> score before recovery ->
recover by distillation from the original (run_training: fit, score both, latency in the same run, save, MLflow).

--share all writes a standard AlbertForSequenceClassification; --share attention|ffn cannot be written as
ALBERT and writes compress's CompressBert (its code saved beside the weights), the class prune writes too. A pruned
model's layers may differ in size, which ALBERT's cannot, so from one even --share all writes CompressBert.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.engine.run import RunHooks, RunPlan, TrainConfig
from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.results import StepResult
from compress.options.groups import (DataConfig, LossConfig, OutputConfig, RuntimeConfig, ShareConfig, TrackingConfig,
                                     TrainingConfig)


def share(step: ShareConfig, data: DataConfig | None = None, loss: LossConfig | None = None,
          training: TrainingConfig | None = None, runtime: RuntimeConfig | None = None,
          tracking: TrackingConfig | None = None, output: OutputConfig | None = None,
          hooks: RunHooks | None = None) -> StepResult | None:
    """Share `step.model`'s weights across layers (and factorise its embedding), then recover by distilling from it.

    `training.epochs` is the recovery's (--recover_epochs; 0 saves the shared model as is). A group left None takes
    share's defaults (`compress share --help`). Returns the shared model's folder, its metrics against the original
    (svd_error, flops_ratio, score_before_recovery, ...), the MLflow run id and the lineage.
    """
    from compress.data.tasks import load_task
    from compress.engine.state import RunState
    from compress.infra.writes import check_run_paths
    from compress.models.loading import (check_encoder, load_config, require_task_head, resolve_max_length,
                                         resolve_model)
    from compress.options.bounds import check_all
    from compress.options.commands import with_defaults

    data, loss, training, runtime, tracking, output = with_defaults(
        "share", data=data, loss=loss, training=training, runtime=runtime, tracking=tracking, output=output)
    model, groups, share, embedding = step.model, step.groups, step.share, step.embedding
    # --- everything the user typed is checked before anything is loaded or written
    step.validate()
    check_all(recover_epochs=training.epochs)
    loss.validate(training=training.epochs > 0)
    cfg = TrainConfig(training, runtime, data.max_length, loss)
    cfg.validate(training=False)  # recover_epochs 0 skips recovery

    task_data = load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                          max_train=data.max_train, seed=training.seed, quoting=data.quoting)
    path = resolve_model(model, "--model")
    config = load_config(path, "--model")
    cfg.max_length = resolve_max_length(data.max_length, [config])
    check_encoder(config, "--model")
    from compress.models.compress_bert.convert import HEAD_ACT, is_unshared, to_compress_config

    if config.model_type == "compress_bert" and not is_unshared(config):
        raise CompressError("--model: this model already shares modules or factorises its word embedding (an earlier "
                            "share); share the model it came from instead")
    layers, hidden = config.num_hidden_layers, config.hidden_size
    if share == "all" and config.model_type in HEAD_ACT:
        act = HEAD_ACT[config.model_type]
        raise CompressError(f"--share all: writes a standard ALBERT, whose head is tanh where this "
                            f"{config.model_type}'s is {act}; use --share attention or --share ffn (compress's own "
                            f"class keeps the {act} head)")
    narrow = to_compress_config(config).projected_embedding_size  # ELECTRA-small's, or a pruned one's
    if embedding is not None and narrow:
        raise CompressError(f"--embedding {embedding}: this model's embeddings are already {narrow} wide and "
                            f"projected to its hidden size {hidden}; leave --embedding out")
    if groups > layers:
        raise CompressError(f"--groups {groups}: must be between 1 and the model's {layers} layers")
    if embedding is not None and embedding >= hidden:
        raise CompressError(f"--embedding {embedding}: must be smaller than the hidden size {hidden} "
                            "(leave it out to keep the embedding whole)")
    require_task_head(config, task_data, model)
    desc = f"{share}-g{groups}" + (f"-e{embedding}" if embedding else "")
    default = f"outputs/share-{slug(model)}-{slug(task_data.name)}-{desc}"
    out = check_run_paths(output.output if output.output is not None else default, reads=(path, data.data),
                          tracking=tracking.tracking, cache=loss.teacher_cache if loss.cache_teacher else None)
    RunState(out, output.resume, output.overwrite)  # refuses an existing --output now, not after the conversion

    plan = RunPlan(command="share", name=f"share {desc} init={step.init}", output=out, resume=output.resume,
                   overwrite=output.overwrite)
    return _share(step, path, desc, task_data, cfg, plan, tracking, hooks)


def calibration_batches(datamodule, rows: int, batch_size: int):
    """The first `rows` training rows in the seeded shuffled order, as padded batches (inputs only)."""
    import torch

    from compress.data.datamodule import PadCollator

    datamodule.setup()
    order = torch.randperm(len(datamodule.train_rows), generator=torch.Generator().manual_seed(datamodule.seed))
    chosen = [datamodule.train_rows[i] for i in order[:rows].tolist()]
    collate = PadCollator(datamodule.tokenizer.pad_token_id or 0)
    return [collate(chosen[i:i + batch_size]) for i in range(0, len(chosen), batch_size)]


def convert(teacher, *, share: str, groups: int, embedding: int | None, init: str, batches=None):
    """The shared student of `teacher` (a classifier of convert.BERT_LIKE_TYPES, or a pruned CompressBert) and the
    word-embedding svd_error.

    `batches` (training batches) are needed for init regmean only. --share all writes an ALBERT, except from a
    pruned model, whose layers may differ in size where ALBERT's cannot: that shares both kinds in CompressBert.
    """
    from compress.sharing.convert import input_grams, to_albert, to_compress_shared

    grams = input_grams(teacher, batches) if init == "regmean" else None
    if share == "all" and teacher.config.model_type != "compress_bert":
        return to_albert(teacher, groups, embedding, init, grams)
    return to_compress_shared(teacher, share, groups, embedding, init, grams)


def padding_cost(parent_config, shared_config, groups: int) -> float | None:
    """FLOPs per token of the shared model over its parent's, for compress's class (None for an ALBERT, whose layers
    are its parent's, one size). Sharing a pruned model whose layers differ in size runs every layer of a group at
    the group's largest size: the zero heads and neurons change no output but are computed, so a share of a
    `--scope global` prune ran 19% slower than its parent. That is said here, before the recovery is paid for."""
    from compress.models.compress_bert import to_compress_config
    from compress.pruning import flops_per_token
    from compress.sharing.convert import layer_groups

    if shared_config.model_type != "compress_bert":
        return None
    ratio = flops_per_token(shared_config) / flops_per_token(parent_config)
    if ratio > 1.005:
        c = to_compress_config(parent_config)  # per-layer sizes, whatever class the parent is
        heads = [c.attention_heads[a] for a in c.attention_map]
        ffn = [c.intermediate_sizes[f] for f in c.ffn_map]
        print(f"note: layers that now share a module differ in size (heads per layer {heads}, FFN width per layer "
              f"{ffn}, groups {layer_groups(c.num_hidden_layers, groups)}); each runs at its group's largest, so "
              f"this model computes {ratio - 1:.0%} more FLOPs per token than its parent and will be slower. To "
              "keep the parent's speed, share a prune made with --scope layer, or use more --groups",
              file=sys.stderr)
    return ratio


def _share(step: ShareConfig, path: str, desc: str, task_data, cfg: TrainConfig, plan: RunPlan,
           tracking: TrackingConfig, hooks: RunHooks | None) -> StepResult | None:
    import torch

    from compress.engine import logit_cache
    from compress.data.datamodule import TaskDataModule
    from compress.models.measure import count_params
    from compress.models.loading import load_classifier, load_tokenizer
    from compress.engine.run import RunModels, run_training
    from compress.sharing.convert import layer_groups
    from compress.engine.trainer import quiet_libraries, resolve_accelerator, resolve_precision
    from compress.engine.scoring import score

    groups, share, embedding, init, loss = step.groups, step.share, step.embedding, step.init, cfg.loss
    seed, batch_size = cfg.training.seed, cfg.training.batch_size
    quiet_libraries()
    torch.manual_seed(seed)
    attn = "eager" if loss.alpha_attn > 0 else None  # sdpa returns no attention maps
    teacher = load_classifier(path, task_data.label_names, "--model", attn_implementation=attn).eval()
    tokenizer = load_tokenizer(path, "--model", teacher.config, cfg.max_length)
    datamodule = TaskDataModule(task_data, tokenizer, batch_size=batch_size, max_length=cfg.max_length, seed=seed)
    batches = None
    if init == "regmean":
        rows = min(step.calibration, len(task_data.train_labels))
        print(f"recording layer inputs on {rows} training rows for regmean", file=sys.stderr)
        batches = calibration_batches(datamodule, rows, batch_size)
    student, svd_error = convert(teacher, share=share, groups=groups, embedding=embedding, init=init, batches=batches)

    config = teacher.config
    e = embedding or config.hidden_size
    n_student, n_teacher = count_params(student), count_params(teacher)
    print(f"shared ({share}, as {type(student).__name__}): {groups} group(s) over {config.num_hidden_layers} layers "
          f"{layer_groups(config.num_hidden_layers, groups)}, init {init}; embedding "
          + (f"{config.hidden_size} -> {embedding}, svd_error {svd_error:.4f}" if embedding else "kept whole")
          + f"; params {n_teacher:,} -> {n_student:,} ({n_student / n_teacher:.1%})", file=sys.stderr)

    flops = padding_cost(teacher.config, student.config, groups)

    accelerator = resolve_accelerator(cfg.runtime.accelerator)
    precision = resolve_precision(cfg.runtime.precision, accelerator)
    before = score(student, datamodule, task_data.metric, task_data.num_labels, accelerator, precision)
    print(f"{task_data.metric} before recovery: {before:.4f}", file=sys.stderr)
    student.cpu()
    cache_file = (logit_cache.file_for_run(Path(loss.teacher_cache), path, task_data, tokenizer, cfg)
                  if loss.cache_teacher else None)

    plan.params = {"model": step.model, "model_path": path, "share": share, "groups": groups,
                   "embedding": embedding or "", "init": init,
                   "calibration": step.calibration if init == "regmean" else "", "temperature": loss.temperature,
                   "alpha_kd": loss.alpha_kd, "alpha_ce": loss.alpha_ce, "alpha_hidden": loss.alpha_hidden,
                   "alpha_attn": loss.alpha_attn, "max_train": task_data.flags.get("max_train"),
                   "recover_epochs": cfg.training.epochs, "cache_teacher": loss.cache_teacher}
    plan.lineage = {"original": step.model, "original_path": path, "share": share, "groups": groups,
                    "layer_groups": layer_groups(config.num_hidden_layers, groups), "embedding_size": e, "init": init}
    plan.extra_metrics = ({"groups": groups, "embedding_size": e, "svd_error": svd_error,
                           "score_before_recovery": before} | ({"flops_ratio": flops} if flops is not None else {}))
    models = RunModels(student=student, tokenizer=tokenizer, teacher=teacher, cache_file=cache_file)
    return run_training(plan, models, task_data, cfg, tracking, hooks)
