"""The GPU-speed switches, checked on a CPU: teacher-logit caching is exact, and bf16/fused are off here."""

import lightning.pytorch as pl
import pytest
import torch

from compress.data import load_task
from compress.datamodule import TaskDataModule
from compress.models import load_classifier, load_tokenizer, student_from_teacher
from compress.module import DistillModule, LossWeights
from compress.training import resolve_precision


class StepLosses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train(tiny_teacher, tiny_data, cache: bool, epochs: int = 3):
    task = load_task(data=str(tiny_data))
    teacher = load_classifier(str(tiny_teacher), task.label_names)
    pl.seed_everything(0, verbose=False)
    student = student_from_teacher(teacher, [0, 2])
    module = DistillModule(student, teacher, num_labels=2, weights=LossWeights(kd=1.0, ce=0.5, hidden=0.0),
                           lr=1e-3, cache_teacher=cache)
    dm = TaskDataModule(task, load_tokenizer(str(tiny_teacher)), batch_size=16, seed=0)
    record = StepLosses()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                         use_distributed_sampler=False, num_sanity_val_steps=0)
    calls = {"n": 0}
    hook = teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer.fit(module, datamodule=dm)
    hook.remove()
    return record.losses, calls["n"], module, trainer


def test_cached_teacher_gives_the_same_losses_and_skips_the_teacher(tiny_teacher, tiny_data):
    live, live_calls, _, _ = train(tiny_teacher, tiny_data, cache=False)
    cached, cached_calls, module, trainer = train(tiny_teacher, tiny_data, cache=True)
    assert len(live) == len(cached) == 3 * 6  # 96 rows / 16 per batch, 3 epochs
    assert cached == pytest.approx(live, abs=1e-6)
    steps_per_epoch, val_batches_per_epoch = 6, 1
    # live: the teacher runs every training step (it never runs in validation); cached: only in epoch 1
    assert live_calls == 3 * steps_per_epoch
    assert cached_calls == steps_per_epoch
    assert module._cache_ready and module._cache.shape == (96, 2)
    assert val_batches_per_epoch == trainer.num_val_batches[0]


def test_cache_refuses_hidden_losses(tiny_teacher):
    teacher = load_classifier(str(tiny_teacher), ["0", "1"])
    with pytest.raises(ValueError, match="logits only"):
        DistillModule(student_from_teacher(teacher, [0]), teacher, num_labels=2,
                      weights=LossWeights(hidden=1.0), cache_teacher=True)


def test_gpu_switches_are_off_on_cpu(tiny_teacher, tiny_data):
    assert resolve_precision("auto", "cpu") == "32-true"
    _, _, module, trainer = train(tiny_teacher, tiny_data, cache=False, epochs=1)
    assert module.teacher.dtype == torch.float32  # the bf16 teacher cast only happens on CUDA
    assert trainer.optimizers[0].defaults["fused"] is False
    dm = trainer.datamodule
    assert dm.num_workers == 0 and trainer.train_dataloader.pin_memory is False
