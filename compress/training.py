"""What every training command shares: the Trainer, its checkpoints and resume, scoring, and atomic output.

A run writing to OUTPUT keeps its state in OUTPUT.partial/ (checkpoints and the MLflow run id) until it
succeeds; only then does OUTPUT appear, renamed into place in one step, and the .partial folder go away.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

from compress.errors import CompressError
from compress.flags import check_choice
from compress.signals import raise_dropped_ctrl_c, release_frames
from compress.outputs import check_output, check_overwrite, share_like_open
from compress.tracking import shown


def quiet_libraries() -> None:
    """Silence what users cannot act on: Lightning's upsell tips, HF's per-file progress bars, known warnings; and
    stop for a Ctrl-C that the libraries' imports dropped (signals.ctrl_c_remembered)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        r".*isinstance\(treespec, LeafSpec\).*",  # Lightning vs torch 2.13's pytree; harmless
        r".*module\(s\) in eval mode.*",  # the frozen teacher is in eval mode on purpose
        r".*smaller than the logging interval.*",
        r".*does not have many workers.*",  # 0 workers is our CPU default: tokenized rows need no workers
        r".*LeafSpec.*",
        r".*Checkpoint directory .* exists and is not empty.*",  # expected on --resume
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # every command calls this once its libraries are loaded: a Ctrl-C that their imports dropped stops it here
    raise_dropped_ctrl_c()


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise CompressError(f"--accelerator {accelerator}: no CUDA device is visible")
        return "cuda"
    check_choice("accelerator", accelerator)
    return "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' is bf16-mixed on a GPU that supports it (no loss scaling needed), full fp32 on a CPU."""
    if precision == "auto":
        return "bf16-mixed" if accelerator == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    check_choice("precision", precision)
    return precision


def teacher_runs_bf16(accelerator: str, precision: str) -> bool:
    """The frozen teacher runs in bf16 under bf16 precision (DistillModule.on_fit_start): auto's choice on a GPU."""
    return "bf16" in resolve_precision(precision, resolve_accelerator(accelerator))


# What a resumed run may change: where and how it runs and is saved, not what it learns.
# --data, --text_column, --label_column and --teacher_cache as typed may change (another working folder, a column
# named that was found before): the rows and the weights they lead to are what must match (`inputs`)
RESUMABLE_CHANGES = frozenset({"accelerator", "devices", "strategy", "precision", "compile", "num_workers",
                               "checkpoint_every", "checkpoint_minutes", "latency_reps", "data", "text_column",
                               "label_column", "teacher_cache"})


# Params that are no flag of their own, by the flag that sets them.
_DERIVED = {"command": "the command", "task": "--task/--data", "train_rows": "training rows", "dev_rows": "dev rows",
            "metric": "the metric", "num_labels": "labels", "teacher_path": "--teacher", "model_path": "--model",
            "teacher_layers_kept": "--layers", "student": "--student"}


def _shown(value) -> str:
    return "unset" if value in (None, "") else str(value)


class RunState:
    """OUTPUT.partial/: checkpoints plus a small JSON of what must survive a crash (the MLflow run id, the params)."""

    def __init__(self, output: Path, resume: bool, overwrite: bool) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        output = Path(os.path.normpath(output))
        self.output = output
        self.dir = self.partial(output)
        self.ckpt_dir = self.dir / "checkpoints"
        self._meta = self.dir / "run.json"
        # A DDP child process (Lightning re-runs the command with LOCAL_RANK set) finds rank 0's OUTPUT.partial: it
        # only helps with fit, so it neither checks nor writes the folder, and reads rank 0's run id from it.
        self._child = rank_zero_only.rank != 0
        self._lock = None  # OUTPUT.partial/lock, taken at the first write (rank 0 only)
        self.nothing_left = False
        if self._child:
            return
        check_output(output)
        check_overwrite(output, overwrite)
        if (holder := lock_holder(self.dir / "lock")) is not None:  # before --overwrite could delete a live run's work
            raise CompressError(f"--output {output}: another compress process ({holder}) is writing it now; wait for "
                                "it to finish, or choose another --output")
        if self.dir.exists() and not resume:
            if not overwrite:
                raise CompressError(
                    f"--output {output}: an interrupted run left {self.dir}; pass --resume to continue it "
                    "or --overwrite to start over"
                )
            shutil.rmtree(self.dir)
        # A stop before the run's first write leaves nothing to resume, and the stop's last line still says
        # --resume (it cannot know): the run starts as new (run_training says so) rather than refuse.
        self.nothing_left = resume and not self.dir.exists()

    @staticmethod
    def partial(output: Path) -> Path:
        """Where a run writing `output` keeps its checkpoints and record until it finishes."""
        output = Path(os.path.normpath(output))
        return output.with_name(output.name + ".partial")

    @classmethod
    def left_at(cls, output: Path) -> dict:
        """The record of an interrupted run at `output`, or {} when none was left; read without taking the folder,
        so a caller can decide whether to resume it before a RunState checks it."""
        meta = cls.partial(output) / "run.json"
        return json.loads(meta.read_text()) if meta.is_file() else {}

    def read(self) -> dict:
        return json.loads(self._meta.read_text()) if self._meta.exists() else {}

    def write(self, **values) -> None:
        if self._child:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = _take_lock(self.dir / "lock")
            if self._lock is None:
                raise CompressError(f"--output {self.output}: another compress process "
                                    f"({lock_holder(self.dir / 'lock')}) started writing it; choose another --output")
        self._meta.write_text(json.dumps(self.read() | values, default=str))  # params may hold paths

    def check_resume(self, params: dict, inputs: dict) -> None:
        """Refuse to resume another run. Lightning would restore the old optimizer and schedule over new flags (a new
        --lr is lost; a new --batch_size resumes at the wrong batch), a student of another shape fails to load, MLflow
        refuses to change a logged param or cannot find the run in another store, and other data or other teacher
        weights under the same names would quietly finish the run on them. `inputs` are what the params cannot show:
        the data's and models' fingerprints and the MLflow store."""
        saved = self.read()
        if saved.get("params") is None:  # nothing recorded yet (killed before its first write)
            return
        hint = "resume with the same flags and files, or drop --resume and pass --overwrite to start over"
        # the flags first: a changed --max_train or --label_column changes the rows too, and is the news
        before, now = saved["params"], json.loads(json.dumps(params, default=str))
        # a param one side lacks was added or dropped by another compress version, not by the user
        changed = sorted((k for k in set(before) & set(now)
                          if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)),
                         key=lambda k: (k in _DERIVED, k))  # the flags the user typed first
        if changed:
            k = changed[0]
            others = [name for name in dict.fromkeys(_DERIVED.get(c, "--" + c) for c in changed[1:])
                      if name != _DERIVED.get(k, "--" + k)]
            more = f" (also {', '.join(others)})" if others else ""
            raise CompressError(f"--resume: the interrupted run at {self.dir} had {_DERIVED.get(k, '--' + k)} "
                                f"{_shown(before.get(k))}, this one {_shown(now.get(k))}{more}; {hint}")
        for key, now in inputs.items():  # strings: a fingerprint, a URI
            before = saved.get("inputs", {}).get(key)
            if key == "tracking" and before is not None:
                before = shown(before)  # a run.json written before passwords were hidden holds the URL as typed
            if before is None or before == now:
                continue
            if key == "tracking":
                raise CompressError(f"--resume: the interrupted run at {self.dir} logs to --tracking {before}, not "
                                    f"{now}; {hint}")
            what = "the data's rows" if key == "data" else f"the weights in {_DERIVED.get(key, key)}"
            raise CompressError(f"--resume: {what} changed since the interrupted run at {self.dir}; {hint}")

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint that loads; a kill -9 during a write can leave the newest one truncated."""
        for ckpt in sorted(self.ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
                return str(ckpt)
            except Exception:  # a truncated file: fall back to the one before it
                print(f"skipping unreadable checkpoint {ckpt}", file=sys.stderr)
        return None

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11; the project runs on 3.10)
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock however the run ends: a failed run in a process that goes on (search's trials, tests)
        must not keep its folder from being resumed."""
        if self._lock:  # False where locks are unsupported
            self._lock.close()
            self._lock = None


# A run holds an flock on OUTPUT.partial/lock while it writes there. The kernel drops it when the process dies, even by
# kill -9, so a lock left behind by a dead run never blocks --resume; a live one stops a second run from writing the
# same checkpoints (or --overwrite from deleting them). Where flock is unavailable (some network file systems), runs
# go unguarded as before.
def _take_lock(path: Path):
    """The open, locked file (kept open for the run), False where locks are unsupported, None if another holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:  # ENOLCK and the like: no locking here
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at `path` ("pid N on HOST"), or None when no live process does."""
    if not path.is_file():
        return None
    lock = _take_lock(path)
    if lock is None:
        return path.read_text().strip() or "a live run"
    if lock:
        lock.close()  # free: a run that died; its folder is an interrupted run's
    return None


class _CheckpointAtEnd(pl.Callback):
    """A checkpoint when fit ends. The timed ones may be minutes old, or absent from a short fit; a stop while the
    student is then scored, timed or saved used to throw the training away, and --resume started it over. From this
    one a resume finds fit done and goes on to scoring."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:  # a stop inside fit: the timed checkpoints are the ones to resume from
            return
        # with the optimizer's state, which a resume needs; unset, Lightning prints a line saying it chose this
        trainer.save_checkpoint(self.ckpt_dir / f"step{trainer.global_step:07d}-end.ckpt", weights_only=False)


class _ReleaseOnStop(pl.Callback):
    """Lightning closes the MLflow run (logger.finalize) right after the callbacks' on_exception: a Ctrl-C inside an
    MLflow query would otherwise have that close, and every later write, wait on the lock it left (release_frames)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            release_frames(exception)


class _FailOnDivergence(pl.Callback):
    """Fail a fit whose trained weights became NaN or inf, as the epoch it happened in is validated (before the
    score is logged, a search's pruner judges it, or the epoch's checkpoint is written) or ends. A learning rate too
    high diverged without a word: the NaN model was scored (an argmax over NaN logits is class 0, which looked like a
    score), saved as a finished output and its run marked FINISHED. One host sync an epoch."""

    def __init__(self) -> None:
        self._checked = -1  # the last epoch checked: its validation's start, else its end

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self._checked:
            return
        self._checked = trainer.current_epoch
        trained = [p for p in pl_module.parameters() if p.requires_grad]
        if trained and not torch.stack([torch.isfinite(p).all() for p in trained]).all():
            raise CompressError(f"training diverged in epoch {trainer.current_epoch + 1}: the trained weights hold "
                                "NaN or inf; try a lower --lr, with --overwrite to start over")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)


def build_trainer(
    *, epochs: int, accelerator: str, precision: str, devices, strategy: str, logger, ckpt_dir: Path | None,
    checkpoint_every: int = 0, checkpoint_minutes: float = 5.0, progress: bool = True, callbacks: list | None = None,
) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    callbacks = [*(callbacks or []), _ReleaseOnStop(), _FailOnDivergence()]
    if progress:
        # tqdm, not rich: rich draws nothing until the end when stderr is a log file or a CI console
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 20))
    if ckpt_dir is not None:
        # Two newest by step: if the kill lands while one is being written, the other is still whole.
        # By time unless steps are asked for: a save blocks training (1.5 s for a 6x768 student and its AdamW state
        # on this project's CPU box), which every 100 steps would cost a GPU at ~20 ms a step over 40% of its time.
        when = ({"every_n_train_steps": checkpoint_every} if checkpoint_every else
                {"train_time_interval": timedelta(minutes=checkpoint_minutes)})
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:07d}", monitor="step", mode="max", save_top_k=2,
            auto_insert_metric_name=False, save_on_train_epoch_end=True, **when,
        ))
        callbacks.append(_CheckpointAtEnd(ckpt_dir))
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return _trainer(epochs, accelerator, precision, devices, strategy, logger, callbacks, ckpt_dir, progress)
    except (ValueError, TypeError, MisconfigurationException) as error:  # Lightning's own word on a bad combination
        # (TypeError: device indices such as 0,1 with the CPU accelerator)
        raise CompressError(f"--accelerator {accelerator} --devices {devices} --strategy {strategy} "
                            f"--precision {precision}: {str(error).splitlines()[0]}") from None


def _trainer(epochs, accelerator, precision, devices, strategy, logger, callbacks, ckpt_dir, progress) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        precision=precision,
        devices=devices,
        strategy=strategy,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        use_distributed_sampler=False,  # our batch sampler shards by rank itself, so it can resume mid-epoch
    )


def score(model, datamodule, metric: str, num_labels: int, accelerator: str, precision: str) -> float:
    """The task metric of `model` on the dev split, through the same validation step training uses."""
    from compress.module import DistillModule

    module = DistillModule(model, num_labels=num_labels, metric=metric)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(result[0]["val_score"])


@torch.inference_mode()
def score_in_place(model, datamodule, metric: str, num_labels: int) -> float:
    """`score` for a model accelerate placed over devices: Lightning would move it, which it refuses (offloaded
    layers live on the meta device). Inputs go to its first layer's device; its hooks carry them on from there."""
    from compress.module import build_metric

    first = next(iter(model.hf_device_map.values()))
    device = torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)
    values = build_metric(metric, num_labels)
    model.eval()
    for batch in datamodule.val_dataloader():
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        values.update(model(**inputs).logits.argmax(dim=-1).cpu(), batch["labels"])
    return float(values.compute())


@contextmanager
def atomic_output(output: Path, overwrite: bool):
    """Yield a temporary folder beside `output`; rename it into place only if the block succeeds.

    The temporary and the replaced folders get fresh hidden names, so no folder of the user's that
    happens to be called OUTPUT.tmp or OUTPUT.old is ever deleted."""
    import uuid

    output = Path(os.path.normpath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp, whose 0700 would become the output's mode
    try:
        yield tmp
        share_like_open(*tmp.rglob("*.safetensors"))
        if output.exists() or output.is_symlink():
            if not overwrite or not output.is_dir():  # a file there is not an earlier model: never replace it
                raise CompressError(f"--output {output}: appeared while running; not replacing it")
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)  # a link is moved, not followed: what it pointed to stays
            tmp.rename(output)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, folder: Path) -> None:
    """HF layout: safetensors, tokenizer, and a config with id2label; loads without compress installed."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def write_lineage(folder: Path, lineage: dict) -> None:
    """compress.json: where the model came from and what it scored, for model cards and `--run` lookups."""
    (folder / "compress.json").write_text(json.dumps(lineage, indent=2, default=str))


def read_lineage(folder: str | Path) -> dict:
    path = Path(folder) / "compress.json"
    return json.loads(path.read_text()) if path.exists() else {}
