"""One training run from start to saved model, shared by finetune, distill and the recovery of prune and share.

setup (state, data, Trainer, module, MLflow run) -> fit (resumable) -> score student and teacher, measure latency ->
save atomically -> log the final metrics under the names every compress run uses -> print the summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.engine.fit import closes_run_on_error, fit_or_stop
from compress.infra.tracking import shown, where_to_look
from compress.infra.identity import weights_identity
from compress.infra.results import StepResult
from compress.options.groups import LossConfig, RuntimeConfig, TrackingConfig, TrainingConfig


@dataclass
class TrainConfig:
    """What one run trains with: the training and runtime groups, the tokens per example, and the loss when it learns
    from a teacher (None: labels alone, as finetune)."""

    training: TrainingConfig
    runtime: RuntimeConfig
    max_length: int = 128
    loss: LossConfig | None = None

    def validate(self, training: bool = True) -> None:
        """training=False: 0 epochs scores, measures and saves the model as given (prune or share without recovery).
        The loss is the step's to check (LossConfig.validate), which knows whether it trains at all."""
        from compress.options.bounds import check_all

        self.training.validate(training)
        self.runtime.validate()
        check_all(max_length=self.max_length)

    def params(self) -> dict[str, Any]:
        """The flat params every run logs to MLflow and compares on --resume, by flag name."""
        runtime = {k: v for k, v in asdict(self.runtime).items() if k != "progress"}
        return asdict(self.training) | {"max_length": self.max_length} | runtime


@dataclass
class RunHooks:
    """What a caller running a step adds to its runs: Lightning callbacks (an Optuna pruning callback) and MLflow
    tags (the trial's run as parent)."""

    callbacks: list = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RunPlan:
    """What one run is: its command and MLflow run name, where it writes, and what it logs beyond its configs."""

    command: str
    name: str
    output: Path
    resume: bool = False
    overwrite: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    """the step's own params, logged beside the configs' (teacher_path or model_path names the weights it read)."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """written into compress.json beside the model."""
    extra_metrics: dict[str, float] = field(default_factory=dict)
    finalize: Callable | None = None
    """runs on the trained student before it is scored, measured and saved (prune makes sparsity permanent there);
    a tokenizer it returns replaces the run's for the student (prune --vocab rewrites the vocabulary there)."""


@dataclass
class RunModels:
    """The models of a run: the student it trains, its tokenizer, and the frozen teacher it learns from (if any)."""

    student: Any
    tokenizer: Any
    teacher: Any = None
    cache_file: Path | None = None
    """where the teacher's logits are cached (LossConfig.cache_teacher)."""
    teacher_tokenizer: Any = None
    """the teacher's own tokenizer, where it tokenizes otherwise than the student (None: `tokenizer` serves both)."""


def _input_identity(task, params: dict, tracking: str) -> dict[str, str]:
    """What a resumed run must share with the interrupted one beyond its params: the rows (not just the data's
    name and size), the weights of the models it read (name, size and mtime of their files, as the teacher cache
    keys them), and the MLflow store holding its run."""

    inputs = {"data": task.fingerprint, "tracking": shown(tracking)}  # run.json is no place for a password
    for key in ("teacher_path", "model_path", "student"):
        folder = params.get(key)
        if folder and Path(str(folder)).is_dir():
            inputs[key] = hashlib.sha256(json.dumps(weights_identity(str(folder))).encode()).hexdigest()[:16]
    return inputs


# What the two columns of the summary are, by command: finetune trains a teacher and has nothing beside it; prune
# and share compare the model they made with the one it came from.
COLUMNS = {"finetune": ("model", None), "prune": ("pruned", "parent"), "share": ("shared", "parent")}


def _print_summary(title: str, rows: list[tuple[str, str, str]], run_id: str | None, tracking: str,
                   columns: tuple[str, str | None]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title.rstrip()}", file=sys.stderr)
    mine, theirs = columns
    print(f"  {'':{width}}  {mine:>12}" + (f"  {theirs:>12}" if theirs else ""), file=sys.stderr)
    for name, student, teacher in rows:
        print(f"  {name:{width}}  {student:>12}" + (f"  {teacher:>12}" if theirs else ""), file=sys.stderr)
    if run_id:
        print(f"  MLflow run {run_id} in {shown(tracking)}  (open it: {where_to_look(tracking)})", file=sys.stderr)


def run_training(plan: RunPlan, models: RunModels, task, cfg: TrainConfig, tracking: TrackingConfig,
                 hooks: RunHooks | None = None) -> StepResult | None:
    """Train the student (from the teacher when there is one, else on labels alone), save it to `plan.output`, log
    to MLflow.

    Returns None on DDP ranks other than 0, which only help with fit. 0 epochs skips fit (prune without recovery).
    """
    from compress.engine.state import RunState
    from compress.engine.trainer import quiet_libraries

    cfg.validate(training=False)
    hooks = hooks or RunHooks()
    quiet_libraries()
    with RunState(plan.output, plan.resume, plan.overwrite) as state:  # holds OUTPUT.partial's lock until it ends
        resume = plan.resume
        if state.nothing_left:
            print(f"--resume: the run stopped before it wrote anything to {state.dir}; starting it now",
                  file=sys.stderr)
            resume = False
        run = _Run.start(plan, models, task, cfg, tracking, hooks, state, resume)
        if not run.fit(resume):
            return None
        with closes_run_on_error(run.logger):  # Lightning marked the run FINISHED when fit ended
            student, teacher, tokenizer = run.final_models()
            metrics, shape = _measure(student, teacher, run, cfg.runtime.latency_reps, run.data_for(tokenizer))
            metrics |= plan.extra_metrics
            lineage = _save(plan, student, teacher, tokenizer, task, metrics, run.logger, tracking.tracking)
            run.logger.finalize("success")
        state.finish()
    _print_run_summary(plan, task, metrics, shape, teacher is not None, run.logger.run_id, tracking.tracking)
    return StepResult(str(plan.output), metrics, run.logger.run_id, lineage)


@dataclass
class _Run:
    """A run once set up: its state, data, Trainer, LightningModule and MLflow logger."""

    plan: RunPlan
    models: RunModels
    task: Any
    state: Any
    datamodule: Any
    trainer: Any
    module: Any
    logger: Any
    accelerator: str
    precision: str
    epochs: int

    @classmethod
    def start(cls, plan: RunPlan, models: RunModels, task, cfg: TrainConfig, tracking: TrackingConfig,
              hooks: RunHooks, state, resume: bool) -> _Run:
        from compress.data.datamodule import TaskDataModule
        from compress.engine.distill_module import DistillModule
        from compress.engine.trainer import build_trainer, resolve_accelerator, resolve_precision
        from compress.infra.tracking import log_task_data, make_logger, run_tags

        training, runtime = cfg.training, cfg.runtime
        accelerator = resolve_accelerator(runtime.accelerator)
        precision = resolve_precision(runtime.precision, accelerator)
        workers = runtime.num_workers if runtime.num_workers is not None else (4 if accelerator == "cuda" else 0)
        datamodule = TaskDataModule(task, models.tokenizer, batch_size=training.batch_size, max_length=cfg.max_length,
                                    num_workers=workers, seed=training.seed, teacher_tokenizer=models.teacher_tokenizer)

        import lightning.pytorch as pl

        pl.seed_everything(training.seed, verbose=False)
        saved = state.read()
        all_params = {"command": plan.command, "task": task.name, "metric": task.metric,
                      "num_labels": task.num_labels, "train_rows": len(task.train_labels),
                      "dev_rows": len(task.dev_labels), "output": str(plan.output), **task.flags, **cfg.params(),
                      **plan.params}
        inputs = _input_identity(task, plan.params, tracking.tracking)
        if resume:
            state.check_resume(all_params, inputs)
        # The Trainer and the module first: what they refuse is reported before any MLflow run exists (one opened
        # before was left RUNNING).
        trainer = build_trainer(epochs=training.epochs, accelerator=accelerator, precision=precision, runtime=runtime,
                                logger=None, ckpt_dir=state.ckpt_dir, callbacks=hooks.callbacks)
        module = DistillModule(models.student, models.teacher, num_labels=task.num_labels, metric=task.metric,
                               loss=cfg.loss, training=training, cache_file=models.cache_file,
                               compile=runtime.compile, shared_tokens=models.teacher_tokenizer is None)
        logger = make_logger(tracking.tracking, tracking.experiment, plan.name,
                             run_tags(accelerator, plan.command) | hooks.tags, run_id=saved.get("run_id"))
        log_task_data(logger, task)  # the run's page lists the train and dev rows it was given
        state.write(run_id=logger.run_id, params=all_params, inputs=inputs)
        if not saved.get("params_logged"):  # MLflow refuses to log a param twice with another value; once is enough
            logger.log_hyperparams(all_params)
            state.write(params_logged=True)
        trainer.logger = logger
        return cls(plan, models, task, state, datamodule, trainer, module, logger, accelerator, precision,
                   training.epochs)

    def fit(self, resume: bool) -> bool:
        """Fit (unless 0 epochs); False on a DDP rank other than 0, whose part ends with the fit."""
        import torch

        ckpt = self.state.last_checkpoint() if resume else None
        if resume:
            print(f"resuming from {ckpt}" if ckpt else "no checkpoint was written yet; starting over", file=sys.stderr)
        if self.epochs > 0:
            with closes_run_on_error(self.logger, errors=False):  # Lightning closed an error's run FAILED already
                fit_or_stop(self.trainer, self.module, self.datamodule, ckpt)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP fit is over and the other ranks return now: rank 0 scores alone, and a live process group would
            # make torchmetrics wait at compute() for ranks that have gone. A later fit (distill after finetune)
            # re-creates it.
            torch.distributed.destroy_process_group()
        return self.trainer.is_global_zero

    def final_models(self):
        """The trained student on the CPU in fp32 (finalized), the teacher as it is, and the student's tokenizer."""
        student = self.module.student.float().cpu()
        tokenizer = self.models.tokenizer
        if self.plan.finalize is not None:
            tokenizer = self.plan.finalize(student) or tokenizer
        return student, self.models.teacher, tokenizer

    def data_for(self, tokenizer):
        """The dev data as `tokenizer` encodes it: the run's own, or anew for a tokenizer the finalize step made."""
        if tokenizer is self.models.tokenizer:
            return self.datamodule
        from compress.data.datamodule import TaskDataModule

        dm = self.datamodule
        return TaskDataModule(self.task, tokenizer, batch_size=dm.batch_size, eval_batch_size=dm.eval_batch_size,
                              max_length=dm.max_length, num_workers=dm.num_workers, seed=dm.seed)


def _measure(student, teacher, run: _Run, latency_reps: int, student_data) -> tuple[dict[str, float], tuple[int, str]]:
    """Score the student (on `student_data`, as its tokenizer encodes the dev set) and the teacher on the dev set, and
    time both in the same interleaved rounds."""
    from compress.engine.scoring import score, score_in_place
    from compress.models.loading import max_tokens
    from compress.models.measure import count_params, latency_ms

    task = run.task
    # the teacher reads the dev set through its own tokenizer
    datamodule = run.data_for(run.models.teacher_tokenizer or run.models.tokenizer)
    student_score = score(student, student_data, task.metric, task.num_labels, run.accelerator, run.precision)
    metrics = {"student_score": student_score, "student_params": count_params(student)}
    placed = run.module.teacher_placed  # spread over devices by accelerate: scored where it is, never moved
    if teacher is not None:
        if placed:
            teacher_score = score_in_place(teacher, datamodule, task.metric, task.num_labels)
        else:
            teacher = teacher.float().cpu()
            teacher_score = score(teacher, datamodule, task.metric, task.num_labels, run.accelerator, run.precision)
        metrics |= {"teacher_score": teacher_score, "teacher_params": count_params(teacher),
                    "retention": student_score / teacher_score if teacher_score else 0.0,
                    "compression": count_params(teacher) / metrics["student_params"]}

    device = "cuda" if run.accelerator == "cuda" else "cpu"
    timed_teacher = teacher is not None and not placed  # a teacher split over devices has no comparable latency
    if teacher is not None and placed:
        print("teacher spread over devices (--teacher_device_map): its latency and the speedup are not measured",
              file=sys.stderr)
    models = {"student": student} | ({"teacher": teacher} if timed_teacher else {})
    # one random batch for both: ids every model's vocabulary has, no longer than any model's positions
    seq = min(128, *(max_tokens(m.config) or 128 for m in models.values()))
    vocab = min(m.config.vocab_size for m in models.values())
    print(f"measuring latency at batch 32 x {seq} on {device} ({latency_reps} interleaved rounds)", file=sys.stderr)
    lat = latency_ms(models, batch=32, seq=seq, device=device, reps=latency_reps, vocab_size=vocab)
    metrics["latency_ms"] = lat["student"]
    if timed_teacher:
        metrics["teacher_latency_ms"] = lat["teacher"]
        metrics["speedup"] = lat["teacher"] / lat["student"]
    return metrics, (seq, device)


def _save(plan: RunPlan, student, teacher, tokenizer, task, metrics: dict, logger, tracking: str) -> dict:
    """Write the student, its tokenizer and compress.json in one rename, log the final metrics and the model; return
    the lineage written."""
    from compress.engine.state import atomic_output, save_model
    from compress.infra.lineage import write_lineage
    from compress.infra.tracking import log_final
    from compress.models.measure import weights_mb

    student.config.architectures = [type(student).__name__]
    params = plan.params
    teacher_dir = next((Path(str(params[key])) for key in ("teacher_path", "model_path")
                        if params.get(key) and Path(str(params[key])).is_dir()), None)
    with atomic_output(plan.output, plan.overwrite) as tmp:
        save_model(student, tokenizer, tmp)
        metrics["student_mb"] = weights_mb(tmp)
        if teacher is not None and teacher_dir is not None:  # the weights file the teacher was read from
            metrics["teacher_mb"] = weights_mb(teacher_dir)
        lineage = {"command": plan.command, "task": task.name, "metric": task.metric, "label_names": task.label_names,
                   "mlflow_run_id": logger.run_id, "tracking": shown(tracking), "metrics": metrics, **plan.lineage}
        write_lineage(tmp, lineage)
        log_final(logger, metrics, artifact_dir=str(tmp), artifact_path="model", model=(plan.output.name, plan.command),
                  task=task)
    return lineage


def _print_run_summary(plan: RunPlan, task, metrics: dict, shape: tuple[int, str], has_teacher: bool,
                       run_id: str | None, tracking: str) -> None:
    seq, device = shape

    def fmt(key: str) -> str:
        v = metrics.get(key)
        return "-" if v is None else (f"{v:,.0f}" if key.endswith("params") else f"{v:.4f}" if "score" in key
                                      else f"{v:.1f}")

    rows = [(task.metric, fmt("student_score"), fmt("teacher_score")),
            ("params", fmt("student_params"), fmt("teacher_params")),
            ("MB", fmt("student_mb"), fmt("teacher_mb")),
            (f"latency ms (32x{seq}, {device})", fmt("latency_ms"), fmt("teacher_latency_ms"))]
    extra = []
    if has_teacher:
        extra = [f"retention {metrics['retention']:.3f}", f"compression {metrics['compression']:.2f}x"]
        extra += [f"speedup {metrics['speedup']:.2f}x"] if "speedup" in metrics else []
    _print_summary(f"{plan.command} done -> {plan.output}  {'  '.join(extra)}", rows, run_id, tracking,
                   COLUMNS.get(plan.command, ("student", "teacher")))
