"""compress finetune: a task teacher from a pretrained encoder, tracked in MLflow."""

from __future__ import annotations
from compress.infra.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING
from compress.engine.teacher import finetune_model
from compress.infra.identity import slug


def finetune(
    model: str,
    task: str | None = None,
    data: str | None = None,
    output: str | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-5,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
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
    """Fine-tune a pretrained encoder on a task, making a teacher for distill.

    Args:
        model: hub name, alias (bert-base, bert-large, minilm-l6) or a saved model folder.
        task: a GLUE task (sst2, mnli, ...) or bbc-news, the offline demo task. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column.
        output: where the fine-tuned model is written (default: outputs/finetune-MODEL-TASK).
        epochs: passes over the training data.
        batch_size: examples per optimizer step (per device).
        lr: peak learning rate of AdamW, after linear warmup then linear decay.
        warmup: fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
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
        tracking: MLflow tracking URI (default: sqlite under ./mlruns).
        experiment: MLflow experiment name.
        resume: continue an interrupted run writing to the same --output.
        overwrite: replace an existing --output.
    """
    from compress.data.tasks import load_task
    from compress.models.loading import check_encoder, load_config, resolve_model
    from compress.engine.run import TrainConfig
    from compress.infra.paths import check_run_paths
    from compress.engine.trainer import quiet_libraries

    quiet_libraries()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                      max_length=max_length, seed=seed, precision=precision, accelerator=accelerator,
                      devices=devices, strategy=strategy, num_workers=num_workers,
                      checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                      latency_reps=latency_reps)
    cfg.validate()
    task_data = load_task(task, data, text_column=text_column, label_column=label_column, max_train=max_train,
                          seed=seed)
    path = resolve_model(model, "--model")
    check_encoder(load_config(path, "--model"), "--model")
    default = f"outputs/finetune-{slug(model)}-{slug(task_data.name)}"
    out = check_run_paths(output if output is not None else default, reads=(path, data), tracking=tracking)
    finetune_model(path, model, task_data, out, cfg, tracking=tracking, experiment=experiment, resume=resume,
                   overwrite=overwrite, params={"max_train": max_train})
