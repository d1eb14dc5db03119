"""Soft-only rows (distill's --unlabeled): no cross-entropy on them, mixed into every epoch with the labelled rows, and
the teacher-logit cache covers them, so the teacher scores each once per key."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_rows

from compress import losses
from compress.data.datamodule import PadCollator, TaskDataModule
from compress.data.tasks import load_task
from compress.engine import logit_cache
from compress.engine.distill_module import DistillModule
from compress.models.loading import load_classifier, load_tokenizer, student_from_teacher
from compress.options.groups import LossConfig, TrainingConfig

SOFT = [(text,) for text, _ in make_rows(40, seed=9)]  # 96 labelled + 40 soft rows: 136, 9 batches of 16


def module_and_data(teacher: Path, data: Path, cache_file: Path | None = None, soft=SOFT):
    task = load_task(data=str(data)).with_soft_texts(soft)
    big = load_classifier(str(teacher), task.label_names)
    pl.seed_everything(0, verbose=False)
    student = student_from_teacher(big, [0, 2])
    loss = LossConfig(alpha_kd=1.0, alpha_ce=0.5, alpha_hidden=0.0, cache_teacher=cache_file is not None)
    module = DistillModule(student, big, num_labels=2, loss=loss, training=TrainingConfig(lr=1e-3),
                           cache_file=cache_file)
    return module, TaskDataModule(task, load_tokenizer(str(teacher)), batch_size=16, seed=0), task


def test_soft_rows_carry_no_cross_entropy(tiny_teacher: Path, tiny_data: Path) -> None:
    module, dm, _ = module_and_data(tiny_teacher, tiny_data)
    dm.setup()
    rows = dm.train_rows[90:100]  # six labelled rows, then four soft ones
    batch = PadCollator(dm.tokenizer.pad_token_id)(rows)
    assert batch["labelled"].tolist() == [True] * 6 + [False] * 4 and batch["idx"].tolist() == list(range(90, 100))
    module.eval()
    with torch.no_grad():
        terms = module.compute_losses(batch)
        wrong = dict(batch, labels=torch.where(batch["labelled"], batch["labels"], 1 - batch["labels"]))
        assert module.compute_losses(wrong)["loss"].item() == terms["loss"].item()  # their labels are never read
        flipped = batch["labels"].clone()
        flipped[0] = 1 - flipped[0]
        assert module.compute_losses(dict(batch, labels=flipped))["loss"].item() != terms["loss"].item()
        # ce: the six labelled rows' mean; kd: every row's, the soft ones too
        logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"]).logits
        t_logits = module.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  token_type_ids=batch["token_type_ids"]).logits
    assert terms["ce"].item() == pytest.approx(losses.hard_label_ce(logits[:6], batch["labels"][:6]).item(), abs=1e-6)
    assert terms["kd"].item() == pytest.approx(losses.soft_target_kl(logits, t_logits, 2.0).item(), abs=1e-6)


def test_a_batch_of_labelled_rows_has_no_mask() -> None:
    collate = PadCollator(0)
    assert "labelled" not in collate([{"input_ids": [1, 2], "label": 1, "idx": 0}])
    assert collate([{"input_ids": [1], "label": 0, "idx": 1, "labelled": False}])["labelled"].tolist() == [False]


class Seen(pl.Callback):
    def __init__(self) -> None:
        self.idx: list[list[int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.idx.append(batch["idx"].tolist())


def fit(module, dm, epochs: int = 2) -> tuple[int, Seen]:
    seen = Seen()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[seen],
                         use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    calls = {"n": 0}
    hook = module.teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer.fit(module, datamodule=dm)
    hook.remove()
    return calls["n"], seen


def test_soft_rows_are_in_every_epoch_and_the_cache_scores_each_once(tiny_teacher: Path, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "logits" / "key.safetensors"
    module, dm, _ = module_and_data(tiny_teacher, tiny_data, path)
    calls, seen = fit(module, dm)
    assert len(seen.idx) == 2 * 9
    for epoch in (seen.idx[:9], seen.idx[9:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(136))  # every row, soft ones too, each epoch
    assert calls == 9  # epoch 1 only: one teacher pass per batch, each row scored once
    stored = logit_cache.load(path, 136, 2)
    assert stored is not None and torch.equal(stored, module._cache.cpu())

    again, _, _ = module_and_data(tiny_teacher, tiny_data, path)
    calls, _ = fit(again, TaskDataModule(dm.task, dm.tokenizer, batch_size=16, seed=0), epochs=1)
    assert calls == 0  # a cache hit: the teacher never runs, for the labelled rows or the soft ones


def test_the_cache_key_covers_the_soft_rows(tiny_teacher: Path, tiny_data: Path) -> None:
    task = load_task(data=str(tiny_data))
    tok = load_tokenizer(str(tiny_teacher))

    def key(t) -> str:
        return logit_cache.cache_key(str(tiny_teacher), t, tok, 128, "fp32")

    assert key(task) != key(task.with_soft_texts(SOFT)) != key(task.with_soft_texts(SOFT[:-1]))
    assert key(task.with_soft_texts(SOFT)) == key(load_task(data=str(tiny_data)).with_soft_texts(SOFT))
    assert task.with_soft_texts([]).soft_texts == [] and task.soft_texts == []
