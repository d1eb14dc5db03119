"""CompressBert: converting a BERT keeps its function, and both load paths give the same logits."""

import pytest
import torch
from helpers import logits_without_compress, padded_batch, save_tiny_bert, save_tiny_roberta
from transformers import AutoModelForSequenceClassification

from compress.models.compress_bert import CompressBertConfig, CompressBertForSequenceClassification, from_bert


def test_from_bert_keeps_logits_hidden_states_and_attentions(bert):
    converted = from_bert(bert).eval()
    b = padded_batch()
    ref = bert(**b, output_hidden_states=True)
    out = converted(**b, output_hidden_states=True, output_attentions=True)
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in bert.parameters())
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    assert out.attentions[0].shape == (3, 4, 10, 10)
    # the eager path (attention maps) and the sdpa path agree
    torch.testing.assert_close(converted(**b).logits, out.logits, atol=1e-6, rtol=0)


def test_both_load_paths_give_the_same_logits(bert, tmp_path):
    converted = from_bert(bert).eval()
    converted.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "modeling_compress_bert.py").exists()
    b = padded_batch()
    expected = converted(**b).logits
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert isinstance(reloaded, CompressBertForSequenceClassification)
    torch.testing.assert_close(reloaded(**b).logits, expected, atol=0, rtol=0)
    # a fresh interpreter that never imports compress, through the code saved beside the weights
    elsewhere, name = logits_without_compress(tmp_path / "m", b, tmp_path)
    assert name == "CompressBertForSequenceClassification"
    torch.testing.assert_close(elsewhere, expected, atol=0, rtol=0)


def test_config_rejects_inconsistent_maps():
    with pytest.raises(ValueError, match="one entry per hidden layer"):
        CompressBertConfig(num_hidden_layers=2, attention_map=[0])
    with pytest.raises(ValueError, match="one entry per module"):
        CompressBertConfig(num_hidden_layers=2, attention_heads=[1, 2, 3])


def test_shared_modules_count_once_and_zero_heads_run():
    config = CompressBertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=32, attention_map=[0, 0, 0, 0], ffn_map=[0, 1, 0, 1],
                                attention_heads=[0], intermediate_sizes=[32, 8])
    model = CompressBertForSequenceClassification(config).eval()
    # one attention module with no heads: only its output projection bias (16), no q/k/v weights, and a norm (32)
    attn = sum(p.numel() for p in model.bert.encoder.attention.parameters())
    assert attn == 16 * 0 + 16 + 32 + 3 * 0
    ffn = sum(p.numel() for p in model.bert.encoder.ffn.parameters())
    assert ffn == (16 * 32 + 32 + 32 * 16 + 16 + 32) + (16 * 8 + 8 + 8 * 16 + 16 + 32)
    out = model(input_ids=torch.tensor([[2, 7, 9, 3]]), output_hidden_states=True)
    assert len(out.hidden_states) == 5 and torch.isfinite(out.logits).all()


# --- RoBERTa and the models built on it -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert"])
def test_from_bert_converts_roberta_family_exactly(model_type, tmp_path):
    roberta = AutoModelForSequenceClassification.from_pretrained(save_tiny_roberta(tmp_path / model_type, model_type))
    roberta.eval()
    converted = from_bert(roberta).eval()
    assert converted.config.roberta_positions and converted.config.pad_token_id == 1
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in roberta.parameters())
    b = padded_batch()
    b["input_ids"][0, 6:] = 1  # RoBERTa's pad id: those positions get position id 1, the real tokens 2, 3, ...
    ref = roberta(**b, output_hidden_states=True)
    out = converted(**b, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):  # padded positions included
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    # from embeddings the padding is unknown: both number every position from 2
    embeds = roberta.get_input_embeddings()(b["input_ids"])
    torch.testing.assert_close(converted(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits,
                               roberta(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits,
                               atol=1e-6, rtol=0)


def test_roberta_position_ids_by_hand():
    from compress.models.compress_bert.modeling_compress_bert import roberta_position_ids

    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 5, 6, 7, 8, 2]])  # pad id 1, right-padded
    assert roberta_position_ids(ids, None, pad=1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]
    assert roberta_position_ids(None, torch.zeros(2, 3, 8), pad=1).tolist() == [[2, 3, 4]] * 2


def test_converted_roberta_reloads_without_compress(tmp_path):
    roberta = AutoModelForSequenceClassification.from_pretrained(save_tiny_roberta(tmp_path / "r")).eval()
    from_bert(roberta).save_pretrained(tmp_path / "m")
    b = padded_batch()
    b["input_ids"][0, 6:] = 1
    expected = roberta(**b).logits
    elsewhere, _ = logits_without_compress(tmp_path / "m", b, tmp_path)
    torch.testing.assert_close(elsewhere, expected, atol=1e-6, rtol=0)


# --- ELECTRA and ERNIE ---------------------------------------------------------------------------------------------

# ELECTRA-small's layout (16-wide embeddings projected to 32), ELECTRA-base's (no projection), ERNIE with and
# without its task embedding (3 task types x 32 folded away), and DistilBERT (one zero token-type row of 32 added)
OTHER_ENCODERS = [("electra", {"embedding_size": 16}, 0), ("electra", {"embedding_size": 32}, 0),
                  ("ernie", {"use_task_id": True, "task_type_vocab_size": 3}, 3 * 32), ("ernie", {}, 0),
                  ("distilbert", {}, -32)]


@pytest.mark.parametrize(("model_type", "extra", "folded"), OTHER_ENCODERS)
def test_from_bert_converts_electra_ernie_and_distilbert_exactly(model_type, extra, folded, tmp_path):
    parent = AutoModelForSequenceClassification.from_pretrained(
        save_tiny_bert(tmp_path / model_type, model_type=model_type, num_labels=3, **extra)).eval()
    converted = from_bert(parent).eval()
    c = converted.config
    assert c.pooler_act == {"electra": "gelu", "distilbert": "relu"}.get(model_type, "tanh")
    assert c.embedding_size is None and c.intermediate_size == 64
    assert c.layer_norm_eps == getattr(parent.config, "layer_norm_eps", 1e-12)  # DistilBERT's is fixed in its code
    if model_type == "distilbert":  # no token types: its one row is zero
        assert not converted.bert.embeddings.token_type_embeddings.weight.any()
    assert c.projected_embedding_size == (16 if extra.get("embedding_size") == 16 else None)
    n_parent, n_converted = (sum(p.numel() for p in m.parameters()) for m in (parent, converted))
    assert n_parent - n_converted == folded
    b = padded_batch()
    ref = parent(**b, output_hidden_states=True)
    out = converted(**b, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):  # after ELECTRA's projection
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_converted_electra_small_reloads_without_compress(tmp_path):
    electra = AutoModelForSequenceClassification.from_pretrained(
        save_tiny_bert(tmp_path / "e", model_type="electra", embedding_size=16)).eval()
    from_bert(electra).save_pretrained(tmp_path / "m")
    b = padded_batch()
    elsewhere, name = logits_without_compress(tmp_path / "m", b, tmp_path)
    assert name == "CompressBertForSequenceClassification"
    torch.testing.assert_close(elsewhere, electra(**b).logits, atol=1e-6, rtol=0)


def test_compress_bert_refuses_two_kinds_of_narrow_embedding():
    with pytest.raises(ValueError, match="exclusive"):
        CompressBertConfig(embedding_size=8, projected_embedding_size=16)


def test_from_bert_refuses_other_architectures():
    from transformers import AutoConfig

    config = AutoConfig.for_model("albert", vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, embedding_size=8)
    with pytest.raises(ValueError, match="cannot convert model type albert"):
        from_bert(AutoModelForSequenceClassification.from_config(config))
