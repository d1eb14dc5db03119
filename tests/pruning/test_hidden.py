"""Hidden-size pruning: the residual stream loses the same dimensions everywhere; shapes, parameters and FLOPs
follow, the scores are what they claim to be, and the cut model saves and reloads."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_bert
from transformers import AutoModelForSequenceClassification

from compress.models.compress_bert import CompressBertForSequenceClassification, from_bert
from compress.pruning import (HIDDEN_CRITERIA, flops_per_token, kept_dimensions, masked_stream, slice_heads,
                              slice_hidden, slice_neurons)

P, T, C = 128, 2, 2  # the tiny parent's positions, token types and labels


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    folder = save_tiny_bert(tmp_path_factory.mktemp("hidden") / "bert", layers=2, hidden=32, heads=4,
                            intermediate=64)
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


@pytest.fixture
def model(parent):
    return from_bert(parent).eval()


def _batch(vocab: int, labels: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 11), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    batch["attention_mask"][1, 7:] = 0
    if labels:
        batch["labels"] = torch.tensor([0, 1, 1])
    return batch


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(vocab: int, hidden: int, heads: list[int], widths: list[int], head_size: int = 8) -> int:
    """By hand: embeddings (word, position, type tables, LayerNorm), each layer (q, k, v; output projection; norm;
    FFN in and out; norm), the pooler and the classifier."""
    total = (vocab + P + T) * hidden + 2 * hidden
    for a, w in zip(heads, widths):
        inner = a * head_size
        total += 3 * (hidden * inner + inner) + (inner * hidden + hidden) + 2 * hidden
        total += (hidden * w + w) + (w * hidden + hidden) + 2 * hidden
    return total + (hidden * hidden + hidden) + (hidden * C + C)


def test_every_residual_tensor_loses_the_same_dimensions(model):
    vocab = model.config.vocab_size
    keep = [0, 3, 4, 9, 10, 17, 20, 31]
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    slice_hidden(model, keep)
    idx = torch.tensor(keep)
    state = model.state_dict()
    assert model.config.hidden_size == 8 and model.config.attention_head_size == 8  # heads keep their width
    torch.testing.assert_close(state["bert.embeddings.word_embeddings.weight"],
                               reference["bert.embeddings.word_embeddings.weight"][:, idx])
    torch.testing.assert_close(state["bert.encoder.attention.1.query.weight"],
                               reference["bert.encoder.attention.1.query.weight"][:, idx])
    torch.testing.assert_close(state["bert.encoder.attention.1.query.bias"],
                               reference["bert.encoder.attention.1.query.bias"])  # head features stay whole
    torch.testing.assert_close(state["bert.encoder.ffn.0.output.bias"],
                               reference["bert.encoder.ffn.0.output.bias"][idx])
    torch.testing.assert_close(state["bert.encoder.ffn.0.LayerNorm.weight"],
                               reference["bert.encoder.ffn.0.LayerNorm.weight"][idx])
    torch.testing.assert_close(state["bert.pooler.dense.weight"], reference["bert.pooler.dense.weight"][idx][:, idx])
    torch.testing.assert_close(state["classifier.weight"], reference["classifier.weight"][:, idx])
    assert _params(model) == expected_params(vocab, 8, [4, 4], [64, 64])
    assert model(**_batch(vocab, labels=False)).logits.shape == (3, 2)


def test_composes_with_heads_and_neurons_and_counts_params_and_flops(model):
    vocab = model.config.vocab_size
    slice_heads(model, [[0, 2], [1]])
    slice_neurons(model, [list(range(0, 64, 2)), list(range(16))])
    slice_hidden(model, list(range(16)))
    assert _params(model) == expected_params(vocab, 16, [2, 1], [32, 16])
    # per token at S=128: q, k, v, output projection, attention over S, FFN; pooler and classifier once a sequence
    by_hand = sum(2 * 16 * (a * 8) * 4 + 2 * 128 * (a * 8) * 2 + 2 * 16 * w * 2 for a, w in ((2, 32), (1, 16)))
    by_hand += (2 * 16 * 16 + 2 * 16 * 2) / 128
    assert flops_per_token(model.config) == pytest.approx(by_hand)


def test_keeping_every_dimension_changes_nothing(model, parent):
    batch = _batch(model.config.vocab_size, labels=False)
    with torch.no_grad():
        expected = parent(**batch).logits
        torch.testing.assert_close(slice_hidden(model, list(range(32)))(**batch).logits, expected)


def test_a_zero_mask_entry_silences_that_dimension_for_every_reader(model):
    """With dimension d masked everywhere it is written, the stream that reaches each reader is 0 there."""
    mask = torch.ones(32)
    mask[5] = 0
    seen = []
    handle = model.bert.encoder.ffn[1].intermediate.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad(), masked_stream(model, mask):
        model(**_batch(model.config.vocab_size, labels=False))
    handle.remove()
    assert seen[0][..., 5].abs().max() == 0 and seen[0][..., 4].abs().max() > 0


def test_taylor_scores_are_the_loss_gradient_of_each_dimension(model):
    """|dL/dm_d| at m = 1 against a central finite difference of the loss, for a few dimensions."""
    batch = _batch(model.config.vocab_size)
    scores = HIDDEN_CRITERIA["taylor"](model, [batch])
    assert scores.shape == (32,) and (scores >= 0).all()

    def loss_at(mask):
        with torch.no_grad(), masked_stream(model, mask):
            return model(**batch).loss.double()

    eps = 1e-3
    for d in (0, 7, 19):
        up, down = torch.ones(32), torch.ones(32)
        up[d], down[d] = 1 + eps, 1 - eps
        slope = (loss_at(up) - loss_at(down)) / (2 * eps)
        assert float(scores[d]) == pytest.approx(abs(float(slope)), rel=2e-2, abs=1e-5)


def test_magnitude_weighs_each_tensor_equally():
    """A dimension whose weights are all zero scores 0; doubling one LayerNorm gain everywhere else moves it the same
    as doubling a word-table column, however many rows that table has."""
    from compress.models.compress_bert import CompressBertConfig

    config = CompressBertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, num_labels=2)
    model = CompressBertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    scores = HIDDEN_CRITERIA["magnitude"](model)
    # every tensor is uniform, so each contributes exactly 1 to every dimension: 4 embedding tensors, 5 per attention,
    # 3 per FFN, the pooler twice, the classifier
    torch.testing.assert_close(scores, torch.full((8,), 4.0 + 5 + 3 + 2 + 1))


def test_kept_dimensions_rounds_up_to_a_multiple_and_keeps_the_best():
    scores = torch.arange(40, dtype=torch.float)  # dimension i scores i
    assert kept_dimensions(scores, 0.5) == list(range(20, 40))
    assert kept_dimensions(scores, 0.5, multiple=8) == list(range(16, 40))  # 20 -> 24
    assert kept_dimensions(scores, 0.99, multiple=8) == list(range(32, 40))
    with pytest.raises(ValueError):
        kept_dimensions(scores, 1.0)


def test_save_and_reload_give_equal_logits(model, tmp_path):
    slice_hidden(model, list(range(0, 32, 2)))
    model.save_pretrained(tmp_path)
    batch = _batch(model.config.vocab_size, labels=False)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == 16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["electra", "factorised"])
def test_stream_is_cut_after_a_narrow_or_factorised_embedding(layout):
    """ELECTRA-small's narrow embedding block and ALBERT's factorised word table stay whole: only the projection into
    the stream loses rows."""
    from compress.models.compress_bert import CompressBertConfig

    extra = {"projected_embedding_size": 16} if layout == "electra" else {"embedding_size": 16}
    config = CompressBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=16, num_labels=2, **extra)
    model = CompressBertForSequenceClassification(config).eval()
    before = _params(model)
    slice_hidden(model, list(range(16)))
    ids = torch.randint(1, 50, (2, 5))
    assert model(input_ids=ids).logits.shape == (2, 2)
    table = model.bert.embeddings.word_embeddings
    assert (table.embed if layout == "factorised" else table).weight.shape == (50, 16)
    per_layer = 3 * 16 * 16 + 16 * 16 + 16 * 16 * 2 + 5 * 16  # q, k, v in; output projection; FFN; biases, norms
    assert before - _params(model) > per_layer


def test_bad_keep_is_refused(model):
    for keep in ([], [0, 0], [32]):
        with pytest.raises(ValueError):
            slice_hidden(model, keep)


def test_recovery_starts_its_hidden_map_where_the_dimensions_came_from(model, parent):
    """Sliced twice, the student remembers each dimension's place in the first parent's stream; distillation from
    that parent starts every hidden-state projection as the placement, so the projected state equals the student's
    own on the kept dimensions and is zero elsewhere."""
    from compress.engine.distill_module import DistillModule
    from compress.options.groups import LossConfig, TrainingConfig

    slice_hidden(model, list(range(8, 32)))  # keeps parent dimensions 8..31
    slice_hidden(model, [0, 5, 23])  # of those: 8, 13, 31
    assert model.hidden_kept == [8, 13, 31]
    teacher = from_bert(parent).eval()
    module = DistillModule(model, teacher, num_labels=2, loss=LossConfig(), training=TrainingConfig())
    states = torch.randn(2, 4, 3)
    for projection in module.projections:
        projected = projection(states)
        torch.testing.assert_close(projected[..., [8, 13, 31]], states)
        assert projected[..., [d for d in range(32) if d not in (8, 13, 31)]].abs().max() == 0
