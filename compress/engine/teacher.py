"""A task teacher from a pretrained encoder: fine-tuned once, kept under the teacher cache and reused."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.tracking import shown
from compress.infra.identity import weights_identity, slug


def finetune_model(model_path: str, model_name: str, task, output: Path, cfg, tracking, *, resume: bool = False,
                   overwrite: bool = False, params: dict | None = None, hooks=None):
    """Fine-tune `model_path` on `task` with plain cross-entropy (a run.TrainConfig with no loss); the shared body of
    the command and of distill. `tracking` is an options.groups.TrackingConfig."""
    from compress.engine.run import RunModels, RunPlan, run_training
    from compress.models.loading import load_classifier, load_tokenizer

    model = load_classifier(model_path, task.label_names, "--model", seed=cfg.training.seed, any_encoder=True)
    tokenizer = load_tokenizer(model_path, "--model", model.config, cfg.max_length)
    plan = RunPlan(command="finetune", name=f"finetune {model_name} on {task.name}", output=output, resume=resume,
                   overwrite=overwrite, params={"model": model_name, "model_path": model_path, **(params or {})},
                   lineage={"base_model": model_name})
    return run_training(plan, RunModels(student=model, tokenizer=tokenizer), task, cfg, tracking, hooks)


def ensure_task_teacher(model_path: str, model_name: str, task, cfg, tracking, *, cache_root: Path,
                        refuse_training: str | None = None, hooks=None) -> str:
    """A fine-tuned copy of a head-less teacher, made once per (teacher, data, recipe) and reused after.
    `refuse_training`: the error to raise instead of fine-tuning, where no copy is cached; `hooks` (a run.RunHooks)
    go to the fine-tuning's run (compress search nests it under the study's run)."""
    training = cfg.training
    recipe = {"epochs": training.epochs, "lr": training.lr, "batch_size": training.batch_size,
              "max_length": cfg.max_length, "seed": training.seed, "warmup": training.warmup,
              "weight_decay": training.weight_decay}
    key = hashlib.sha256(json.dumps([str(Path(model_path).resolve()), weights_identity(model_path),
                                     task.fingerprint, recipe]).encode()).hexdigest()
    folder = cache_root / f"{slug(model_name)}-{slug(task.name)}-{key[:10]}"
    if (folder / "config.json").exists():
        print(f"teacher {model_name}: reusing its fine-tuned copy for {task.name} at {folder}", file=sys.stderr)
        return str(folder)
    if refuse_training:
        raise CompressError(refuse_training)
    from compress.engine.state import RunState, lock_holder

    partial = RunState.partial(folder)
    # as run.json keeps it
    left_in = shown(RunState.left_at(folder).get("inputs", {}).get("tracking", tracking.tracking))
    # a live fine-tuning (another process holds its lock) is never deleted: RunState below refuses it by name
    if left_in != shown(tracking.tracking) and lock_holder(partial / "lock") is None:
        # its MLflow run is in another store: this recipe's key says the work is the same, so start it again here
        print(f"teacher {model_name}: an interrupted fine-tuning logged to another MLflow store; starting it over",
              file=sys.stderr)
        shutil.rmtree(partial)
    print(f"teacher {model_name} has no classifier for {task.name}'s {task.num_labels} labels: fine-tuning it "
          f"first ({training.epochs} epochs, logged as its own MLflow run) -> {folder}", file=sys.stderr)
    result = finetune_model(model_path, model_name, task, folder, cfg, tracking, resume=partial.exists(),
                            params={"for_distill": True}, hooks=hooks)
    if result is None:  # a DDP rank other than 0: rank 0 is saving the teacher; wait for it to appear
        deadline = time.monotonic() + 600
        while not (folder / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
    return str(folder)
