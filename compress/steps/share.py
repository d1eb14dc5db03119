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

from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING


def share(
    model: str,
    task: str | None = None,
    data: str | None = None,
    groups: int = 1,
    share: str = "all",
    embedding: int | None = None,
    init: str = "regmean",
    calibration: int = 256,
    recover_epochs: int = 3,
    output: str | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    temperature: float = 2.0,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.5,
    alpha_hidden: float = 1.0,
    alpha_attn: float = 0.0,
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
    """Share weights across layers, factorise the embedding of a BERT-family classifier; recover by distilling.

    Sharing cuts parameters and size, not FLOPs: every layer still runs. Score, size and the measured speed are
    logged to MLflow against the original, in the same run.

    Args:
        model: the original: a saved classifier folder for the task, e.g. from `compress finetune`, of model
            type bert, ernie, roberta, xlm-roberta, camembert, electra or distilbert (those two not with --share
            all, which writes ALBERT's tanh head), or a model `compress prune` wrote (its layers may differ in
            size: each group's shared module is as large as its largest layer).
        task: a GLUE task (sst2, mnli, ...) or bbc-news, the offline demo task. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column.
        groups: distinct layer groups, each of consecutive layers sharing one set of weights (ALBERT's rule,
            layer i in group int(i / (L / G))); 1 shares one layer across the whole depth, as ALBERT does.
        share: all (whole layers; writes a standard AlbertForSequenceClassification, or CompressBert from a pruned
            model), attention or ffn (only that sublayer is shared, the other stays per layer; writes compress's
            CompressBert with its code beside it).
        embedding: factorise the V x H word embedding into V x E and E x H by truncated SVD (must be < H); the
            relative reconstruction error is logged as svd_error. Default: keep it whole.
        init: how a group's shared weights start from the layers they replace: first (the group's first layer),
            mean (their average), or regmean (each Linear solved to best reproduce every replaced layer's output
            on its own inputs, recorded on --calibration training rows; LayerNorms averaged). regmean starts
            closest to the original (experiments/bench_share.py --compare_inits).
        calibration: training rows whose activations regmean fits the shared weights to.
        recover_epochs: epochs of distillation from the original after sharing; 0 saves the shared model as is.
        output: where the shared model is written (default: outputs/share-MODEL-TASK-SHARE-gG[-eE]).
        batch_size: examples per optimizer step (per device).
        lr: peak learning rate of the recovery, after linear warmup then linear decay.
        warmup: fraction of the recovery steps spent warming the learning rate up.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
        temperature: softmax temperature of the original's soft targets; the KL term is scaled by T².
        alpha_kd: weight of the soft-target KL.
        alpha_ce: weight of the hard-label cross-entropy.
        alpha_hidden: weight of the hidden-state cosine loss, each layer against the original's same layer.
        alpha_attn: weight of the attention-distribution KL; > 0 runs both models with eager attention (slower).
        cache_teacher: keep the original's logits from the first recovery epoch and skip it after that; they are
            also stored under --teacher_cache (keyed by its weights, the training rows, tokenizer, --max_length and
            precision), so the next run on the same original and data never runs it. Needs --alpha_hidden 0 and
            --alpha_attn 0.
        teacher_cache: folder holding cached teacher logits for reuse (shared with compress distill).
        max_length: tokens per example; longer inputs are truncated.
        max_train: use a seeded random subset of this many training rows (calibration and recovery).
        text_column: column(s) holding the text, "a" or "a,b" for pairs (default: sentence or text, or a known pair).
        label_column: column holding the label.
        seed: seed for data order, calibration rows and dropout.
        precision: auto (bf16-mixed on a GPU, 32-true on a CPU), 32-true, bf16-mixed or 16-mixed.
        accelerator: auto, cpu or cuda.
        devices: devices for the Lightning Trainer (a count, or auto).
        strategy: Lightning strategy, e.g. auto, ddp, fsdp.
        num_workers: data loader worker processes (default: 4 on a GPU, 0 on a CPU).
        checkpoint_every: optimizer steps between checkpoints; 0 (the default) checkpoints by time instead.
        checkpoint_minutes: minutes of training between checkpoints when checkpoint_every is 0; a killed run
            loses at most this much.
        latency_reps: timed rounds for the latency measurement (shared and original interleaved).
        tracking: MLflow tracking URI (default: sqlite under ./mlruns).
        experiment: MLflow experiment name.
        resume: continue an interrupted run writing to the same --output (the conversion is recomputed, the same
            for the same seed and data).
        overwrite: replace an existing --output.
    """
    from compress.models.loading import check_encoder, load_config, require_task_head, resolve_model
    from compress.options.bounds import check_all, check_choice
    from compress.engine.run import TrainConfig, check_distill_flags

    # --- everything the user typed is checked before anything is loaded or written
    check_choice("share", share)
    check_choice("init", init)
    check_all(groups=groups, embedding=embedding, calibration=calibration, recover_epochs=recover_epochs)
    check_distill_flags(temperature, {"alpha_kd": alpha_kd, "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden,
                                      "alpha_attn": alpha_attn}, training=recover_epochs > 0,
                        cache_teacher=cache_teacher)
    cfg = TrainConfig(epochs=recover_epochs, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                      max_length=max_length, seed=seed, precision=precision, accelerator=accelerator,
                      devices=devices, strategy=strategy, num_workers=num_workers,
                      checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                      latency_reps=latency_reps)
    cfg.validate(training=False)  # recover_epochs 0 skips recovery

    from compress.data.tasks import load_task
    from compress.infra.paths import check_run_paths
    from compress.engine.state import RunState

    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=max_train,
                          seed=seed)
    path = resolve_model(model, "--model")
    config = load_config(path, "--model")
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
    out = check_run_paths(output if output is not None else default, reads=(path, data), tracking=tracking,
                          cache=teacher_cache if cache_teacher else None)
    RunState(out, resume, overwrite)  # refuses an existing --output now, not after the conversion

    _share(path=path, model_name=model, task_data=task_data, cfg=cfg, out=out, groups=groups, share=share,
           embedding=embedding, init=init, calibration=calibration, desc=desc, temperature=temperature,
           alpha_kd=alpha_kd, alpha_ce=alpha_ce, alpha_hidden=alpha_hidden, alpha_attn=alpha_attn,
           tracking=tracking, experiment=experiment, resume=resume, overwrite=overwrite, max_train=max_train,
           cache_teacher=cache_teacher, teacher_cache=teacher_cache)


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


def _share(*, path: str, model_name: str, task_data, cfg, out: Path, groups: int, share: str, embedding: int | None,
           init: str, calibration: int, desc: str, temperature: float, alpha_kd: float, alpha_ce: float,
           alpha_hidden: float, alpha_attn: float, tracking: str, experiment: str, resume: bool, overwrite: bool,
           max_train: int | None, cache_teacher: bool, teacher_cache: str) -> None:
    import torch

    from compress.engine import logit_cache
    from compress.data.datamodule import TaskDataModule
    from compress.models.measure import count_params
    from compress.models.loading import load_classifier, load_tokenizer
    from compress.engine.distill_module import LossWeights
    from compress.engine.run import run_training
    from compress.sharing.convert import layer_groups
    from compress.engine.trainer import quiet_libraries, resolve_accelerator, resolve_precision
    from compress.engine.scoring import score

    quiet_libraries()
    torch.manual_seed(cfg.seed)
    attn = "eager" if alpha_attn > 0 else None  # sdpa returns no attention maps (STACK.md)
    teacher = load_classifier(path, task_data.label_names, "--model", attn_implementation=attn).eval()
    tokenizer = load_tokenizer(path, "--model", teacher.config, cfg.max_length)
    datamodule = TaskDataModule(task_data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                seed=cfg.seed)
    batches = None
    if init == "regmean":
        rows = min(calibration, len(task_data.train_labels))
        print(f"recording layer inputs on {rows} training rows for regmean", file=sys.stderr)
        batches = calibration_batches(datamodule, rows, cfg.batch_size)
    student, svd_error = convert(teacher, share=share, groups=groups, embedding=embedding, init=init, batches=batches)

    config = teacher.config
    e = embedding or config.hidden_size
    n_student, n_teacher = count_params(student), count_params(teacher)
    print(f"shared ({share}, as {type(student).__name__}): {groups} group(s) over {config.num_hidden_layers} layers "
          f"{layer_groups(config.num_hidden_layers, groups)}, init {init}; embedding "
          + (f"{config.hidden_size} -> {embedding}, svd_error {svd_error:.4f}" if embedding else "kept whole")
          + f"; params {n_teacher:,} -> {n_student:,} ({n_student / n_teacher:.1%})", file=sys.stderr)

    flops = padding_cost(teacher.config, student.config, groups)

    accelerator = resolve_accelerator(cfg.accelerator)
    precision = resolve_precision(cfg.precision, accelerator)
    before = score(student, datamodule, task_data.metric, task_data.num_labels, accelerator, precision)
    print(f"{task_data.metric} before recovery: {before:.4f}", file=sys.stderr)
    student.cpu()
    cache_file = (logit_cache.file_for_run(Path(teacher_cache), path, task_data, tokenizer, cfg)
                  if cache_teacher else None)

    run_training(
        command="share", run_name=f"share {desc} init={init}", student=student, teacher=teacher, tokenizer=tokenizer,
        task=task_data, output=out, cfg=cfg,
        weights=LossWeights(kd=alpha_kd, ce=alpha_ce, hidden=alpha_hidden, attn=alpha_attn),
        temperature=temperature, tracking=tracking, experiment=experiment, resume=resume, overwrite=overwrite,
        cache_teacher=cache_teacher, cache_file=cache_file,
        params={"model": model_name, "model_path": path, "share": share, "groups": groups,
                "embedding": embedding or "", "init": init, "calibration": calibration if init == "regmean" else "",
                "temperature": temperature, "alpha_kd": alpha_kd, "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden,
                "alpha_attn": alpha_attn, "max_train": max_train, "recover_epochs": cfg.epochs,
                "cache_teacher": cache_teacher},
        lineage={"original": model_name, "original_path": path, "share": share, "groups": groups,
                 "layer_groups": layer_groups(config.num_hidden_layers, groups), "embedding_size": e, "init": init},
        extra_metrics={"groups": groups, "embedding_size": e, "svd_error": svd_error,
                       "score_before_recovery": before} | ({"flops_ratio": flops} if flops is not None else {}),
    )
