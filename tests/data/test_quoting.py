"""--quoting: a .tsv written with csv quoting (pandas, Python's csv module) and a raw one (GLUE's) both read back as the
texts that were written, whichever convention detect_quoting finds, and the run's params say which one was used."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from helpers import ROOT, cli_error

from compress.data.tasks import detect_quoting, load_task
from compress.infra.errors import CompressError

SST2 = ROOT / ".." / "shared" / "data" / "sst2"

# Every place a quote can sit in a sentence, none with a tab
TEXTS = ['he said "hi" to me', '"quoted" at the start', "no quote at all", 'ends in a "quote"', '"all of it"',
         'a lone " mark', '""', "it's fine"]
DEV = ['"great" film', "awful"]


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8", newline="")


def pandas_tsv(texts: list[str]) -> str:
    import pandas as pd

    return pd.DataFrame({"sentence": texts, "label": [i % 2 for i in range(len(texts))]}).to_csv(sep="\t", index=False)


def csv_module_tsv(texts: list[str], quoting: int = csv.QUOTE_MINIMAL) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=quoting)  # "\r\n" line ends, as the module writes by default
    writer.writerow(["sentence", "label"])
    writer.writerows([text, i % 2] for i, text in enumerate(texts))
    return out.getvalue()


def raw_tsv(texts: list[str]) -> str:
    return "sentence\tlabel\n" + "".join(f"{text}\t{i % 2}\n" for i, text in enumerate(texts))


@pytest.mark.parametrize(("writer", "used"), [(pandas_tsv, "csv"), (csv_module_tsv, "csv"), (raw_tsv, "none")])
def test_each_convention_reads_back_the_texts_written(tmp_path: Path, writer, used: str) -> None:
    folder = tmp_path / "data"
    write(folder, "train.tsv", writer(TEXTS))
    write(folder, "dev.tsv", writer(DEV))
    task = load_task(data=str(folder))
    assert task.train_texts == [(text,) for text in TEXTS]
    assert task.train_labels == [i % 2 for i in range(len(TEXTS))]
    assert task.dev_texts == [(text,) for text in DEV]
    assert task.flags["quoting"] == used


def test_a_glue_style_tsv_whose_sentence_begins_with_a_quote(tmp_path: Path) -> None:
    folder = tmp_path / "glue"
    write(folder, "train.tsv", 'sentence\tlabel\n" the film " is a gem \t1\n"dull\t0\nfine \t1\n')
    write(folder, "dev.tsv", "sentence\tlabel\nok\t1\n")
    task = load_task(data=str(folder))
    assert task.train_texts == [('" the film " is a gem ',), ('"dull',), ("fine ",)]
    assert task.flags["quoting"] == "none"


def test_a_csv_quoted_text_holding_a_line_break(tmp_path: Path) -> None:
    """A line break inside a quoted field: the raw reading would split the row, so only csv explains the file."""
    folder = tmp_path / "data"
    write(folder, "train.tsv", pandas_tsv(["two\nlines", "one line", "third"]))
    write(folder, "dev.tsv", "sentence\tlabel\nok\t1\n")
    task = load_task(data=str(folder))
    assert task.train_texts == [("two\nlines",), ("one line",), ("third",)]
    assert task.flags["quoting"] == "csv"  # dev has no quote: it reads alike either way and takes train's word


@pytest.mark.parametrize(("text", "found"), [
    ("sentence\tlabel\nno quotes here\t1\n", None),  # nothing to tell: both conventions read it alike
    (pandas_tsv(['say "hi"']), "csv"),  # a doubled quote inside a wrapped field
    (csv_module_tsv(["plain", "words"], csv.QUOTE_ALL), "csv"),  # every field wrapped, the header too
    (csv_module_tsv(["plain", 'x "y"'], csv.QUOTE_NONNUMERIC), "csv"),
    (pandas_tsv(["a\tb", "c"]), "csv"),  # a tab inside a quoted field: the raw reading has a row too many fields
    ('sentence\tlabel\n"a whole sentence in quotes"\t1\n', "none"),  # GLUE's: csv writers would not wrap it
    ('sentence\tlabel\nsay "hi" now\t1\n', "none"),  # a quote inside an unwrapped field
    ('sentence\tlabel\n"hi" she said\t1\n', "none"),  # a wrapped part glued to more text
    ('sentence\tlabel\n"say ""hi"""\t1\nsay "hi"\t0\n', "none"),  # mixed: one raw quote makes the file raw
    ('sentence\tlabel\n"open\t1\nclose"\t0\n', "none"),  # quotes pairing across rows of a table that reads raw
])
def test_detection(text: str, found: str | None) -> None:
    assert detect_quoting(text) == found


@pytest.mark.parametrize(("quoting", "texts"), [
    ("csv", [("a whole sentence in quotes",)]),  # told csv: the wrapping goes
    ("none", [('"a whole sentence in quotes"',)]),
    ("auto", [('"a whole sentence in quotes"',)]),
])
def test_the_flag_overrides_detection(tmp_path: Path, quoting: str, texts: list) -> None:
    folder = tmp_path / "data"
    write(folder, "train.tsv", 'sentence\tlabel\n"a whole sentence in quotes"\t1\n"b"\t0\n')
    write(folder, "dev.tsv", "sentence\tlabel\nok\t1\n")
    task = load_task(data=str(folder), quoting=quoting)
    assert task.train_texts[:1] == texts
    assert task.flags["quoting"] == ("csv" if quoting == "csv" else "none")


def test_a_csv_file_is_csv_quoted_unless_told_otherwise(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write(folder, "train.csv", 'text,label\n"say ""hi""",1\nbye,0\n')
    write(folder, "dev.csv", "text,label\nok,1\n")
    assert load_task(data=str(folder)).train_texts[0] == ('say "hi"',)
    assert load_task(data=str(folder), quoting="none").train_texts[0] == ('"say ""hi"""',)


def test_files_read_differently_are_both_named(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write(folder, "train.tsv", pandas_tsv(TEXTS))
    write(folder, "dev.tsv", raw_tsv(DEV))
    task = load_task(data=str(folder))
    assert task.dev_texts == [(text,) for text in DEV]
    assert task.flags["quoting"] == "train csv, dev none"


def test_jsonl_and_tasks_log_no_quoting(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write(folder, "train.jsonl", '{"text": "\\"a\\"", "label": 1}\n{"text": "b", "label": 0}\n')
    write(folder, "dev.jsonl", '{"text": "c", "label": 1}\n')
    task = load_task(data=str(folder))
    assert task.train_texts[0] == ('"a"',) and task.flags["quoting"] == ""


def test_a_bad_value_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(CompressError, match=r"^--quoting single: use auto, csv or none$"):
        load_task(data=str(tmp_path), quoting="single")
    line = cli_error(capsys, "distill", "--teacher", "t", "--data", tmp_path, "--quoting", "single")
    assert line == "compress: error: --quoting single: use auto, csv or none"


def test_quoting_with_a_task_is_refused() -> None:
    with pytest.raises(CompressError, match=r"^--quoting only applies to --data; --task sst2"):
        load_task(task="sst2", quoting="csv")


def test_glue_sst2_reads_as_before() -> None:
    """GLUE's SST-2 is raw: every line after the header is one sentence, a tab, its label, quotes and all."""
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"no SST-2 copy at {SST2}")
    task = load_task(data=str(SST2))
    for split, texts in (("train", task.train_texts), ("dev", task.dev_texts)):
        lines = (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        assert texts == [(line.rsplit("\t", 1)[0],) for line in lines]
    assert task.flags["quoting"] == "none"
