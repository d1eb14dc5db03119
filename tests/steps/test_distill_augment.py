"""compress distill --augment N end to end: the copies train beside the labelled rows with no label (no cross-entropy),
through the teacher's embeddings or --augment_model's masked LM, and a second run reads them from the cache; what
cannot be done is one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import FAST, callbacks_for_runs, error_lines, mlflow_runs, run_main, save_tiny_bert, sqlite_uri, track


class Rows(pl.Callback):
    """Labelled and soft-only rows each training epoch saw."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epochs.append((0, 0))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        soft = int((~batch["labelled"]).sum()) if "labelled" in batch else 0
        labelled, seen = self.epochs[-1]
        self.epochs[-1] = (labelled + len(batch["idx"]) - soft, seen + soft)


def test_augmented_copies_train_without_labels_and_are_cached(tiny_teacher: Path, tiny_data: Path,
                                                              workdir: Path) -> None:
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--layers", "2", "--epochs", "2",
            "--augment", "2", "--teacher_cache", workdir / "cache", *track(workdir), *FAST]
    rows = Rows()
    with callbacks_for_runs(rows):
        code, _, err = run_main([*args, "--output", workdir / "a"])
    assert code == 0, err[-3000:]
    _, runs = mlflow_runs(sqlite_uri(workdir))
    params = runs[0].data.params
    made, dropped = int(params["augment_rows"]), int(params["augment_dropped"])
    assert made + dropped == 2 * 96 and made > 150 and params["augment"] == "2"
    # every epoch: the 96 labelled rows, and every copy as a soft-only row (labelled False: no cross-entropy)
    assert rows.epochs == [(96, made)] * 2
    (file,) = (workdir / "cache" / "augment").iterdir()
    assert (f"augment: {made} copies of 96 training texts by the teacher's word-embedding neighbours ({dropped} "
            f"unchanged, repeated or dev texts dropped; stored in {file})") in err

    code, _, err = run_main([*args, "--output", workdir / "b"])
    assert code == 0, err[-3000:]
    assert f"read from {file})" in err and "making" not in err


def test_augment_model_proposes_the_words(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    import torch
    from transformers import AutoConfig, BertForMaskedLM

    mlm = save_tiny_bert(workdir / "mlm", head=False)
    torch.manual_seed(0)
    BertForMaskedLM(AutoConfig.from_pretrained(mlm)).save_pretrained(mlm)
    code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--layers", "2", "--epochs",
                             "1", "--augment", "1", "--augment_model", mlm, "--output", workdir / "out",
                             "--teacher_cache", workdir / "cache", *track(workdir), *FAST])
    assert code == 0, err[-3000:]
    assert f"training texts by masked LM {mlm} (" in err
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert runs[0].data.params["augment_model"] == str(mlm) and int(runs[0].data.params["augment_rows"]) > 80


def _gpt2(root: Path) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=4).save_pretrained(root / "gpt2")
    return root / "gpt2"


@pytest.mark.parametrize(("case", "wanted"), [
    ("negative", "--augment -1: must be at least 0"),
    ("model-without-count", "--augment_model"),
    ("model-not-a-masked-lm", "--augment_model: model type 'gpt2' has no masked-LM head"),
    ("no-teacher-loss", "--augment 2: those texts learn from the teacher alone, and every teacher loss is off"),
])
def test_what_cannot_augment_is_one_line_and_writes_nothing(case: str, wanted: str, tiny_teacher: Path,
                                                            tiny_data: Path, workdir: Path) -> None:
    args = {"negative": ["--augment", "-1"], "model-without-count": ["--augment_model", tiny_teacher],
            "model-not-a-masked-lm": ["--augment", "2", "--augment_model", _gpt2(workdir)],
            "no-teacher-loss": ["--augment", "2", "--alpha_kd", "0", "--alpha_hidden", "0"]}[case]
    before = sorted(p.name for p in workdir.iterdir())
    code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, *args, "--output",
                             workdir / "out", *track(workdir), *FAST])
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert wanted in line, line
    assert sorted(p.name for p in workdir.iterdir()) == before
