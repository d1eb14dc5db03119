"""compress prune --vocab end to end: the cut after recovery, a plain BERT that reloads without compress with the
parent's logits on kept text, the rates logged, chains with heads, the search space, and bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits_without_compress, run_main, save_tiny_bert, write_tsv

import compress
from compress.api import DataConfig, OutputConfig, PruneConfig, RuntimeConfig, TrackingConfig, TrainingConfig

UNUSED = ["zebra", "quartz", "xylophone", "walrus", "kumquat", "##ing", "##ed"]  # never in the synthetic rows


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT whose vocabulary holds words the task's rows never use, and those rows."""
    root = tmp_path_factory.mktemp("vocab")
    return save_tiny_bert(root / "teacher", extra_vocab=UNUSED), write_tsv(root / "data")


def prune(wide, workdir: Path, epochs: int = 0, **step):
    teacher, data = wide
    return compress.prune(PruneConfig(model=str(teacher), **step), DataConfig(data=str(data)),
                          training=TrainingConfig(epochs=epochs), runtime=RuntimeConfig(latency_reps=1),
                          tracking=TrackingConfig(tracking=f"sqlite:///{workdir / 'mlflow.db'}"),
                          output=OutputConfig(output=str(workdir / "pruned")))


def test_vocab_alone_writes_a_plain_bert_with_the_parents_logits_on_kept_text(wide, workdir, tmp_path) -> None:
    from transformers import AutoTokenizer

    teacher, _ = wide
    result = prune(wide, workdir, vocab=True)
    out = Path(result.output)
    parent_tok, pruned_tok = AutoTokenizer.from_pretrained(str(teacher)), AutoTokenizer.from_pretrained(str(out))
    assert len(pruned_tok) == len(parent_tok) - len(UNUSED)
    m = result.metrics
    assert (m["vocab_size_before"], m["vocab_size"]) == (len(parent_tok), len(parent_tok) - len(UNUSED))
    assert m["unk_rate"] == 0.0 and m["dropped_rate"] == 0.0  # the dev rows use only the training rows' words
    assert m["teacher_params"] - m["student_params"] == len(UNUSED) * 32  # rows x hidden
    assert m["student_score"] == m["teacher_score"]
    text = ["the movie was good", "a very dull plot and acting"]
    pruned, kind = logits_without_compress(out, dict(pruned_tok(text, padding=True, return_tensors="pt")), tmp_path,
                                           trust=False)
    parent, _ = logits_without_compress(teacher, dict(parent_tok(text, padding=True, return_tensors="pt")), tmp_path,
                                        trust=False)
    assert kind == "BertForSequenceClassification"
    torch.testing.assert_close(pruned, parent)
    # a dropped word becomes [UNK] in the pruned model's ids
    assert pruned_tok.unk_token_id in pruned_tok("the zebra was good")["input_ids"]


def test_a_vocab_pruned_model_exports_to_onnx_and_int8_with_parity(wide, workdir) -> None:
    from compress.api import ExportConfig

    pruned = prune(wide, workdir, vocab=True)
    exported = compress.export(ExportConfig(model=pruned.output, format="hf,onnx,int8"),
                               output=OutputConfig(output=str(workdir / "exported")))
    assert exported.metrics["parity_max_abs_diff"] <= 1e-4
    assert (workdir / "exported" / "model.int8.onnx").exists()
    assert exported.report["params"] == pruned.metrics["student_params"]


def test_vocab_after_heads_in_one_run(wide, workdir) -> None:
    """Heads first (CompressBert, recovered from the parent with the parent's tokenizer), then the vocabulary."""
    from transformers import AutoModelForSequenceClassification

    result = prune(wide, workdir, heads=0.5, vocab=True, epochs=1)
    assert result.metrics["heads_kept_fraction"] == 0.5 and result.metrics["vocab_size"] == 27
    model = AutoModelForSequenceClassification.from_pretrained(result.output)  # compress is imported: registered
    assert model.config.model_type == "compress_bert" and model.get_input_embeddings().num_embeddings == 27
    assert result.lineage["pruning"]["vocab"] is True


def test_a_search_step_with_vocab_alone_runs_prune() -> None:
    from compress.search.space import parse_space, plan, step_flags

    flags = step_flags()
    dims = parse_space({"vocab": [True, False]}, flags)
    assert "vocab" in dims
    assert [s for s, _ in plan({"vocab": True}, flags)] == ["prune"]
    assert plan({"vocab": False}, flags) == []


@pytest.mark.parametrize(("extra", "says"), [
    (["--vocab", "--vocab_corpus", "missing.txt"], "--vocab_corpus missing.txt: no such file"),
    (["--vocab_top", "5"], "--vocab_corpus, --vocab_top and --vocab_min_count choose what --vocab keeps"),
    (["--vocab_min_count", "3"], "--vocab_corpus, --vocab_top and --vocab_min_count choose what --vocab keeps"),
    (["--vocab", "--vocab_min_count", "0"], "--vocab_min_count 0: must be at least 1"),
    (["--vocab", "--vocab_top", "5"], "--vocab_top 5: it keeps the most frequent tokens of --vocab_corpus"),
    (["--vocab", "--vocab_top", "-1"], "--vocab_top -1: must be at least 0"),
])
def test_bad_vocab_flags_get_one_line_and_write_nothing(extra, says, wide, workdir) -> None:
    teacher, data = wide
    args = ["prune", "--model", teacher, "--data", data, "--output", workdir / "out", *extra]
    code, _, err = run_main(args)
    assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "out").exists() and not (workdir / "out.partial").exists()


def test_a_vocabulary_the_texts_use_whole_is_refused_before_any_work(tiny_teacher, tiny_data, workdir) -> None:
    """The tiny teacher's vocabulary is exactly its rows' words: nothing to drop, said in one line."""
    code, _, err = run_main(["prune", "--model", tiny_teacher, "--data", tiny_data, "--vocab", "--output",
                             workdir / "out"])
    assert code == 1 and "use all 27 tokens of the vocabulary, so there is nothing to drop" in err, err
    assert not (workdir / "out").exists() and not (workdir / "out.partial").exists()
