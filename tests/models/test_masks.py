"""Masks that spare the GPU a host sync: the same outputs as transformers' own masks, and a training step that never
turns a tensor into a Python value (the CPU's view of a host sync)."""

import traceback

import lightning.pytorch as pl
import pytest
import torch
from torch.overrides import TorchFunctionMode

from compress.models import masks
from compress.data.tasks import load_task
from compress.data.datamodule import PadCollator, TaskDataModule
from compress.models.compress_bert.convert import from_bert
from compress.models.loading import ENCODER_TYPES, load_classifier, load_tokenizer, student_from_teacher
from compress.engine.distill_module import DistillModule
from compress.infra.tracking import make_logger
from compress.engine.trainer import build_trainer
from compress.options.groups import LossConfig, RuntimeConfig


class TensorToPython(TorchFunctionMode):
    """Records every tensor read back into Python (bool(t), t.item(), t.tolist(), int(t), float(t)), and every op
    whose output size depends on the values (nonzero, masked_select, unique, indexing with a boolean mask). On a GPU
    each is a host sync; on a CPU they are free but just as visible, so a CPU test can forbid them."""

    READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__",
             "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    @staticmethod
    def _boolean_index(func, args) -> bool:
        if getattr(func, "__name__", "") not in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            return False
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, (tuple, list)) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS or self._boolean_index(func, args):
            caller = traceback.extract_stack(limit=2)[0]
            # The CPU's AdamW reads its step counter, a CPU tensor on every device; a GPU run uses fused AdamW,
            # whose counter stays on the GPU. Not a sync either way.
            if "torch/optim/" not in caller.filename:
                self.reads.append(f"{func.__name__} at {caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def test_the_read_counter_sees_each_kind_of_read():
    x, keep = torch.arange(4.0), torch.tensor([True, False, True, True])
    with TensorToPython() as mode:
        bool(x.all()), x.sum().item(), x.tolist(), int(x[0]), float(x[1])
        x.nonzero(), x.masked_select(keep), x.unique(), x[keep]
        x[keep] = 0.0
        x[torch.tensor([0, 1])], x * 2  # integer indexing and arithmetic are not reads
    names = [r.split(" at ")[0] for r in mode.reads]
    assert names == ["__bool__", "item", "tolist", "__int__", "__float__", "nonzero", "masked_select", "unique",
                     "__getitem__", "__setitem__"]


class CountReads(pl.Callback):
    """Tensor reads over whole training steps in the middle of the first epoch: from the start of batch 1 to the
    start of the last batch, so every hook in between counts (forward, losses, backward, optimizer, Lightning's
    logging, the progress bar, the checkpoint timer, the next batch's loading)."""

    def __init__(self) -> None:
        self.mode: TensorToPython | None = None
        self.reads: list[str] = []
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch != 0:
            return
        if batch_idx == 1:
            self.mode = TensorToPython().__enter__()
        elif batch_idx == trainer.num_training_batches - 1:
            self.mode.__exit__(None, None, None)
            self.reads, self.steps = self.mode.reads, batch_idx - 1


class OnAGPU(DistillModule):
    """The module as it behaves on a GPU, where it shows no per-step loss (the progress bar would read it)."""

    def shows_step_loss(self) -> bool:
        return False


def batch_of(tokenizer, texts: list[str]) -> dict:
    rows = [{"input_ids": tokenizer(t)["input_ids"], "label": 0, "idx": i} for i, t in enumerate(texts)]
    return PadCollator(tokenizer.pad_token_id)(rows)


def test_the_collator_says_whether_it_padded():
    rows = [{"input_ids": [2, 7, 3], "label": 0, "idx": 0}, {"input_ids": [2, 5, 3], "label": 1, "idx": 1}]
    assert PadCollator(0)(rows)["padded"] is False
    assert PadCollator(0, multiple=8)(rows)["padded"] is True  # rounded up to 8: every row is padded
    rows[1]["input_ids"] = [2, 3]
    assert PadCollator(0)(rows)["padded"] is True


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_masks_give_transformers_own_outputs(tiny_teacher, attn, dtype):
    model = load_classifier(str(tiny_teacher), ["0", "1"], attn_implementation=attn).to(dtype)
    tokenizer = load_tokenizer(str(tiny_teacher))
    for texts in (["good film", "a truly bad and boring film"], ["good film", "bad film"]):
        batch = batch_of(tokenizer, texts)
        mask = masks.for_model(model, batch["attention_mask"], batch["padded"])
        if batch["padded"]:
            assert mask.shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
            assert mask.dtype == (torch.bool if attn == "sdpa" else dtype)
        else:
            assert mask is None
        kwargs = {"output_hidden_states": True, "output_attentions": attn == "eager"}
        with torch.no_grad():
            ours = model(input_ids=batch["input_ids"], attention_mask=mask, **kwargs)
            theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        assert torch.equal(ours.logits, theirs.logits)
        assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
        if attn == "eager":
            assert all(torch.equal(a, b) for a, b in zip(ours.attentions, theirs.attentions))


@pytest.mark.parametrize("model_type", sorted(ENCODER_TYPES - {"compress_bert"} | {"albert"}))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_supported_encoder_takes_the_prepared_mask_without_reading_it(model_type, attn):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    factorised = {"embedding_size": 16} if model_type in ("albert", "electra") else {}
    config = AutoConfig.for_model(model_type, vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                  num_labels=2, **factorised)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = mask[2, 3:] = 0
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        with TensorToPython() as mode:
            ours = model(input_ids=ids, attention_mask=masks.for_model(model, mask, True)).logits
    assert torch.equal(ours, theirs)
    assert mode.reads == []


def test_compress_bert_gets_its_2d_mask_or_none(tiny_teacher):
    model = from_bert(load_classifier(str(tiny_teacher), ["0", "1"])).eval()
    tokenizer = load_tokenizer(str(tiny_teacher))
    padded, full = batch_of(tokenizer, ["good film", "a bad film"]), batch_of(tokenizer, ["good film", "bad film"])
    assert masks.for_model(model, padded["attention_mask"], True) is padded["attention_mask"]
    assert masks.for_model(model, full["attention_mask"], False) is None
    with torch.no_grad():
        for probs in (False, True):  # SDPA, and the eager path that returns attention maps
            no_mask = model(input_ids=full["input_ids"], output_attentions=probs).logits
            ones = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"], output_attentions=probs)
            torch.testing.assert_close(no_mask, ones.logits, rtol=0, atol=1e-6)


def test_a_converted_roberta_counts_its_positions_without_reading():
    """RoBERTa's position ids come from the pad id in the batch: CompressBert computes them on the device."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("roberta", vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    roberta = AutoModelForSequenceClassification.from_config(config).eval()
    converted = from_bert(roberta).eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = mask[2, 3:] = 0
    ids[mask == 0] = config.pad_token_id
    with torch.no_grad():
        theirs = roberta(input_ids=ids, attention_mask=mask).logits
        with TensorToPython() as mode:
            ours = converted(input_ids=ids, attention_mask=masks.for_model(converted, mask, True)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert mode.reads == []


def fit_counting_reads(tiny_teacher, tiny_data, tmp_path, weights: LossConfig, pruned: bool, drop_flag: bool,
                       monkeypatch, precision: str = "32-true"):
    if drop_flag:  # the control: a batch that does not say whether it is padded, as before this change
        collate = PadCollator.__call__
        monkeypatch.setattr(PadCollator, "__call__", lambda self, rows: {
            k: v for k, v in collate(self, rows).items() if k != "padded"})
    task = load_task(data=str(tiny_data))
    attn = "eager" if weights.alpha_attn else None
    teacher = load_classifier(str(tiny_teacher), task.label_names, attn_implementation=attn)
    student = student_from_teacher(load_classifier(str(tiny_teacher), task.label_names, attn_implementation=attn),
                                   [0, 2])
    if pruned:
        student = from_bert(student)
    module = OnAGPU(student, teacher, num_labels=2, loss=weights)
    reads = CountReads()
    # The Trainer the commands build, with its progress bar, time-based checkpoints and MLflow logger
    logger = make_logger(f"sqlite:///{tmp_path / 'mlflow.db'}", "reads", "run", {})
    trainer = build_trainer(epochs=1, accelerator="cpu", precision=precision, runtime=RuntimeConfig(devices=1),
                            logger=logger, ckpt_dir=tmp_path / "ckpt", callbacks=[reads])
    data = TaskDataModule(task, load_tokenizer(str(tiny_teacher)), batch_size=4, seed=0)  # 24 steps: logs at 10, 20
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if reads.mode is not None and not reads.steps:  # fit failed inside the window: leave no mode behind
            reads.mode.__exit__(None, None, None)
    return reads


@pytest.mark.parametrize("weights,pruned,precision", [
    (LossConfig(alpha_hidden=0.0), False, "32-true"),
    (LossConfig(), False, "32-true"),
    (LossConfig(alpha_attn=1.0), False, "32-true"),
    (LossConfig(), True, "32-true"),
    (LossConfig(alpha_attn=1.0), False, "bf16-mixed"),  # the GPU's precision: bf16 teacher, autocast student
], ids=["logits", "hidden", "attention", "compress_bert-student", "bf16-mixed"])
def test_a_training_step_reads_no_tensor_back(tiny_teacher, tiny_data, tmp_path, weights, pruned, precision,
                                              monkeypatch):
    reads = fit_counting_reads(tiny_teacher, tiny_data, tmp_path, weights, pruned, drop_flag=False,
                               monkeypatch=monkeypatch, precision=precision)
    assert reads.steps == 22  # 96 rows / 4 = 24 steps; the first and last are outside the window
    assert reads.reads == []


def test_without_the_collators_flag_transformers_reads_the_mask_each_forward(tiny_teacher, tiny_data, tmp_path,
                                                                             monkeypatch):
    reads = fit_counting_reads(tiny_teacher, tiny_data, tmp_path, LossConfig(alpha_hidden=0.0), False, drop_flag=True,
                               monkeypatch=monkeypatch)
    # one `padding_mask.all()` per forward pass: the student's and the teacher's
    assert len(reads.reads) == 2 * reads.steps
    assert all("masking_utils" in r for r in reads.reads)
