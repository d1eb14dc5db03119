"""Fixtures: tiny random BERTs saved with save_pretrained (so the real loading path runs) and tiny task data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Never let a test reach for the hub: transformers would retry for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's spinning OpenMP threads made
# a tiny distill 4x slower (45 s against 11 s). Set before torch is imported; subprocesses (DDP, kill -9) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "quite", "acting", "story", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def make_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is set by one sentiment word among fillers: learnable by a tiny model in seconds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(folder: Path, train: int = 96, dev: int = 32, labels: tuple[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.tsv", train, 0), ("dev.tsv", dev, 1)):
        lines = ["sentence\tlabel"] + [f"{t}\t{labels[y] if labels else y}" for t, y in make_rows(n, seed)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def save_tiny_bert(folder: Path, *, layers: int = 4, hidden: int = 32, heads: int = 4, intermediate: int = 64,
                   head: bool = True, num_labels: int = 2, extra_vocab: list[str] | None = None, seed: int = 0,
                   model_type: str = "bert", **config_extra) -> Path:
    """A random BERT (or another WordPiece encoder: `model_type` ernie, electra or distilbert, with `config_extra`
    such as ELECTRA's embedding_size or ERNIE's use_task_id) and its WordPiece tokenizer."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        BertTokenizerFast,
        DistilBertTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + (extra_vocab or [])))
    # transformers 5 ignores vocab_file= here (every word becomes [UNK]); the vocab goes in as a dict. DistilBERT's
    # tokenizer is BERT's without token type ids, as in the real model.
    tokenizer = DistilBertTokenizerFast if model_type == "distilbert" else BertTokenizerFast
    tokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    if model_type == "distilbert":  # its own names for the FFN width and the dropouts
        sizes = {"hidden_dim": intermediate, "dropout": 0.0, "attention_dropout": 0.0}
    else:
        sizes = {"intermediate_size": intermediate, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = AutoConfig.for_model(model_type, vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, max_position_embeddings=128, num_labels=num_labels,
                                  **sizes, **config_extra)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config) if head else AutoModel.from_config(config)
    if getattr(config, "use_task_id", False):  # ERNIE starts its task table at zero-ish; make its fold visible
        torch.nn.init.normal_(model.base_model.embeddings.task_type_embeddings.weight)
    model.save_pretrained(folder)
    return folder


def save_tiny_roberta(folder: Path, model_type: str = "roberta", *, layers: int = 4, hidden: int = 32, heads: int = 4,
                      intermediate: int = 64, seed: int = 0) -> Path:
    """A RoBERTa-family classifier (roberta, xlm-roberta, camembert) of the tiny BERT's size, random weights.

    As in the real models, the tokenizer is byte-level BPE (trained here on the tiny corpus' words) with <pad> at id
    1 and no token type ids, position ids count from 2, and there is one token type."""
    import tempfile

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification, RobertaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(POSITIVE + NEGATIVE + FILLER)] * 4, vocab_size=400, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as files:
        vocab, merges = bpe.save_model(files)
        tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)
        tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=intermediate,
                                  max_position_embeddings=130, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def save_finetuned_tiny_bert(folder: Path, *, layers: int, hidden: int, heads: int, intermediate: int
                             ) -> tuple[Path, Path]:
    """A small random BERT fine-tuned for a few seconds on 512 synthetic sentiment rows (the parent the prune and
    share benchmarks' --tiny modes compress), and the folder of those rows."""
    from compress.api import (DataConfig, FinetuneConfig, OutputConfig, RuntimeConfig, TrackingConfig,
                              TrainingConfig, finetune)

    data = write_tsv(folder / "data", train=512, dev=128)
    raw = save_tiny_bert(folder / "raw", layers=layers, hidden=hidden, heads=heads, intermediate=intermediate)
    parent = folder / "parent"
    finetune(FinetuneConfig(model=str(raw)), DataConfig(data=str(data)), TrainingConfig(epochs=3, lr=1e-3),
             RuntimeConfig(latency_reps=1), TrackingConfig(tracking=f"sqlite:///{folder}/mlruns/mlflow.db"),
             OutputConfig(output=str(parent)))
    return parent, data


def logits_without_compress(folder: Path, inputs: dict, tmp: Path, trust: bool = True):
    """Logits of `folder` on `inputs`, loaded by transformers in a fresh interpreter that never imports compress
    (through the code saved beside the weights when `trust`), and the class it loaded."""
    import subprocess
    import sys

    import torch

    torch.save(inputs, tmp / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"m = A.from_pretrained({str(folder)!r}, trust_remote_code={trust}).eval()\n"
        "assert 'compress' not in sys.modules, 'compress was imported'\n"
        f"torch.save(m(**torch.load({str(tmp / 'inputs.pt')!r})).logits, {str(tmp / 'out.pt')!r})\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp / "out.pt"), done.stdout.strip()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_root) -> Path:
    """A 4-layer, 32-wide BERT with a 2-label head (random weights)."""
    return save_tiny_bert(tiny_root / "teacher")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_root) -> Path:
    """The same shape without a classifier head, like a pretrained encoder."""
    return save_tiny_bert(tiny_root / "encoder", head=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_root) -> Path:
    return write_tsv(tiny_root / "data")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a temp dir so mlruns/ and outputs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Postgres:
    """A throwaway PostgreSQL cluster on a free localhost port, run as the `postgres` user when tests run as root
    (the server refuses root). Databases are made with createdb and inspected with psql, not with compress's code."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        import socket

        self.bin, self.root = bin_dir, root
        with socket.socket() as s:
            s.bind(("localhost", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start", "-o",
                  f"-k {root} -p {self.port} -c listen_addresses=localhost")

    def _run(self, tool: str, *args: str) -> str:
        import subprocess

        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{tool}: {done.stderr[-2000:]}"
        return done.stdout

    def url(self, db: str, password: str = "") -> str:
        return f"postgresql://postgres{':' + password if password else ''}@localhost:{self.port}/{db}"

    def create(self, db: str) -> str:
        self._run("createdb", "-h", "localhost", "-p", str(self.port), "-U", "postgres", db)
        return self.url(db)

    def sql(self, db: str, statement: str) -> str:
        return self._run("psql", "-h", "localhost", "-p", str(self.port), "-U", "postgres", "-d", db, "-Atc",
                         statement)

    def tables(self, db: str) -> list[str]:
        return self.sql(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").split()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")


def _postgres_bin() -> Path | None:
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").is_file():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A live PostgreSQL server, for compress search --storage and --tracking on a shared database. Skipped where
    the server is not installed, except under CI (.ci/run sets COMPRESS_TEST_POSTGRES=required and installs it)."""
    import shutil
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("COMPRESS_TEST_POSTGRES") == "required":
            pytest.fail("COMPRESS_TEST_POSTGRES=required, but no PostgreSQL server is installed (apt install "
                        "postgresql)")
        pytest.skip("no PostgreSQL server installed (apt install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="compress-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    server = Postgres(bin_dir, root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

