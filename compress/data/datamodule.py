"""Tokenized task data as a LightningDataModule, with a train loader that resumes mid-epoch.

The train order is a pure function of (seed, epoch), and the loader tells Lightning how many batches of the
current epoch were already trained on, so a run killed mid-epoch restarts at the next unseen batch rather
than replaying or skipping data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from compress.data.tasks import TaskData


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled batches of indices, reproducible from (seed, epoch), sharded across DDP ranks.

    Lightning calls `set_epoch` (through `.sampler`); `skip_to(epoch, n)` drops the first n batches of that epoch once.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> ResumableBatchSampler:
        """Lightning calls set_epoch on `loader.sampler` and `loader.batch_sampler.sampler`, never on a batch sampler
        itself: without this every epoch drew epoch 0's order, and a resume after epoch 0 skipped nothing."""
        return self

    def skip_to(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches)

    def _rank_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = -(-self.size // self.world_size)  # ceil
        order += order[: per_rank * self.world_size - self.size]  # equal shards keep DDP ranks in step
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._rank_indices()
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        yield from batches[start:]

    def __len__(self) -> int:
        per_rank = (self.size + self.world_size - 1) // self.world_size  # ceil: ranks pad to equal shares
        return (per_rank + self.batch_size - 1) // self.batch_size


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (it has state_dict/load_state_dict, see `_Stateful`)."""

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, processed = self._progress()
        return {"epoch": epoch, "batches_done": processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.skip_to(state["epoch"], state["batches_done"])


class PadCollator:
    """Pads a list of tokenized rows to the longest in the batch (dynamic padding: short batches run fast).

    `multiple` rounds the width up (8 on a GPU: tensor-core friendly shapes, and fewer distinct shapes to compile).
    Rows that also carry the teacher's own encoding (`teacher_input_ids`, when its tokenizer is not the student's) get
    it padded with `teacher_pad_id`, under the same names with the teacher_ prefix.
    """

    def __init__(self, pad_id: int, multiple: int = 1, teacher_pad_id: int = 0) -> None:
        self.pad_id, self.multiple, self.teacher_pad_id = pad_id, multiple, teacher_pad_id

    def _pad(self, rows: list[dict], prefix: str, pad_id: int, batch: dict) -> None:
        lengths = [len(r[f"{prefix}input_ids"]) for r in rows]
        width = -(-max(lengths) // self.multiple) * self.multiple
        for key, fill in ((f"{prefix}input_ids", pad_id), (f"{prefix}token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
        batch[f"{prefix}attention_mask"] = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        # Known here for free; on a GPU, transformers would ask the mask itself, a host sync (compress.masks)
        batch[f"{prefix}padded"] = min(lengths) < width

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | bool]:
        batch: dict[str, torch.Tensor | bool] = {}
        self._pad(rows, "", self.pad_id, batch)
        if "teacher_input_ids" in rows[0]:
            self._pad(rows, "teacher_", self.teacher_pad_id, batch)
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        labelled = [r.get("labelled", True) for r in rows]
        if not all(labelled):  # a soft-only row's label (unlabelled text, an augmented copy) is a placeholder no loss
            # reads; a batch of labelled rows goes without the mask, and trains exactly as it did before there was one
            batch["labelled"] = torch.tensor(labelled)
        batch["idx"] = torch.tensor([r["idx"] for r in rows])  # row ids: the key for cached teacher outputs
        return batch


def tokenize(tokenizer, texts: list[tuple[str, ...]], labels: list[int] | None, max_length: int,
             start: int = 0) -> list[dict]:
    """One dict a row: its token ids, label and row id (`start` + its index: the teacher-logit cache's key).
    labels=None: soft-only rows, marked unlabelled, with the placeholder label 0."""
    marks = {"labelled": False} if labels is None else {}
    return [{**ids, "label": 0 if labels is None else labels[i], "idx": start + i, **marks}
            for i, ids in enumerate(encode(tokenizer, texts, max_length))]


def encode(tokenizer, texts: list[tuple[str, ...]], max_length: int) -> list[dict]:
    """Each text's input_ids (and token_type_ids, where the tokenizer makes them)."""
    if not texts:
        return []
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if len(texts[0]) > 1 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


class TaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        task: TaskData,
        tokenizer,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        teacher_tokenizer=None,
    ) -> None:
        """`teacher_tokenizer`: the teacher's, where it is not the student's; training rows then carry both
        encodings."""
        super().__init__()
        self.task, self.tokenizer, self.teacher_tokenizer = task, tokenizer, teacher_tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.num_workers, self.seed = max_length, num_workers, seed
        self.train_rows: list[dict] | None = None
        self.dev_rows: list[dict] | None = None
        self._sampler: ResumableBatchSampler | None = None
        self._resume_at: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:  # tokenize once, even when Lightning calls setup for fit and validate
            labelled = tokenize(self.tokenizer, self.task.train_texts, self.task.train_labels, self.max_length)
            # soft-only rows after the labelled ones, drawn into the same shuffled epochs
            soft = tokenize(self.tokenizer, self.task.soft_texts, None, self.max_length, start=len(labelled))
            self.train_rows = labelled + soft
            if self.teacher_tokenizer is not None:
                # each model reads the text through its own tokenizer; logits need no alignment between the two
                texts = self.task.train_texts + self.task.soft_texts
                for row, ids in zip(self.train_rows, encode(self.teacher_tokenizer, texts, self.max_length)):
                    row.update({f"teacher_{k}": v for k, v in ids.items()})
            self.dev_rows = tokenize(self.tokenizer, self.task.dev_texts, self.task.dev_labels, self.max_length)

    def _loader_kwargs(self) -> dict:
        # pinned host memory lets the copy to a GPU overlap compute; workers keep tokenized padding off the hot path
        return dict(
            collate_fn=PadCollator(self.tokenizer.pad_token_id or 0, 8 if torch.cuda.is_available() else 1,
                                   getattr(self.teacher_tokenizer, "pad_token_id", None) or 0),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _progress(self) -> tuple[int, int]:
        # `processed` counts batches whose optimizer step is done; a checkpoint written in on_train_batch_end
        # already includes the current batch there, while `completed` would not yet.
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    # Lightning hands the loader its checkpointed state only if the train loader does not exist yet, but
    # `estimated_stepping_batches` in configure_optimizers builds it before the restore (Lightning #20550), so the
    # position is dropped and a resumed epoch restarts at batch 0. The datamodule's own state is restored before
    # that, so it carries the position as well.
    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {}
        epoch, processed = self._progress()
        return {"epoch": epoch, "batches_done": processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "batches_done" not in state:
            return
        if self._sampler is not None:  # the loader already exists: skip on its (not yet started) iterator
            self._sampler.skip_to(state["epoch"], state["batches_done"])
        else:
            self._resume_at = (state["epoch"], state["batches_done"])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ResumableBatchSampler(len(self.train_rows), self.batch_size, self.seed, rank, world)
        if self._resume_at is not None:
            sampler.skip_to(*self._resume_at)
        self._sampler, self._resume_at = sampler, None
        return ResumableLoader(self.train_rows, batch_sampler=sampler, progress=self._progress, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.dev_rows, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())
