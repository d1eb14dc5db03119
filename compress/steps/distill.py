"""compress distill: a smaller student from a teacher, DistilBERT-style, tracked in MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING


def distill(
    teacher: str,
    task: str | None = None,
    data: str | None = None,
    student: str | None = None,
    layers: int | None = None,
    epochs: int = 3,
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
    compile: bool = False,
    teacher_device_map: str | None = None,
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
    teacher_epochs: int = 2,
    teacher_lr: float = 5e-5,
    teacher_cache: str = "outputs/teachers",
    tracking: str = DEFAULT_TRACKING,
    experiment: str = DEFAULT_EXPERIMENT,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Distil a teacher into a smaller student on a task, and log both scores, sizes and speeds to MLflow.

    The default student is DistilBERT-style: the teacher's width, its embeddings, and every other layer.

    Args:
        teacher: hub name, alias (bert-base, bert-large, minilm-l6) or a saved model folder. A teacher with no
            classifier for the task is fine-tuned first (its own MLflow run) and reused next time.
        task: a GLUE task (sst2, mnli, ...) or bbc-news, the offline demo task. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column.
        student: any model (name or folder) with the teacher's vocabulary, e.g. a narrower random-init
            config. Exclusive with --layers.
        layers: student depth: this many evenly spaced teacher layers (default: half the teacher's).
        epochs: passes over the training data.
        output: where the student is written (default: outputs/distill-TEACHER-TASK-LN).
        batch_size: examples per optimizer step (per device).
        lr: peak learning rate of AdamW, after linear warmup then linear decay.
        warmup: fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
        temperature: softmax temperature of the soft targets; the KL term is scaled by T².
        alpha_kd: weight of the soft-target KL.
        alpha_ce: weight of the hard-label cross-entropy.
        alpha_hidden: weight of the hidden-state loss (cosine at equal width, MSE through a learned projection
            for a narrower student); 0 turns it off.
        alpha_attn: weight of the attention-distribution KL; > 0 runs both models with eager attention (slower).
        cache_teacher: keep the teacher's logits from the first epoch and skip the teacher after it. They are also
            stored under --teacher_cache, keyed by teacher weights, training rows, tokenizer, --max_length and
            precision, so a later run on the same teacher and data never runs the teacher. Needs --alpha_hidden 0
            and --alpha_attn 0 (those losses need the teacher's hidden states every step).
        compile: torch.compile the student and the teacher (worth it on a GPU for long runs; the first steps
            pay the compilation, tens of seconds).
        teacher_device_map: place a teacher too large for one card over devices, for inference only: auto,
            balanced or sequential (accelerate fills the visible GPUs, then CPU memory, then disk, layer by layer) or a
            JSON file mapping module names to a GPU index, "cpu" or "disk". The student trains on one device
            (--devices 1). The teacher must already have its task head. Its latency and the speedup are not measured.
        max_length: tokens per example; longer inputs are truncated.
        max_train: use a seeded random subset of this many training rows.
        text_column: column(s) holding the text, "a" or "a,b" for pairs (default: sentence or text, or a known pair).
        label_column: column holding the label.
        seed: seed for data order, initialisation and dropout.
        precision: auto (bf16-mixed on a GPU, 32-true on a CPU), 32-true, bf16-mixed or 16-mixed.
        accelerator: auto, cpu or cuda.
        devices: devices for the Lightning Trainer (a count, or auto).
        strategy: Lightning strategy, e.g. auto, ddp, fsdp.
        num_workers: data loader worker processes (default: 4 on a GPU, 0 on a CPU).
        checkpoint_every: optimizer steps between checkpoints; 0 (the default) checkpoints by time instead.
        checkpoint_minutes: minutes of training between checkpoints when checkpoint_every is 0; a killed run
            loses at most this much.
        latency_reps: timed rounds for the latency measurement.
        teacher_epochs: epochs when a head-less teacher must be fine-tuned first.
        teacher_lr: learning rate of that fine-tuning.
        teacher_cache: folder holding fine-tuned teachers and cached teacher logits for reuse.
        tracking: MLflow tracking URI (default: sqlite under ./mlruns).
        experiment: MLflow experiment name.
        resume: continue an interrupted run writing to the same --output.
        overwrite: replace an existing --output.
    """
    from compress.data.tasks import load_task
    from compress.engine.teacher import ensure_task_teacher
    from compress.models.loading import (check_encoder, check_same_vocab, has_task_head, load_classifier, load_config,
        load_tokenizer, resolve_model, student_from_teacher, teacher_layer_map)
    from compress.options.bounds import check_all
    from compress.engine.run import TrainConfig, check_distill_flags, run_training

    check_distill_flags(temperature, {"alpha_kd": alpha_kd, "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden,
                                      "alpha_attn": alpha_attn}, cache_teacher=cache_teacher)
    if teacher_device_map is not None:
        if str(devices) not in ("auto", "1") or strategy != "auto":
            raise CompressError(f"--teacher_device_map {teacher_device_map}: the teacher takes the devices itself; "
                                "the student trains on one (--devices 1, --strategy auto)")
        devices = 1
    if student is not None and layers is not None:
        raise CompressError("--student and --layers are exclusive: --layers builds the student from the teacher")
    common = dict(batch_size=batch_size, max_length=max_length, seed=seed, precision=precision,
                  accelerator=accelerator, devices=devices, strategy=strategy, num_workers=num_workers,
                  checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes, latency_reps=latency_reps)
    cfg = TrainConfig(epochs=epochs, lr=lr, warmup=warmup, weight_decay=weight_decay, compile=compile, **common)
    cfg.validate()
    check_all(teacher_epochs=teacher_epochs, teacher_lr=teacher_lr, max_train=max_train)
    # the rest of its flags are the student's, checked above
    teacher_cfg = TrainConfig(epochs=teacher_epochs, lr=teacher_lr, warmup=0.1, weight_decay=0.01, **common)

    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=max_train,
                          seed=seed)
    teacher_path = resolve_model(teacher, "--teacher")
    teacher_config = load_config(teacher_path, "--teacher")
    check_encoder(teacher_config, "--teacher")
    if layers is not None:  # check before any fine-tuning is spent
        teacher_layer_map(teacher_config.num_hidden_layers, layers)
    student_path = None
    if student is not None:
        student_path = resolve_model(student, "--student")
        check_encoder(load_config(student_path, "--student"), "--student")
    # Lightning and the training stack load only now (5+ s): every mistake above is reported within a second or two.
    from compress.engine import logit_cache
    from compress.engine.distill_module import LossWeights
    from compress.infra.paths import check_run_paths
    from compress.engine.state import RunState
    from compress.engine.trainer import quiet_libraries, teacher_runs_bf16

    quiet_libraries()
    teacher_runs_bf16(accelerator, precision)  # refuses an unknown --accelerator or --precision now
    # before a teacher is fine-tuned for minutes (--output's default name needs the student)
    checked = check_run_paths(output, reads=(teacher_path, student_path, data), tracking=tracking, cache=teacher_cache)
    if checked is not None:
        RunState(checked, resume, overwrite)  # an existing folder without --overwrite, or nothing to resume
    weights = LossWeights(kd=alpha_kd, ce=alpha_ce, hidden=alpha_hidden, attn=alpha_attn)
    if not has_task_head(teacher_config, task_data.label_names):
        # fine-tuning it here would need it whole on one device; a copy fine-tuned before is used as ever
        placed = (f"--teacher_device_map {teacher_device_map}: the teacher {teacher} has no classifier for "
                  f"{task_data.name}'s labels; fine-tune it first (compress finetune --model {teacher} ..., on a "
                  "machine it fits) and pass that as --teacher") if teacher_device_map is not None else None
        teacher_path = ensure_task_teacher(teacher_path, teacher, task_data, teacher_cfg, tracking=tracking,
                                           experiment=experiment, cache_root=Path(teacher_cache),
                                           refuse_training=placed)
    attn = "eager" if alpha_attn > 0 else None  # sdpa returns no attention maps (STACK.md)
    placement = None
    if teacher_device_map is not None:
        from compress.models.loading import teacher_placement

        placement = teacher_placement(teacher_device_map, bf16=teacher_runs_bf16(accelerator, precision))
    teacher_model = load_classifier(teacher_path, task_data.label_names, "--teacher", attn_implementation=attn,
                                    placement=placement)
    if placement is not None:
        # transformers sets hf_device_map only for a model it spread over devices (or disk): one that fits on one
        # device is simply there, and trains beside the student like any teacher
        spread = getattr(teacher_model, "hf_device_map", None)
        where = (sorted({str(d) for d in spread.values()}) if spread else
                 f"all on {next(teacher_model.parameters()).device}, so it runs beside the student as usual")
        print(f"teacher placed by --teacher_device_map {teacher_device_map}: {where}", file=sys.stderr)
    tokenizer = load_tokenizer(teacher_path, "--teacher", teacher_model.config, cfg.max_length)
    n_teacher = teacher_model.config.num_hidden_layers
    if student_path is not None:
        student_config = load_config(student_path, "--student")
        check_same_vocab(tokenizer, load_tokenizer(student_path, "--student", student_config, cfg.max_length),
                         student_config, teacher_model.config)
        student_model = load_classifier(student_path, task_data.label_names, "--student", attn_implementation=attn,
                                        seed=cfg.seed)
        kept = None
        desc = f"{slug(student)}"
    else:
        kept = teacher_layer_map(n_teacher, layers if layers is not None else max(1, n_teacher // 2))
        if placement is None:
            student_model = student_from_teacher(teacher_model, kept)
        else:  # offloaded layers of the placed teacher have no data in memory: copy from a CPU copy, then drop it
            on_cpu = load_classifier(teacher_path, task_data.label_names, "--teacher", attn_implementation=attn)
            student_model = student_from_teacher(on_cpu, kept)
            del on_cpu
        desc = f"L{len(kept)}"
    n_student = student_model.config.num_hidden_layers
    print(f"student: {n_student} layer{'s' if n_student != 1 else ''} x {student_model.config.hidden_size}"
          + (f", from teacher layers {kept}" if kept else f", from {student}"), file=sys.stderr)

    out = checked if checked is not None else Path(f"outputs/distill-{slug(teacher)}-{slug(task_data.name)}-{desc}")
    cache_file = (logit_cache.file_for_run(Path(teacher_cache), teacher_path, task_data, tokenizer, cfg)
                  if cache_teacher else None)
    run_training(
        command="distill", run_name=f"distill {desc} T={temperature:g}", student=student_model,
        teacher=teacher_model, tokenizer=tokenizer, task=task_data, output=out, cfg=cfg, weights=weights,
        temperature=temperature, tracking=tracking, experiment=experiment, resume=resume, overwrite=overwrite,
        cache_teacher=cache_teacher, cache_file=cache_file,
        params={"teacher": teacher, "teacher_path": teacher_path, "student": student or "", "layers": n_student,
                "teacher_layers_kept": str(kept or ""), "temperature": temperature, "alpha_kd": alpha_kd,
                "alpha_ce": alpha_ce, "alpha_hidden": alpha_hidden, "alpha_attn": alpha_attn,
                "cache_teacher": cache_teacher, "teacher_device_map": teacher_device_map or "",
                "teacher_epochs": teacher_epochs, "teacher_lr": teacher_lr, "teacher_cache": teacher_cache},
        lineage={"teacher": teacher, "teacher_path": teacher_path, "student_init": student or f"teacher layers {kept}"},
    )
