"""compress prune --hidden end to end: the whole chain in one run (layers, heads, FFN, hidden, vocab), recovery
through the projected hidden-state loss, a reload without compress, ONNX parity, the search space and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits_without_compress, run_main, save_tiny_bert, write_tsv

import compress
from compress.api import (DataConfig, ExportConfig, OutputConfig, PruneConfig, RuntimeConfig, TrackingConfig,
                          TrainingConfig)

UNUSED = ["zebra", "quartz", "xylophone", "walrus"]  # never in the synthetic rows


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One prune of a tiny 4-layer, 32-wide BERT: one layer, half the heads and neurons, half the stream and the
    unused vocabulary, with one recovery epoch."""
    root = tmp_path_factory.mktemp("hidden")
    teacher, data = save_tiny_bert(root / "teacher", extra_vocab=UNUSED), write_tsv(root / "data")
    result = compress.prune(
        PruneConfig(model=str(teacher), heads=0.5, ffn=0.5, hidden=0.5, drop_layers=1, vocab=True,
                    importance_batches=2),
        DataConfig(data=str(data), max_train=64), training=TrainingConfig(epochs=1),
        runtime=RuntimeConfig(latency_reps=1), tracking=TrackingConfig(tracking=f"sqlite:///{root / 'mlflow.db'}"),
        output=OutputConfig(output=str(root / "pruned")))
    return teacher, result


def test_the_whole_chain_cuts_every_dimension_it_names(chain) -> None:
    _, result = chain
    m = result.metrics
    assert (m["hidden_size"], m["hidden_kept_fraction"]) == (16, 0.5)
    assert (m["layers_kept"], m["heads_kept"], m["ffn_kept"], m["vocab_size"]) == (3, 6, 96, 27)
    # by hand: 27 x 16 words + 128 x 16 positions + 2 x 16 types + norm; 3 layers of 2 heads of 8 and 32 neurons on a
    # 16-wide stream; pooler; classifier
    layer = 3 * (16 * 16 + 16) + (16 * 16 + 16) + 32 + (16 * 32 + 32) + (32 * 16 + 16) + 32
    assert m["student_params"] == (27 + 128 + 2) * 16 + 32 + 3 * layer + (16 * 16 + 16) + (16 * 2 + 2)
    # FLOPs a token at S=128 by hand: q, k, v, output projection, attention over 128 tokens, FFN; pooler and
    # classifier once a sequence. The parent's layer is 32768 and its head 17 (test_prune).
    student = 3 * (2 * 16 * 16 * 3 + 2 * 128 * 16 * 2 + 2 * 16 * 16 + 2 * 16 * 32 * 2)
    student += (2 * 16 * 16 + 2 * 16 * 2) / 128
    assert m["flops_ratio"] == pytest.approx(student / (4 * 32768 + 17))
    assert "score_before_recovery" in m
    assert result.lineage["pruning"]["hidden"] == 0.5


def test_it_reloads_without_compress_with_equal_logits(chain, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, result = chain
    tokenizer = AutoTokenizer.from_pretrained(result.output)
    inputs = dict(tokenizer(["the movie was good", "a very dull plot"], padding=True, return_tensors="pt"))
    elsewhere, kind = logits_without_compress(Path(result.output), inputs, tmp_path)
    assert kind == "CompressBertForSequenceClassification"
    model = AutoModelForSequenceClassification.from_pretrained(result.output).eval()
    assert model.config.hidden_size == 16 and model.config.attention_head_size == 8
    with torch.no_grad():
        torch.testing.assert_close(elsewhere, model(**inputs).logits, rtol=0, atol=0)


def test_a_width_pruned_model_exports_to_onnx_and_int8_with_parity(chain, tmp_path) -> None:
    _, result = chain
    exported = compress.export(ExportConfig(model=result.output, format="hf,onnx,int8"),
                               output=OutputConfig(output=str(tmp_path / "exported")))
    assert exported.metrics["parity_max_abs_diff"] <= 1e-4
    assert (tmp_path / "exported" / "model.int8.onnx").exists()


def test_search_can_draw_hidden() -> None:
    from compress.search.space import parse_space, plan, step_flags

    flags = step_flags()
    assert "hidden" in parse_space({"hidden": [0.0, 0.25, 0.5]}, flags)
    assert [s for s, _ in plan({"hidden": 0.25}, flags)] == ["prune"]


@pytest.mark.parametrize(("extra", "says"), [
    (["--hidden", "1.0"], "--hidden 1: must be in [0, 1)"),
    (["--hidden", "-0.5"], "--hidden -0.5: must be in [0, 1)"),
])
def test_bad_hidden_gets_one_line_and_writes_nothing(extra, says, tiny_teacher, tiny_data, workdir) -> None:
    code, _, err = run_main(["prune", "--model", tiny_teacher, "--data", tiny_data, "--output", workdir / "out",
                             *extra])
    assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "out").exists() and not (workdir / "out.partial").exists()
