"""compress distill: a smaller student from a teacher, DistilBERT-style, tracked in MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from compress.engine.run import RunHooks
from compress.infra.errors import CompressError
from compress.infra.identity import slug
from compress.infra.results import StepResult
from compress.options.groups import (DataConfig, DistillConfig, LossConfig, OutputConfig, RuntimeConfig,
                                     TrackingConfig, TrainingConfig)


def distill(step: DistillConfig, data: DataConfig | None = None, loss: LossConfig | None = None,
            training: TrainingConfig | None = None, runtime: RuntimeConfig | None = None,
            tracking: TrackingConfig | None = None, output: OutputConfig | None = None,
            hooks: RunHooks | None = None) -> StepResult | None:
    """Distil `step.teacher` into a smaller student: `step.layers` of its layers (default half) or `step.student`.

    A teacher with no classifier for the task is fine-tuned first (its own MLflow run) and reused next time. A group
    left None takes distill's defaults (`compress distill --help`). `hooks` adds Lightning callbacks and MLflow tags
    to the run (compress search passes its pruning callback and parent run). Returns the student's folder, its
    metrics (student_score, teacher_score, retention, compression, speedup, latency_ms, ...), the MLflow run id and
    the lineage (None on DDP ranks other than 0).
    """
    from dataclasses import replace

    from compress.data.tasks import load_task
    from compress.data.unlabeled import read_unlabeled
    from compress.engine.run import RunModels, RunPlan, TrainConfig, run_training
    from compress.engine.teacher import ensure_task_teacher
    from compress.models.loading import (ENCODER_TYPES, check_encoder, check_masked_lm, check_text_classifier,
                                         has_task_head,
                                         load_classifier, load_config, load_tokenizer, resolve_max_length,
                                         resolve_model, same_tokens, student_from_teacher, teacher_layer_map)
    from compress.options.commands import with_defaults

    data, loss, training, runtime, tracking, output = with_defaults(
        "distill", data=data, loss=loss, training=training, runtime=runtime, tracking=tracking, output=output)
    teacher, student, layers = step.teacher, step.student, step.layers
    loss.validate()
    if step.teacher_device_map is not None:
        if str(runtime.devices) not in ("auto", "1") or runtime.strategy != "auto":
            raise CompressError(f"--teacher_device_map {step.teacher_device_map}: the teacher takes the devices "
                                "itself; the student trains on one (--devices 1, --strategy auto)")
        runtime = replace(runtime, devices=1)
    cfg = TrainConfig(training, runtime, data.max_length, loss)
    cfg.validate()
    step.validate()
    soft = [f"--unlabeled {step.unlabeled}"] * bool(step.unlabeled) + [f"--augment {step.augment}"] * bool(step.augment)
    if soft and not (loss.alpha_kd or loss.alpha_hidden or loss.alpha_attn):
        raise CompressError(f"{' and '.join(soft)}: those texts learn from the teacher alone, and every teacher loss "
                            "is off; set --alpha_kd above 0")
    # a head-less teacher's fine-tuning: its own epochs and lr, the student's batches and runtime (never compiled)
    teacher_cfg = TrainConfig(replace(training, epochs=step.teacher_epochs, lr=step.teacher_lr, warmup=0.1,
                                      weight_decay=0.01), replace(runtime, compile=False), data.max_length)

    task_data = load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                          max_train=data.max_train, seed=training.seed, quoting=data.quoting)
    unlabeled = (read_unlabeled(step.unlabeled, task_data, data.text_column, data.quoting)
                 if step.unlabeled is not None else None)
    teacher_path = resolve_model(teacher, "--teacher")
    teacher_config = load_config(teacher_path, "--teacher")
    check_text_classifier(teacher_config, "--teacher")  # any encoder family teaches; each reads its own tokens
    student_path = student_config = None
    if student is not None:
        student_path = resolve_model(student, "--student")
        student_config = load_config(student_path, "--student")
        check_encoder(student_config, "--student")
        if layers is not None:  # checked before any fine-tuning is spent
            teacher_layer_map(student_config.num_hidden_layers, layers, "student")
    else:
        if teacher_config.model_type not in ENCODER_TYPES:
            kinds = ", ".join(sorted(ENCODER_TYPES))
            raise CompressError(f"--teacher {teacher}: a student is built from the layers of a {kinds} model, not "
                                f"a {teacher_config.model_type}; give --student, e.g. --student minilm-l6 --layers 3")
        if layers is not None:
            teacher_layer_map(teacher_config.num_hidden_layers, layers)
    augment_path = None
    if step.augment_model is not None:
        augment_path = resolve_model(step.augment_model, "--augment_model")
        check_masked_lm(load_config(augment_path, "--augment_model"), "--augment_model")
    # before a head-less teacher is fine-tuned: its cached copy is keyed by the length too
    cfg.max_length = teacher_cfg.max_length = resolve_max_length(data.max_length, [teacher_config, student_config])
    tokenizer = load_tokenizer(teacher_path, "--teacher", teacher_config, cfg.max_length)
    student_tokenizer = (load_tokenizer(student_path, "--student", student_config, cfg.max_length)
                         if student_path is not None else tokenizer)
    shared = same_tokens(tokenizer, student_tokenizer, task_data.train_texts[:64])
    if not shared and loss.alpha_attn:
        raise CompressError(f"--alpha_attn {loss.alpha_attn:g}: attention transfer matches the two models token to "
                            f"token, and --student {student} tokenizes otherwise than the teacher; set --alpha_attn 0 "
                            "(the hidden-state loss then compares one vector per text)")
    # Lightning and the training stack load only now (5+ s): every mistake above is reported within a second or two.
    from compress.engine import logit_cache
    from compress.infra.writes import check_run_paths
    from compress.engine.state import RunState
    from compress.engine.trainer import quiet_libraries, teacher_runs_bf16

    quiet_libraries()
    teacher_runs_bf16(runtime.accelerator, runtime.precision)  # refuses an unknown --accelerator or --precision now
    # before a teacher is fine-tuned for minutes (--output's default name needs the student)
    reads = (teacher_path, student_path, data.data, step.unlabeled, augment_path)
    checked = check_run_paths(output.output, reads=reads, tracking=tracking.tracking, cache=loss.teacher_cache)
    if checked is not None:
        RunState(checked, output.resume, output.overwrite)  # an existing folder without --overwrite, or none to resume
    if not has_task_head(teacher_config, task_data.label_names):
        # fine-tuning it here would need it whole on one device; a copy fine-tuned before is used as ever
        placed = (f"--teacher_device_map {step.teacher_device_map}: the teacher {teacher} has no classifier for "
                  f"{task_data.name}'s labels; fine-tune it first (compress finetune --model {teacher} ..., on a "
                  "machine it fits) and pass that as --teacher") if step.teacher_device_map is not None else None
        teacher_path = ensure_task_teacher(teacher_path, teacher, task_data, teacher_cfg, tracking,
                                           cache_root=Path(loss.teacher_cache), refuse_training=placed)
    attn = "eager" if loss.alpha_attn > 0 else None  # sdpa returns no attention maps
    placement = None
    if step.teacher_device_map is not None:
        from compress.models.loading import teacher_placement

        placement = teacher_placement(step.teacher_device_map,
                                      bf16=teacher_runs_bf16(runtime.accelerator, runtime.precision))
    teacher_model = load_classifier(teacher_path, task_data.label_names, "--teacher", attn_implementation=attn,
                                    placement=placement, any_encoder=True)
    if placement is not None:
        # transformers sets hf_device_map only for a model it spread over devices (or disk): one that fits on one
        # device is simply there, and trains beside the student like any teacher
        spread = getattr(teacher_model, "hf_device_map", None)
        where = (sorted({str(d) for d in spread.values()}) if spread else
                 f"all on {next(teacher_model.parameters()).device}, so it runs beside the student as usual")
        print(f"teacher placed by --teacher_device_map {step.teacher_device_map}: {where}", file=sys.stderr)
    n_teacher = teacher_model.config.num_hidden_layers
    if student_path is not None:
        student_model = load_classifier(student_path, task_data.label_names, "--student", attn_implementation=attn,
                                        seed=training.seed)
        kept = None
        desc = f"{slug(student)}"
        if layers is not None:  # a shallower copy of --student's own model (MiniLM-L6's 3 layers under an MPNet)
            kept = teacher_layer_map(student_model.config.num_hidden_layers, layers, "student")
            student_model = student_from_teacher(student_model, kept)
            desc += f"-L{len(kept)}"
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
    whose = (f"{student}'s layers {kept}" if student and kept else f"{student}" if student
             else f"teacher layers {kept}")
    print(f"student: {n_student} layer{'s' if n_student != 1 else ''} x {student_model.config.hidden_size}, from "
          f"{whose}" + ("" if shared else "; it tokenizes otherwise than the teacher, so each model reads the text "
                        "through its own tokenizer"), file=sys.stderr)

    out = checked if checked is not None else Path(f"outputs/distill-{slug(teacher)}-{slug(task_data.name)}-{desc}")
    soft_params = {}
    # after the teacher's fine-tuning, which learns from labelled rows alone
    augmented = (_augmented(step, task_data, teacher_model, tokenizer, teacher_path, augment_path, training.seed,
                            Path(loss.teacher_cache), cfg.max_length) if step.augment else None)
    if unlabeled is not None:
        task_data = task_data.with_soft_texts(unlabeled.texts)
        ratio = unlabeled.ratio(len(task_data.train_labels))
        print(f"unlabeled: {len(unlabeled.texts):,} texts from {step.unlabeled} ({unlabeled.dev_duplicates:,} dev "
              f"texts dropped), {ratio:.2f} per labelled row; they learn from the teacher's soft targets only",
              file=sys.stderr)
        soft_params = {"unlabeled_rows": len(unlabeled.texts), "unlabeled_dev_duplicates": unlabeled.dev_duplicates,
                       "unlabeled_ratio": round(ratio, 4)}
    if augmented is not None:
        task_data = task_data.with_soft_texts(augmented.texts)
        soft_params |= {"augment_rows": len(augmented.texts), "augment_dropped": augmented.dropped}
    # keyed by the rows, unlabelled ones included: the teacher scores each of them once per key
    cache_file = (logit_cache.file_for_run(Path(loss.teacher_cache), teacher_path, task_data, tokenizer, cfg)
                  if loss.cache_teacher else None)
    plan = RunPlan(
        command="distill", name=f"distill {desc} T={loss.temperature:g}", output=out, resume=output.resume,
        overwrite=output.overwrite,
        params={"teacher": teacher, "teacher_path": teacher_path, "student": student or "", "layers": n_student,
                "teacher_layers_kept": str(kept or "") if student is None else "",
                "student_layers_kept": str(kept or "") if student is not None else "",
                "temperature": loss.temperature, "alpha_kd": loss.alpha_kd,
                "alpha_ce": loss.alpha_ce, "alpha_hidden": loss.alpha_hidden, "alpha_attn": loss.alpha_attn,
                "cache_teacher": loss.cache_teacher, "teacher_device_map": step.teacher_device_map or "",
                "teacher_epochs": step.teacher_epochs, "teacher_lr": step.teacher_lr,
                "teacher_cache": loss.teacher_cache, "unlabeled": step.unlabeled or "", "augment": step.augment,
                "augment_model": step.augment_model or "", **soft_params,
                "shared_tokens": shared},
        lineage={"teacher": teacher, "teacher_path": teacher_path, "student_init": whose},
    )
    models = RunModels(student=student_model, tokenizer=student_tokenizer, teacher=teacher_model, cache_file=cache_file,
                       teacher_tokenizer=None if shared else tokenizer)
    return run_training(plan, models, task_data, cfg, tracking, hooks)


def _augmented(step: DistillConfig, task, teacher_model, teacher_tokenizer, teacher_path: str,
               augment_path: str | None, seed: int, cache_root: Path, max_length: int):
    """--augment's copies of the training texts (compress.engine.augment), through --augment_model's masked LM or the
    teacher's own input embeddings; read from --teacher_cache when made before."""
    from compress.engine import augment

    if augment_path is not None:
        from transformers import AutoModelForMaskedLM

        from compress.models.loading import load_tokenizer, load_weights

        tokenizer = load_tokenizer(augment_path, "--augment_model")
        method, model_path = f"masked LM {step.augment_model}", augment_path

        def candidates():
            model = load_weights(AutoModelForMaskedLM, augment_path, "--augment_model")
            return augment.MaskedLMCandidates(model, tokenizer, max_length=max_length)
    else:
        tokenizer = teacher_tokenizer
        method, model_path = "the teacher's word-embedding neighbours", teacher_path

        def candidates():
            return augment.EmbeddingNeighbours(teacher_model.get_input_embeddings().weight, tokenizer)

    made = augment.augment(task, step.augment, seed, method=method, model_path=model_path, tokenizer=tokenizer,
                           candidates=candidates, cache_root=cache_root)
    where = f"read from {made.file}" if made.from_cache else f"stored in {made.file}"
    print(f"augment: {len(made.texts):,} copies of {len(task.train_texts):,} training texts by {method} "
          f"({made.dropped:,} unchanged, repeated or dev texts dropped; {where}); they learn from the teacher's soft "
          "targets only", file=sys.stderr)
    return made
