"""compress distill --unlabeled end to end: its rows train beside the labelled ones, their count, ratio and dropped dev
texts are logged, --cache_teacher covers them, and a file that cannot serve is one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST, cli_error, make_rows, mlflow_runs, run_main, sqlite_uri, track


def write_unlabeled(folder: Path, data: Path) -> Path:
    # 60 new texts, and two dev texts that must not come back as training rows
    dev = [line.split("\t")[0] for line in (data / "dev.tsv").read_text().splitlines()[1:3]]
    texts = [text for text, _ in make_rows(60, seed=5) if text not in dev]
    path = folder / "more.txt"
    path.write_text("\n".join([*texts, *dev]) + "\n")
    return path


def test_distill_with_unlabeled_text_logs_its_rows_and_caches_their_logits(tiny_teacher: Path, tiny_data: Path,
                                                                          workdir: Path) -> None:
    more = write_unlabeled(workdir, tiny_data)
    kept = len(more.read_text().splitlines()) - 2
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--layers", "2", "--epochs", "1",
            "--unlabeled", more, "--cache_teacher", "--alpha_hidden", "0", "--teacher_cache", workdir / "cache",
            *track(workdir), *FAST]
    code, _, err = run_main([*args, "--output", workdir / "a"])
    assert code == 0, err[-3000:]
    assert f"unlabeled: {kept} texts from {more} (2 dev texts dropped), {kept / 96:.2f} per labelled row" in err
    assert "teacher logits cached in" in err
    _, runs = mlflow_runs(sqlite_uri(workdir))
    params = runs[0].data.params
    assert params["unlabeled_rows"] == str(kept) and params["unlabeled_dev_duplicates"] == "2"
    assert float(params["unlabeled_ratio"]) == pytest.approx(kept / 96, abs=1e-4)
    assert params["train_rows"] == "96"  # the labelled rows; the teacher was not fine-tuned on the others

    (logits,) = (workdir / "cache" / "logits").iterdir()
    code, _, err = run_main([*args, "--output", workdir / "b"])  # another student, the same teacher and rows
    assert code == 0, err[-3000:]
    assert f"teacher logits: read from {logits}; the teacher is not run" in err
    assert list((workdir / "cache" / "logits").iterdir()) == [logits]


@pytest.mark.parametrize(("content", "says"), [
    (None, "--unlabeled: {path} does not exist"),
    ("", "--unlabeled: {path} is empty"),
])
def test_a_missing_or_empty_unlabeled_file_is_one_line_and_writes_nothing(tiny_teacher: Path, tiny_data: Path,
                                                                          workdir: Path, capsys, content, says):
    path = workdir / "more.txt"
    if content is not None:
        path.write_text(content)
    line = cli_error(capsys, "distill", "--teacher", tiny_teacher, "--data", tiny_data, "--unlabeled", path,
                     "--output", workdir / "out", *track(workdir))
    assert line.startswith(f"compress: error: {says.format(path=path)}"), line
    assert sorted(p.name for p in workdir.iterdir()) == (["more.txt"] if content is not None else [])


def test_unlabeled_text_with_every_teacher_loss_off_is_refused(tiny_teacher: Path, tiny_data: Path, workdir: Path,
                                                               capsys) -> None:
    more = write_unlabeled(workdir, tiny_data)
    line = cli_error(capsys, "distill", "--teacher", tiny_teacher, "--data", tiny_data, "--unlabeled", more,
                     "--alpha_kd", "0", "--alpha_hidden", "0", "--output", workdir / "out", *track(workdir))
    assert f"--unlabeled {more}: those texts learn from the teacher alone, and every teacher loss is off" in line
    assert sorted(p.name for p in workdir.iterdir()) == ["more.txt"]
