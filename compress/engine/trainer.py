"""The Lightning Trainer a run uses: accelerator and precision, checkpoint callbacks, quiet library logs."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
import lightning.pytorch as pl
import torch

from compress.infra.errors import CompressError
from compress.options.groups import RuntimeConfig
from compress.options.bounds import check_choice
from compress.infra.signals import raise_dropped_ctrl_c, release_frames


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


class _CheckpointAtEnd(pl.Callback):
    """A checkpoint when fit ends. The timed ones may be minutes old, or absent from a short fit, so without this one
    a stop while the student is then scored, timed or saved would throw the training away. From it a resume finds fit
    done and goes on to scoring."""

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


def build_trainer(*, epochs: int, accelerator: str, precision: str, runtime: RuntimeConfig | None = None, logger,
                  ckpt_dir: Path | None, callbacks: list | None = None) -> pl.Trainer:
    """A Trainer on the resolved `accelerator` and `precision`, with `runtime`'s devices, strategy, checkpointing
    and progress bar."""
    runtime = runtime or RuntimeConfig()
    devices, strategy, progress = runtime.devices, runtime.strategy, runtime.progress
    checkpoint_every, checkpoint_minutes = runtime.checkpoint_every, runtime.checkpoint_minutes
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    callbacks = [*(callbacks or []), _ReleaseOnStop(), _FailOnDivergence()]
    if progress:
        # tqdm, not rich: rich draws nothing until the end when stderr is a log file or a CI console
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 20))
    if ckpt_dir is not None:
        # Two newest by step: if the kill lands while one is being written, the other is still whole.
        # By time unless steps are asked for: a save blocks training for the whole write of the student and its AdamW
        # state (seconds for a 6x768 student), which every 100 steps would cost a fast GPU much of its time.
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
