"""--unlabeled's file: a .txt or a .tsv/.csv/.jsonl with the text column, dev texts dropped and counted, and one line
for a file that cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.data.tasks import load_task
from compress.data.unlabeled import read_unlabeled
from compress.infra.errors import CompressError


@pytest.fixture
def task(tmp_path: Path):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nthe plot was dull\t0\nGreat acting\t1\n")
    return load_task(data=str(folder))


def test_a_txt_is_one_text_a_line_and_dev_texts_are_dropped_and_counted(task, tmp_path: Path) -> None:
    # a dev text comes back with other spacing and case: the same text to an uncased model, so it is dropped too
    path = tmp_path / "more.txt"
    path.write_text("a lovely story\n\n  the plot  WAS dull \nsuperb\ngreat acting\r\n")
    got = read_unlabeled(str(path), task)
    assert got.texts == [("a lovely story",), ("superb",)]
    assert (got.read, got.dev_duplicates, got.quoting) == (5 - 1, 2, "")  # the blank line is no text
    assert got.ratio(len(task.train_labels)) == 1.0


@pytest.mark.parametrize("name", ["more.tsv", "more.csv", "more.jsonl"])
def test_a_table_gives_its_text_column_and_ignores_a_label_column(task, tmp_path: Path, name: str) -> None:
    texts = ['said "hi" twice', "a lovely story", "the plot was dull"]
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    else:
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if name.endswith(".tsv") else ",", lineterminator="\n")
        writer.writerows([["text", "label"], *[[t, "whatever"] for t in texts]])
        path.write_text(out.getvalue())  # csv-quoted, as pandas and the csv module write: read back as written
    got = read_unlabeled(str(path), task)
    assert got.texts == [('said "hi" twice',), ("a lovely story",)]
    assert got.dev_duplicates == 1
    assert got.quoting == ("" if name.endswith(".jsonl") else "csv")


def test_the_text_column_flag_names_the_column(task, tmp_path: Path) -> None:
    path = tmp_path / "more.jsonl"
    path.write_text(json.dumps({"body": "a lovely story", "text": "not this"}) + "\n")
    assert read_unlabeled(str(path), task, text_column="body").texts == [("a lovely story",)]


def test_pairs_take_both_columns(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text(f"sentence1\tsentence2\tlabel\na {split}\tb\t0\nc\td {split}\t1\n")
    pairs = load_task(data=str(folder))
    (tmp_path / "more.tsv").write_text("sentence1\tsentence2\nx\ty\na dev\tb\n")
    got = read_unlabeled(str(tmp_path / "more.tsv"), pairs)
    assert got.texts == [("x", "y")] and got.dev_duplicates == 1
    (tmp_path / "more.txt").write_text("x\n")
    with pytest.raises(CompressError, match=r"^--unlabeled: .*more.txt is a .txt, one text a line, but pairs takes "
                                            r"pairs of texts"):
        read_unlabeled(str(tmp_path / "more.txt"), pairs)


@pytest.mark.parametrize(("name", "content", "says"), [
    ("missing.txt", None, "missing.txt does not exist"),
    ("empty.txt", "", "empty.txt is empty"),
    ("blank.txt", "\n  \n\n", "blank.txt is empty"),
    ("header.tsv", "text\n", "header.tsv has a header line but no rows"),
    ("cols.tsv", "body\nx\n", "cols.tsv has no text column (columns: body)"),
    ("dev.txt", "the plot was dull\nGreat acting\n", "every one of the 2 texts in"),
    ("texts.md", "x\n", "texts.md: expected a .txt, .tsv, .csv or .jsonl file"),
])
def test_a_file_that_cannot_serve_is_one_line(task, tmp_path: Path, name: str, content: str | None, says: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CompressError) as info:
        read_unlabeled(str(tmp_path / name), task)
    message = str(info.value)
    assert message.startswith("--unlabeled: ") and says in message and "\n" not in message, message
