"""compress finetune: a task teacher from a pretrained encoder; also what distill runs for a head-less teacher."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

from compress.errors import CompressError
from compress.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING, shown


def slug(name: str) -> str:
    """A short, filesystem-safe name for a model argument: 'google-bert/bert-base-uncased' -> 'bert-base-uncased'."""
    return re.sub(r"[^\w.-]+", "-", Path(name.rstrip("/")).name).strip("-") or "model"


def finetune_model(model_path: str, model_name: str, task, output: Path, cfg, *, tracking: str, experiment: str,
                   resume: bool = False, overwrite: bool = False, params: dict | None = None):
    """Fine-tune `model_path` on `task` with plain cross-entropy; the shared body of the command and of distill."""
    from compress.models import load_classifier, load_tokenizer
    from compress.recipe import run_training

    model = load_classifier(model_path, task.label_names, "--model", seed=cfg.seed)
    tokenizer = load_tokenizer(model_path, "--model", model.config, cfg.max_length)
    return run_training(
        command="finetune", run_name=f"finetune {model_name} on {task.name}", student=model, teacher=None,
        tokenizer=tokenizer, task=task, output=output, cfg=cfg, tracking=tracking, experiment=experiment,
        resume=resume, overwrite=overwrite, params={"model": model_name, "model_path": model_path, **(params or {})},
        lineage={"base_model": model_name},
    )


def _weights_identity(path: str) -> list:
    # name, size and mtime of every file: cheap to compute, and changes whenever the weights do
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())


def ensure_task_teacher(model_path: str, model_name: str, task, cfg, *, tracking: str, experiment: str,
                        cache_root: Path, refuse_training: str | None = None) -> str:
    """A fine-tuned copy of a head-less teacher, made once per (teacher, data, recipe) and reused after.
    `refuse_training`: the error to raise instead of fine-tuning, where no copy is cached."""
    recipe = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
              "seed": cfg.seed, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay}
    key = hashlib.sha256(json.dumps([str(Path(model_path).resolve()), _weights_identity(model_path),
                                     task.fingerprint, recipe]).encode()).hexdigest()
    folder = cache_root / f"{slug(model_name)}-{slug(task.name)}-{key[:10]}"
    if (folder / "config.json").exists():
        print(f"teacher {model_name}: reusing its fine-tuned copy for {task.name} at {folder}", file=sys.stderr)
        return str(folder)
    if refuse_training:
        raise CompressError(refuse_training)
    from compress.training import RunState, lock_holder

    partial = RunState.partial(folder)
    left_in = shown(RunState.left_at(folder).get("inputs", {}).get("tracking", tracking))  # as run.json keeps it
    # a live fine-tuning (another process holds its lock) is never deleted: RunState below refuses it by name
    if left_in != shown(tracking) and lock_holder(partial / "lock") is None:
        # its MLflow run is in another store: this recipe's key says the work is the same, so start it again here
        print(f"teacher {model_name}: an interrupted fine-tuning logged to another MLflow store; starting it over",
              file=sys.stderr)
        shutil.rmtree(partial)
    print(f"teacher {model_name} has no classifier for {task.name}'s {task.num_labels} labels: fine-tuning it "
          f"first ({cfg.epochs} epochs, logged as its own MLflow run) -> {folder}", file=sys.stderr)
    result = finetune_model(model_path, model_name, task, folder, cfg, tracking=tracking, experiment=experiment,
                            resume=partial.exists(), params={"for_distill": True})
    if result is None:  # a DDP rank other than 0: rank 0 is saving the teacher; wait for it to appear
        deadline = time.monotonic() + 600
        while not (folder / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
    return str(folder)


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
    from compress.data import load_task
    from compress.models import check_encoder, load_config, resolve_model
    from compress.recipe import TrainConfig
    from compress.outputs import check_run_paths
    from compress.training import quiet_libraries

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
