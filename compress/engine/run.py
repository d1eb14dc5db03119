"""One training run from start to saved model, shared by finetune, distill and the recovery of prune and share.

setup (data, models, MLflow run) -> fit (resumable) -> score student and teacher -> save atomically ->
measure size and latency -> log the final metrics under the names every compress run uses.
"""

from __future__ import annotations
import hashlib
import json
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from compress.infra.errors import CompressError, Terminated
from compress.options.bounds import check_all, check_devices
from compress.infra.signals import ctrl_c_seen, lightning_fit, raise_dropped_ctrl_c, release_frames, sigterm_received
from compress.infra.tracking import shown, where_to_look


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128
    seed: int = 42
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_workers: int | None = None
    checkpoint_every: int = 0  # steps; 0: every `checkpoint_minutes` of training instead
    checkpoint_minutes: float = 5.0
    latency_reps: int = 5
    compile: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self, training: bool = True) -> None:
        """training=False is for run_training itself: 0 epochs scores, measures and saves the model as given (the
        commands check their own epoch flag first)."""
        if training:
            check_all(epochs=self.epochs)
        check_all(batch_size=self.batch_size, lr=self.lr, warmup=self.warmup, weight_decay=self.weight_decay,
                  max_length=self.max_length, checkpoint_every=self.checkpoint_every,
                  checkpoint_minutes=self.checkpoint_minutes, latency_reps=self.latency_reps,
                  num_workers=self.num_workers, seed=self.seed)
        check_devices(self.devices)


def _input_identity(task, params: dict, tracking: str) -> dict[str, str]:
    """What a resumed run must share with the interrupted one beyond its params: the rows (not just the data's
    name and size), the weights of the models it read (name, size and mtime of their files, as the teacher cache
    keys them), and the MLflow store holding its run."""
    from compress.infra.identity import weights_identity

    inputs = {"data": task.fingerprint, "tracking": shown(tracking)}  # run.json is no place for a password
    for key in ("teacher_path", "model_path", "student"):
        folder = params.get(key)
        if folder and Path(str(folder)).is_dir():
            inputs[key] = hashlib.sha256(json.dumps(weights_identity(str(folder))).encode()).hexdigest()[:16]
    return inputs


def fit_or_stop(trainer, module, datamodule, ckpt: str | None) -> None:
    """trainer.fit, with a stop by signal told apart from success and from an error. Lightning turns Ctrl-C into
    sys.exit(1) (no word of resuming) and SIGTERM into SIGTERMException, a SystemExit of code None, which exited 0
    with no output written, so `compress finetune && compress distill` went on as if it had worked."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    alone = trainer.world_size == 1 and trainer.strategy.launcher is None
    if alone:  # a fit with other ranks is Lightning's to stop, all ranks together (lightning_fit)
        raise_dropped_ctrl_c()
    try:
        with lightning_fit(alone=alone):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except SIGTERMException:
        _close_progress_bars(trainer)
        raise Terminated from None
    except (SystemExit, Exception) as stop:
        # Ctrl-C (or a SIGTERM before or after Lightning's loop, raised by ours): the CLI says how to resume and
        # exits 130 (143); search marks the trial failed. Lightning's sys.exit(1) is raised while handling the
        # KeyboardInterrupt, and so is its own shutdown failing: a Ctrl-C that lands inside an MLflow write leaves
        # SQLite locked, and closing the run as FAILED then raises "database is locked". The checkpoints are whole
        # either way, and --resume continues the same run.
        _close_progress_bars(trainer)  # an error's line too would land mid-bar, with the bar drawn again below it
        cut = _during_ctrl_c(stop)
        if cut:
            raise (Terminated if isinstance(cut, Terminated) else KeyboardInterrupt) from None
        raise
    if sigterm_received():  # in the last batch or as the loop ended: Lightning noted it and let fit finish
        raise Terminated
    if alone:  # a Ctrl-C dropped in a __del__ during the fit: Lightning trained on
        raise_dropped_ctrl_c()


@contextmanager
def closes_run_on_error(logger, errors: bool = True):
    """Close the MLflow run as KILLED (a stop) or FAILED (an error, unless errors=False) if the block raises.
    Lightning marks the run FINISHED when fit ends, so a Ctrl-C or an error while the student was scored, timed or
    saved left a FINISHED run with no model; and it marks a stop inside fit FAILED, like an error, where the UI
    should tell a run to resume from a run that broke. At best: a Ctrl-C inside an MLflow write leaves the store
    locked, and the stop must go on."""
    try:
        yield
    except BaseException as err:
        # a Ctrl-C that came out as another error is still a stop (signals.ctrl_c_remembered)
        status = "KILLED" if isinstance(err, KeyboardInterrupt) or ctrl_c_seen() else "FAILED"
        if status == "FAILED" and not errors:
            raise
        if status == "KILLED":
            release_frames(err)  # else a Ctrl-C inside an MLflow query leaves SQLite locked for the close
        try:
            logger.experiment.set_terminated(logger.run_id, status)
        except Exception as closing:
            print(f"note: MLflow run {logger.run_id} left open ({type(closing).__name__})", file=sys.stderr)
        raise


def _during_ctrl_c(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) `error` was raised while handling, if any (an error of its own was
    not)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _close_progress_bars(trainer) -> None:
    """Lightning leaves its bars open when fit stops early; tqdm would redraw them at exit, below the last word."""
    from tqdm import tqdm

    for value in getattr(trainer.progress_bar_callback, "__dict__", {}).values():
        if isinstance(value, tqdm):
            value.close()


def check_distill_flags(temperature: float, alphas: dict[str, float], training: bool = True,
                        cache_teacher: bool = False) -> None:
    """The flags distill shares with the recovery steps of prune and share; `alphas` maps flag name to weight."""
    live = [f"--{name} 0" for name in ("alpha_hidden", "alpha_attn") if alphas.get(name)]
    if cache_teacher and live:
        raise CompressError(f"--cache_teacher stores logits only: set {' and '.join(live)} with it "
                            "(hidden-state and attention losses need the live teacher every step)")
    check_all(temperature=temperature, **alphas)
    if training and all(value == 0 for value in alphas.values()):
        raise CompressError("--alpha_*: every loss weight is 0, so training has nothing to learn from")


@dataclass
class RunResult:
    output: str
    metrics: dict[str, float]
    run_id: str | None


# Extra Lightning callbacks and MLflow tags for every run_training call inside a `run_hooks` block. The commands'
# signatures are their CLI flags, so a caller that runs a command as a step (compress search: an Optuna pruning
# callback, the trial's run as MLflow parent) hands these in here rather than through new parameters.
_RUN_HOOKS: ContextVar[dict | None] = ContextVar("compress_run_hooks", default=None)


@contextmanager
def run_hooks(*, callbacks: list | None = None, tags: dict[str, str] | None = None, progress: bool | None = None):
    """Within the block, run_training adds `callbacks` to its Trainer and `tags` to its MLflow run.

    `progress`, when not None, overrides the progress bar (off when several search workers share a terminal).
    """
    token = _RUN_HOOKS.set({"callbacks": list(callbacks or []), "tags": dict(tags or {}), "progress": progress})
    try:
        yield
    finally:
        _RUN_HOOKS.reset(token)


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


def run_training(
    *,
    command: str,
    run_name: str,
    student,
    teacher,
    tokenizer,
    task,
    output: Path,
    cfg: TrainConfig,
    weights=None,
    temperature: float = 2.0,
    tracking: str,
    experiment: str,
    resume: bool = False,
    overwrite: bool = False,
    params: dict | None = None,
    lineage: dict | None = None,
    extra_metrics: dict | None = None,
    finalize=None,
    cache_teacher: bool = False,
    cache_file: Path | None = None,
) -> RunResult | None:
    """Train `student` (from `teacher` when given, else on labels alone), save it to `output`, log to MLflow.

    Returns None on DDP ranks other than 0, which only help with fit. `cfg.epochs == 0` skips fit (prune
    without recovery). `finalize(student)`, when given, runs on the trained student before it is scored,
    measured and saved (prune makes its sparsity masks permanent there).
    """
    import torch

    from compress.data.datamodule import TaskDataModule
    from compress.models.measure import count_params, latency_ms, weights_mb
    from compress.engine.distill_module import DistillModule
    from compress.infra.tracking import log_final, make_logger, run_tags
    from compress.engine.state import RunState, atomic_output, save_model
    from compress.engine.trainer import build_trainer, resolve_accelerator, quiet_libraries, resolve_precision
    from compress.engine.scoring import score, score_in_place
    from compress.infra.lineage import write_lineage

    cfg.validate(training=False)
    hooks = _RUN_HOOKS.get() or {}
    if hooks.get("progress") is not None:
        cfg.progress = hooks["progress"]
    quiet_libraries()
    with RunState(output, resume, overwrite) as state:  # holds OUTPUT.partial's lock until it ends
        if state.nothing_left:
            print(f"--resume: the run stopped before it wrote anything to {state.dir}; starting it now",
                  file=sys.stderr)
            resume = False
        accelerator = resolve_accelerator(cfg.accelerator)
        precision = resolve_precision(cfg.precision, accelerator)
        workers = cfg.num_workers if cfg.num_workers is not None else (4 if accelerator == "cuda" else 0)
        datamodule = TaskDataModule(task, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                    num_workers=workers, seed=cfg.seed)

        import lightning.pytorch as pl

        pl.seed_everything(cfg.seed, verbose=False)
        saved = state.read()
        all_params = {"command": command, "task": task.name, "metric": task.metric, "num_labels": task.num_labels,
                      "train_rows": len(task.train_labels), "dev_rows": len(task.dev_labels),
                      "output": str(output), **task.flags, **asdict(cfg), **(params or {})}
        all_params.pop("extra")
        all_params.pop("progress")
        inputs = _input_identity(task, params or {}, tracking)
        if resume:
            state.check_resume(all_params, inputs)
        # The Trainer and the module first: what they refuse is reported before any MLflow run exists (one opened
        # before was left RUNNING).
        trainer = build_trainer(epochs=cfg.epochs, accelerator=accelerator, precision=precision, devices=cfg.devices,
                                strategy=cfg.strategy, logger=None, ckpt_dir=state.ckpt_dir,
                                checkpoint_every=cfg.checkpoint_every, checkpoint_minutes=cfg.checkpoint_minutes,
                                progress=cfg.progress,
                                callbacks=hooks.get("callbacks"))
        module = DistillModule(student, teacher, num_labels=task.num_labels, metric=task.metric,
                               temperature=temperature, weights=weights, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               warmup=cfg.warmup, cache_teacher=cache_teacher, cache_file=cache_file,
                               compile=cfg.compile)
        logger = make_logger(tracking, experiment, run_name, run_tags(accelerator, command) | hooks.get("tags", {}),
                              run_id=saved.get("run_id"))
        state.write(run_id=logger.run_id, params=all_params, inputs=inputs)
        if not saved.get("params_logged"):  # MLflow refuses to log a param twice with another value; once is enough
            logger.log_hyperparams(all_params)
            state.write(params_logged=True)

        trainer.logger = logger
        ckpt = state.last_checkpoint() if resume else None
        if resume:
            print(f"resuming from {ckpt}" if ckpt else "no checkpoint was written yet; starting over", file=sys.stderr)
        if cfg.epochs > 0:
            with closes_run_on_error(logger, errors=False):  # Lightning closed an error's run FAILED already
                fit_or_stop(trainer, module, datamodule, ckpt)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP fit is over and the other ranks return now: rank 0 scores alone, and a live process group would
            # make torchmetrics wait at compute() for ranks that have gone. A later fit (distill after finetune)
            # re-creates it.
            torch.distributed.destroy_process_group()
        if not trainer.is_global_zero:
            return None

        with closes_run_on_error(logger):  # Lightning marked the run FINISHED when fit ended
            student = module.student.float().cpu()
            if finalize is not None:
                finalize(student)
            student_score = score(student, datamodule, task.metric, task.num_labels, accelerator, precision)
            metrics = {"student_score": student_score, "student_params": count_params(student)}
            placed = module.teacher_placed  # spread over devices by accelerate: scored where it is, never moved
            if teacher is not None:
                if placed:
                    teacher_score = score_in_place(teacher, datamodule, task.metric, task.num_labels)
                else:
                    teacher = teacher.float().cpu()
                    teacher_score = score(teacher, datamodule, task.metric, task.num_labels, accelerator, precision)
                metrics |= {"teacher_score": teacher_score, "teacher_params": count_params(teacher),
                            "retention": student_score / teacher_score if teacher_score else 0.0,
                            "compression": count_params(teacher) / metrics["student_params"]}

            device = "cuda" if accelerator == "cuda" else "cpu"
            timed_teacher = teacher is not None and not placed  # a teacher split over devices has no comparable latency
            if teacher is not None and placed:
                print("teacher spread over devices (--teacher_device_map): its latency and the speedup are not "
                      "measured", file=sys.stderr)
            models = {"student": student} | ({"teacher": teacher} if timed_teacher else {})
            seq = min(128, student.config.max_position_embeddings)
            print(f"measuring latency at batch 32 x {seq} on {device} ({cfg.latency_reps} interleaved rounds)",
                  file=sys.stderr)
            lat = latency_ms(models, batch=32, seq=seq, device=device, reps=cfg.latency_reps,
                             vocab_size=student.config.vocab_size)
            metrics["latency_ms"] = lat["student"]
            if timed_teacher:
                metrics["teacher_latency_ms"] = lat["teacher"]
                metrics["speedup"] = lat["teacher"] / lat["student"]
            metrics |= extra_metrics or {}

            student.config.architectures = [type(student).__name__]
            teacher_dir = next((Path(str(params[key])) for key in ("teacher_path", "model_path")
                                if params and params.get(key) and Path(str(params[key])).is_dir()), None)
            with atomic_output(output, overwrite) as tmp:
                save_model(student, tokenizer, tmp)
                metrics["student_mb"] = weights_mb(tmp)
                if teacher is not None and teacher_dir is not None:  # the weights file the teacher was read from
                    metrics["teacher_mb"] = weights_mb(teacher_dir)
                write_lineage(tmp, {"command": command, "task": task.name, "metric": task.metric, "label_names":
                                    task.label_names, "mlflow_run_id": logger.run_id, "tracking": shown(tracking),
                                    "metrics": metrics, **(lineage or {})})
                log_final(logger, metrics, artifact_dir=str(tmp), artifact_path="model")
            logger.finalize("success")
        state.finish()

    def fmt(key: str) -> str:
        v = metrics.get(key)
        return "-" if v is None else (f"{v:,.0f}" if key.endswith("params") else f"{v:.4f}" if "score" in key
                                      else f"{v:.1f}")

    rows = [(task.metric, fmt("student_score"), fmt("teacher_score")),
            ("params", fmt("student_params"), fmt("teacher_params")),
            ("MB", fmt("student_mb"), fmt("teacher_mb")),
            (f"latency ms (32x{seq}, {device})", fmt("latency_ms"), fmt("teacher_latency_ms"))]
    extra = []
    if teacher is not None:
        extra = [f"retention {metrics['retention']:.3f}", f"compression {metrics['compression']:.2f}x"]
        extra += [f"speedup {metrics['speedup']:.2f}x"] if "speedup" in metrics else []
    _print_summary(f"{command} done -> {output}  {'  '.join(extra)}", rows, logger.run_id, tracking,
                   COLUMNS.get(command, ("student", "teacher")))
    return RunResult(str(output), metrics, logger.run_id)
