"""Unlabelled in-domain text for distillation (a transfer set, as DistilBERT used): read, checked, kept off the dev set.

`--unlabeled PATH` is a .txt with one text a line, or a .tsv, .csv or .jsonl read as `--data`'s files are (the same
quoting detection, the same text columns). Its rows have no labels: they train on the teacher's soft targets alone
(TaskData.soft_texts). A text that is also a dev text is dropped and counted, so the teacher's view of the dev set
never reaches the student through it and the dev score stays honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.data.tasks import TaskData, _read_table, _text_columns
from compress.infra.errors import CompressError

_SUFFIXES = (".txt", ".tsv", ".csv", ".jsonl")


@dataclass(frozen=True)
class Unlabeled:
    """The texts kept, and what was left out."""

    texts: list[tuple[str, ...]]
    read: int
    """texts in the file (blank lines of a .txt not counted)."""
    dev_duplicates: int
    """texts dropped because they are dev texts."""
    quoting: str
    """how a .tsv or .csv was read (csv or none); "" for a .txt or .jsonl."""

    def ratio(self, labelled: int) -> float:
        """Unlabelled rows per labelled row."""
        return len(self.texts) / max(1, labelled)


def _same_text(text: tuple[str, ...]) -> tuple[str, ...]:
    # whitespace and case differences do not make another text for an uncased model, and would let a dev text through
    return tuple(" ".join(t.split()).casefold() for t in text)


def read_unlabeled(path: str, task: TaskData, text_column: str | None = None, quoting: str = "auto") -> Unlabeled:
    """The texts of `path` in `task`'s shape (one text, or a pair), less those that are dev texts.

    Raises CompressError naming --unlabeled for a missing, unreadable or empty file, a .txt for a task of pairs, and
    a file whose every text is a dev text."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CompressError(f"--unlabeled: {path} {'is a folder' if file.is_dir() else 'does not exist'} (expected a "
                            ".txt with one text a line, or a .tsv, .csv or .jsonl with a text column)")
    if file.suffix not in _SUFFIXES:
        raise CompressError(f"--unlabeled: {path}: expected a .txt, .tsv, .csv or .jsonl file")
    arity = len(task.train_texts[0]) if task.train_texts else 1
    used = ""
    if file.suffix == ".txt":
        if arity != 1:
            raise CompressError(f"--unlabeled: {path} is a .txt, one text a line, but {task.name} takes pairs of "
                                "texts; give a .tsv, .csv or .jsonl with the pair's columns")
        try:
            raw = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise CompressError(f"--unlabeled: cannot read {path} ({str(err).splitlines()[0]})") from None
        texts = [(line.strip(),) for line in raw.splitlines() if line.strip()]
    else:
        columns, records, found = _read_table(file, quoting, "--unlabeled")
        used = found or ""
        names = _text_columns(file, columns, text_column, "--unlabeled")
        if len(names) != arity:
            raise CompressError(f"--unlabeled: {path} gives {len(names)} text column(s) ({', '.join(names)}) but "
                                f"{task.name} takes {arity}; name them with --text_column")
        texts = []
        for line, record in records:
            values = tuple(record.get(name) for name in names)
            if not all(isinstance(v, str) for v in values):
                raise CompressError(f"--unlabeled: {path} line {line}: no text in column(s) {', '.join(names)}")
            if any(v.strip() for v in values):
                texts.append(values)
    if not texts:
        raise CompressError(f"--unlabeled: {path} is empty (expected one text a line, or rows with a text column)")
    dev = {_same_text(t) for t in task.dev_texts}
    kept = [t for t in texts if _same_text(t) not in dev]
    if not kept:
        raise CompressError(f"--unlabeled: every one of the {len(texts):,} texts in {path} is a dev text; nothing is "
                            "left to train on without scoring on what the student saw")
    return Unlabeled(kept, len(texts), len(texts) - len(kept), used)
