"""The training loader through Lightning: a new order every epoch, and a resume mid-epoch sees exactly the batches
an uninterrupted run would have seen next."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from compress.data.tasks import load_task
from compress.data.datamodule import ResumableBatchSampler, TaskDataModule
from compress.models.loading import load_classifier, load_tokenizer
from compress.engine.distill_module import DistillModule
from compress.engine.trainer import build_trainer
from compress.options.groups import RuntimeConfig, TrainingConfig


class Batches(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch["idx"].tolist()))


def _fit(teacher: Path, data: Path, ckpt_dir: Path, resume_from: str | None = None) -> list[tuple[int, list[int]]]:
    task = load_task(data=str(data))
    pl.seed_everything(0, verbose=False)
    model = load_classifier(str(teacher), task.label_names)
    module = DistillModule(model, None, num_labels=2, training=TrainingConfig(lr=1e-4))
    datamodule = TaskDataModule(task, load_tokenizer(str(teacher)), batch_size=16, seed=0)  # 96 rows: 6 a epoch
    record = Batches()
    trainer = build_trainer(epochs=3, accelerator="cpu", precision="32-true", logger=None, ckpt_dir=ckpt_dir,
                            runtime=RuntimeConfig(devices=1, checkpoint_every=8, progress=False), callbacks=[record])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    return record.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # resuming into another folder, on purpose
def test_each_epoch_draws_a_new_order_and_a_resume_in_epoch_1_continues_it(tiny_teacher: Path, tiny_data: Path,
                                                                          tmp_path: Path) -> None:
    full = _fit(tiny_teacher, tiny_data, tmp_path / "full")
    assert [epoch for epoch, _ in full] == [0] * 6 + [1] * 6 + [2] * 6
    orders = [[i for e, batch in full if e == epoch for i in batch] for epoch in range(3)]
    assert all(sorted(order) == list(range(96)) for order in orders)  # every row once an epoch
    assert orders[0] != orders[1] != orders[2] != orders[0]  # Lightning reached the sampler's set_epoch

    # step 8 is the 2nd batch of epoch 1 (the one-indexed filename counts steps done)
    resumed = _fit(tiny_teacher, tiny_data, tmp_path / "resumed", str(tmp_path / "full" / "step0000008.ckpt"))
    assert resumed == full[8:]


def test_the_sampler_shards_ranks_evenly_and_is_its_own_epoch_target() -> None:
    ranks = [ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.sampler.set_epoch(4)  # the attribute Lightning looks for
    batches = [list(s) for s in ranks]
    assert [len(b) for b in batches] == [len(s) for s in ranks] == [2, 2, 2]  # 4 rows each: 10 padded to 12
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1 + 4)).tolist()
    order += order[:2]
    assert [i for b in batches[0] for i in b] == order[0::3]
