"""Helpers the test files share, imported as `helpers` (pyproject's pythonpath puts tests/ on the path): tiny
random models and toy data saved to folders, the CLI run in-process, the stores a run writes to, and search through
the API. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import random
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
FAST = ["--latency_reps", "1"]  # one latency round: the timing is not what these tests check

# --- tiny models and toy data ------------------------------------------------------------------------------------

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "quite", "acting", "story", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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


def save_tiny_mpnet(folder: Path, *, layers: int = 2, hidden: int = 48, heads: int = 4, intermediate: int = 96,
                    head: bool = False, seed: int = 0) -> Path:
    """A random MPNet (another family than BERT: relative attention, positions after the pad id, no token types) and
    its own WordPiece tokenizer, whose ids mean other words than the tiny BERT's: <s>, <pad>, </s>, <unk> first and
    the words in reverse order. Head-less by default, like all-mpnet-base-v2, so distill fine-tunes it first."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, MPNetTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(POSITIVE + NEGATIVE + FILLER), reverse=True)
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *words, "##s", "##ly"]
    tokenizer = MPNetTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model("mpnet", vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=intermediate,
                                  max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config) if head else AutoModel.from_config(config)
    model.save_pretrained(folder)
    return folder


def save_tiny_deberta(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64,
                      seed: int = 0) -> Path:
    """A random, head-less DeBERTa-v3-style encoder (disentangled relative attention, no absolute positions, no
    token types) and its own Unigram tokenizer ("▁word" pieces, SentencePiece's format, built from a scored list,
    so no .spm file is needed): a third family with a third vocabulary, for the cross-family teacher tests."""
    import torch
    from transformers import AutoConfig, AutoModel, DebertaV2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    words = [f"\u2581{w}" for w in sorted(set(POSITIVE + NEGATIVE + FILLER))]
    pieces = [(t, 0.0) for t in special] + [(w, -1.0 - i / 100) for i, w in enumerate(words)] + [
        ("s", -5.0), ("ly", -5.0), ("\u2581", -6.0)]
    tokenizer = DebertaV2Tokenizer(vocab=pieces, unk_id=special.index("[UNK]"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model("deberta-v2", vocab_size=len(pieces), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=intermediate,
                                  max_position_embeddings=128, relative_attention=True, position_buckets=32,
                                  pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                  pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def save_finetuned_tiny_bert(folder: Path, *, layers: int, hidden: int, heads: int, intermediate: int,
                             extra_vocab: list[str] | None = None) -> tuple[Path, Path]:
    """A small random BERT fine-tuned for a few seconds on 512 synthetic sentiment rows (the parent the prune and
    share benchmarks' --tiny modes compress), and the folder of those rows."""
    from compress.api import (DataConfig, FinetuneConfig, OutputConfig, RuntimeConfig, TrackingConfig,
                              TrainingConfig, finetune)

    data = write_tsv(folder / "data", train=512, dev=128)
    raw = save_tiny_bert(folder / "raw", layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                         extra_vocab=extra_vocab)
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


# --- the CLI in-process, and where its runs go -------------------------------------------------------------------


def run_main(args: list) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr). Bugs (non-SystemExit exceptions) propagate."""
    from compress.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("compress: error:")]


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process where it must refuse: exit 1, and a last stderr line that is compress's one-line error
    with no traceback; returns that line."""
    import pytest

    from compress.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compress: error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'mlruns' / 'mlflow.db'}"


def track(folder: Path) -> list[str]:
    # Always an absolute URI in-process: MLflow keeps one SQLAlchemy engine per URI string
    # (SqlAlchemyStore._engine_map), so the relative default sqlite:///mlruns/mlflow.db would keep writing to the
    # first test's folder.
    return ["--tracking", sqlite_uri(folder)]


def mlflow_runs(uri: str, experiment: str = "compress"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id])
    return client, runs


# --- search and its runs -----------------------------------------------------------------------------------------


def run_search(**flags):
    """compress search through the API, with the flags as the command line takes them."""
    from compress.options.commands import to_groups
    from compress.search.run import search

    return search(**to_groups("search", flags))


@contextmanager
def callbacks_for_runs(*callbacks):
    """Lightning callbacks for every run started inside the block, through the CLI too: passed to run_training in
    its hooks, as compress search passes its pruning callback."""
    from compress.engine import run

    real = run.run_training

    def with_hooks(plan, models, task, cfg, tracking, hooks=None):
        hooks = hooks or run.RunHooks()
        return real(plan, models, task, cfg, tracking, run.RunHooks([*hooks.callbacks, *callbacks], hooks.tags))

    run.run_training = with_hooks
    try:
        yield
    finally:
        run.run_training = real


def padded_batch() -> dict:
    """Three rows of ten ids with the first row padded after six: masking must carry over a conversion."""
    import torch

    ids = torch.randint(5, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def one_torch_thread():
    """One torch thread for a module's tests (wrap it as an autouse fixture): on 2 shared cores, tiny forwards
    otherwise wait on a busy sibling thread."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
