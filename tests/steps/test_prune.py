"""compress prune: criteria, plans, slicing, sparsity and FLOPs on tiny random BERTs, then the CLI end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import logits_without_compress, save_tiny_bert, save_tiny_roberta
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from compress.cli.main import main
from compress.models.compress_bert import CompressBertConfig, CompressBertForSequenceClassification, from_bert
from compress.pruning import (apply_sparsity, choose_kept, drop_layers, flops_per_token, magnitude_importance,
    make_permanent, masked, parse_drop_layers, random_importance, slice_heads, slice_neurons, sparsity_of,
    taylor_importance)


@pytest.fixture(scope="module")
def parent(tiny_teacher):
    return AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()


@pytest.fixture
def model(parent):
    return from_bert(copy.deepcopy(parent)).eval()


def batch(labels: bool = False):
    ids = torch.randint(5, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    return out | ({"labels": torch.tensor([0, 1, 1])} if labels else {})


# --- plans, worked out by hand
def test_layer_scope_removes_the_same_fraction_everywhere():
    scores = [torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    assert choose_kept(scores, 0.5, "layer") == [[0, 2], [2, 3]]
    assert choose_kept(scores, 0.0, "layer") == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # 0.9 of 4 rounds to 4, but one head per layer stays
    assert choose_kept(scores, 0.9, "layer") == [[0], [3]]
    assert choose_kept(scores, 0.9, "layer", minimum=0) == [[], []]


def test_global_scope_gives_uneven_layers_and_keeps_one_head_each():
    scores = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    # 4 of 8 go: 1, 2, 3 of module 1 (its best, 4, is reserved) and then the lowest left, 6 of module 0
    assert choose_kept(scores, 0.5, "global") == [[0, 1, 2], [3]]
    # with layers being dropped a module may lose everything: 1, 2, 3, 4 go
    assert choose_kept(scores, 0.5, "global", minimum=0) == [[0, 1, 2, 3], []]


def test_global_scope_on_a_model_keeps_more_heads_where_they_matter(model):
    with torch.no_grad():  # layer 0's weights 10x larger: under magnitude its heads outrank every other
        for lin in ("query", "key", "value", "dense"):
            getattr(model.bert.encoder.attention[0], lin).weight.mul_(10)
    keep = choose_kept(magnitude_importance(model).heads, 0.5, "global")
    slice_heads(model, keep)
    sizes = model.config.attention_heads
    assert sizes[0] == 4 and sum(sizes) == 8 and min(sizes) >= 1 and len(set(sizes[1:])) > 1


def test_drop_layers_arguments():
    assert parse_drop_layers(2, 6) == [4, 5]  # a count drops the top layers
    assert parse_drop_layers("3,0", 6) == [0, 3]
    assert parse_drop_layers([1], 6) == [1]
    assert parse_drop_layers(None, 6) == []


# --- criteria
def test_criteria_shapes_and_hand_checked_zeros(model):
    enc = model.bert.encoder
    with torch.no_grad():  # head 1 of module 0 and neuron 5 of FFN 2 can no longer affect anything
        enc.attention[0].dense.weight[:, 8:16] = 0
        for lin in ("query", "key", "value"):
            getattr(enc.attention[0], lin).weight[8:16] = 0
        enc.ffn[2].output.weight[:, 5] = 0
        enc.ffn[2].intermediate.weight[5] = 0
    taylor = taylor_importance(model, [batch(labels=True)] * 2)
    magnitude = magnitude_importance(model)
    for scores in (taylor, magnitude, random_importance(model, seed=1)):
        assert [s.shape for s in scores.heads] == [(4,)] * 4 and [s.shape for s in scores.neurons] == [(64,)] * 4
    assert taylor.heads[0][1] == 0 and taylor.neurons[2][5] == 0 and (taylor.heads[0] > 0).sum() == 3
    assert magnitude.heads[0][1] == 0 and magnitude.neurons[2][5] == 0
    # per module, Taylor scores are normalised to unit L2 norm (Michel et al.)
    torch.testing.assert_close(taylor.heads[1].norm(), torch.tensor(1.0))
    torch.testing.assert_close(random_importance(model, seed=1).heads[0], random_importance(model, seed=1).heads[0])
    assert all(p.requires_grad for p in model.parameters())  # scoring left the weights as it found them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_taylor_scores_on_the_gpu_match_the_cpu(model):
    cpu = taylor_importance(model, [batch(labels=True)])
    gpu = taylor_importance(copy.deepcopy(model).cuda(), [batch(labels=True)])
    for mine, theirs in zip(cpu.heads + cpu.neurons, gpu.heads + gpu.neurons):
        assert theirs.device.type == "cuda"
        torch.testing.assert_close(theirs.cpu(), mine, atol=1e-4, rtol=1e-3)


def test_magnitude_by_hand():
    config = CompressBertConfig(vocab_size=10, hidden_size=2, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=2)
    m = CompressBertForSequenceClassification(config)
    attn, ffn = m.bert.encoder.attention[0], m.bert.encoder.ffn[0]
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value, attn.dense, ffn.intermediate, ffn.output):
            lin.weight.fill_(1.0)
        attn.query.weight[1] = 2.0  # head 1 (width 1): query row 1 is 2, 2 = 4 -> 4+4 + 2 (key) + 2 (value) + 2 (dense)
        ffn.output.weight[:, 0] = 3.0  # neuron 0: 1+1 (intermediate row) + 9+9 (output column)
    scores = magnitude_importance(m)
    torch.testing.assert_close(scores.heads[0], torch.tensor([8.0, 14.0]).sqrt())
    torch.testing.assert_close(scores.neurons[0], torch.tensor([20.0, 4.0]).sqrt())


# --- physical removal
def test_shapes_after_slicing(model):
    slice_heads(model, [[0, 2], [1], [0, 1, 2, 3], []])
    slice_neurons(model, [list(range(0, 64, 2)), [3], list(range(64)), list(range(10))])
    enc, c = model.bert.encoder, model.config
    assert c.attention_heads == [2, 1, 4, 0] and c.intermediate_sizes == [32, 1, 64, 10]
    assert enc.attention[1].query.weight.shape == (8, 32) and enc.attention[1].dense.weight.shape == (32, 8)
    assert enc.attention[3].key.weight.shape == (0, 32) and enc.attention[3].heads == 0
    assert enc.ffn[0].intermediate.weight.shape == (32, 32) and enc.ffn[0].output.weight.shape == (32, 32)
    assert enc.ffn[1].output.weight.shape == (32, 1)
    rebuilt = CompressBertForSequenceClassification(CompressBertConfig.from_dict(c.to_dict()))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in rebuilt.parameters())


def test_masked_model_equals_sliced_model(model):
    heads = [[0, 2], [1], [0, 1, 2, 3], []]
    neurons = [list(range(0, 64, 2)), [3], list(range(64)), list(range(10))]
    head_masks = [torch.tensor([float(h in keep) for h in range(4)]) for keep in heads]
    neuron_masks = [torch.tensor([float(n in keep) for n in range(64)]) for keep in neurons]
    with torch.no_grad(), masked(model, head_masks, neuron_masks):
        expected = model(**batch()).logits
    slice_neurons(slice_heads(model, heads), neurons)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, expected, atol=1e-6, rtol=0)


def test_dropping_layers_equals_distills_layer_copy(parent, model):
    from compress.models.loading import student_from_teacher

    drop_layers(model, [1, 3])
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.attention) == 2
    with torch.no_grad():
        expected = student_from_teacher(parent, [0, 2]).eval()(**batch()).logits
        torch.testing.assert_close(model(**batch()).logits, expected, atol=1e-6, rtol=0)


def test_dropping_layers_of_shared_modules_renumbers_them():
    config = CompressBertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=8, attention_map=[0, 0, 1, 1], ffn_map=[0, 1, 2, 3],
                                attention_heads=[2, 1], intermediate_sizes=[8, 7, 6, 5])
    m = CompressBertForSequenceClassification(config)
    second = m.bert.encoder.attention[1]
    drop_layers(m, [0, 1])
    c = m.config
    assert (c.attention_map, c.ffn_map, c.attention_heads, c.intermediate_sizes) == ([0, 0], [0, 1], [1], [6, 5])
    assert m.bert.encoder.attention[0] is second and m.bert.encoder.attention_map == [0, 0]
    CompressBertConfig.from_dict(c.to_dict())  # still a consistent config


def test_sparsity_is_made_permanent(model):
    apply_sparsity(model, 0.4)
    assert abs(sparsity_of(model) - 0.4) < 0.01
    make_permanent(model)
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    q = model.bert.encoder.attention[0].query.weight
    assert isinstance(q, torch.nn.Parameter) and abs((q == 0).float().mean().item() - 0.4) < 0.01


def test_flops_by_hand(model):
    # per layer, H=32, 4 heads of 8, FFN 64, S=128: qkv 2*32*32*3, scores 2*128*32*2, out 2*32*32, FFN 2*32*64*2
    layer = 6144 + 16384 + 2048 + 8192
    head = (2 * 32 * 32 + 2 * 32 * 2) / 128
    assert flops_per_token(model.config) == 4 * layer + head
    slice_heads(model, [[0, 1]] * 4)
    slice_neurons(model, [list(range(32))] * 4)
    drop_layers(model, [3])
    assert flops_per_token(model.config) == 3 * layer / 2 + head
    # ELECTRA-small's layout adds its 16 -> 32 projection of every token, whether it is ELECTRA's config or ours
    from transformers import ElectraConfig, ElectraForSequenceClassification

    electra = ElectraConfig(vocab_size=30, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=64)
    project = 2 * 16 * 32
    assert flops_per_token(electra) == 4 * layer + head + project
    assert flops_per_token(from_bert(ElectraForSequenceClassification(electra)).config) == 4 * layer + head + project


# --- the command
def _run(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(["prune", *args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pruned(tiny_teacher, tiny_data, tmp_path_factory):
    """One CLI run with every kind of pruning at once and one recovery epoch."""
    root = tmp_path_factory.mktemp("prune")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["prune", "--model", str(tiny_teacher), "--data", str(tiny_data), "--heads", "0.5", "--ffn", "0.25",
              "--drop-layers", "1", "--sparsity", "0.3", "--scope", "global", "--recover-epochs", "1",
              "--importance-batches", "2", "--latency-reps", "1", "--max-train", "64", "--output", "out"])
    return root


@pytest.fixture(scope="module")
def tracking(pruned) -> str:
    # later runs log to the same store: a new sqlite store costs seconds of schema migrations
    return f"sqlite:///{pruned}/mlruns/mlflow.db"


def test_cli_end_to_end(pruned):
    import mlflow

    out = pruned / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and sum(config["attention_heads"]) == 6
    assert sum(config["intermediate_sizes"]) == 144 and min(config["attention_heads"]) >= 0
    assert not (pruned / "out.partial").exists()
    lineage = json.loads((out / "compress.json").read_text())
    assert lineage["command"] == "prune" and lineage["pruning"]["drop_layers"] == "[3]"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pruned}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("compress").experiment_id])
    (run,) = [r for r in runs if r.data.params.get("output") == "out"]
    m = run.data.metrics
    for key in ("student_score", "teacher_score", "retention", "compression", "student_mb", "latency_ms",
                "speedup", "heads_kept", "ffn_kept", "layers_kept", "sparsity", "flops_ratio",
                "score_before_recovery"):
        assert key in m, key
    assert (m["heads_kept"], m["ffn_kept"], m["layers_kept"]) == (6, 144, 3)
    assert m["flops_ratio"] == pytest.approx(flops_per_token(CompressBertConfig.from_dict(config)) / (4 * 32768 + 17))
    # the zeros the metric reports are the zeros that were saved
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    enc = [v for k, v in weights.items() if ".encoder." in k and k.endswith("weight") and "LayerNorm" not in k]
    assert sum(int((w == 0).sum()) for w in enc) / sum(w.numel() for w in enc) == pytest.approx(m["sparsity"])


def test_reload_on_both_load_paths(pruned, tmp_path):
    out = pruned / "out"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert isinstance(model, CompressBertForSequenceClassification)
    with torch.no_grad():
        expected = model(**batch()).logits
    elsewhere, _ = logits_without_compress(out, batch(), tmp_path)
    torch.testing.assert_close(elsewhere, expected, atol=0, rtol=0)


def test_cli_without_recovery_saves_the_pruned_model_as_scored(tiny_teacher, tiny_data, tracking, workdir, capsys):
    code, err = _run(["--model", str(tiny_teacher), "--data", str(tiny_data), "--ffn", "0.5", "--criterion",
                      "magnitude", "--recover_epochs", "0", "--latency_reps", "1", "--output", "out",
                      "--tracking", tracking], capsys)
    assert code == 0, err
    metrics = json.loads((workdir / "out" / "compress.json").read_text())["metrics"]
    assert metrics["student_score"] == metrics["score_before_recovery"]
    assert metrics["ffn_kept"] == 128 and metrics["heads_kept"] == 16 and metrics["sparsity"] == 0


def test_cli_recovery_reads_the_parents_cached_logits(tiny_teacher, tiny_data, tracking, workdir, capsys):
    """A second prune of the same parent and data (here: another ratio) skips the parent, reading its logits."""
    common = ["--model", str(tiny_teacher), "--data", str(tiny_data), "--recover_epochs", "1", "--alpha_hidden", "0",
              "--cache_teacher", "--teacher_cache", "cache", "--latency_reps", "1", "--tracking", tracking]
    code, err = _run([*common, "--ffn", "0.5", "--output", "first"], capsys)
    assert code == 0, err
    assert "teacher logits cached in" in err
    code, err = _run([*common, "--ffn", "0.25", "--output", "second"], capsys)
    assert code == 0, err
    assert "; the teacher is not run" in err
    assert json.loads((workdir / "second" / "compress.json").read_text())["metrics"]["ffn_kept"] == 192


@pytest.mark.parametrize("args, flag", [
    (["--heads", "1.0"], "--heads"),
    (["--ffn", "-0.1"], "--ffn"),
    (["--sparsity", "1"], "--sparsity"),
    (["--heads", "0.5", "--drop_layers", "[4]"], "--drop_layers"),
    (["--drop-layers", "0,1,2,3"], "--drop_layers"),
    (["--drop-layers", "1,1"], "--drop_layers"),
    (["--heads", "0.5", "--scope", "model"], "--scope"),
    (["--heads", "0.5", "--recover_epochs", "-1"], "--recover_epochs"),
    (["--heads", "0.5", "--cache_teacher"], "--cache_teacher"),  # the default hidden loss needs the live parent
    ([], "nothing to prune"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, flag, tiny_teacher, tiny_data, workdir, capsys):
    code, err = _run(["--model", str(tiny_teacher), "--data", str(tiny_data), *args], capsys)
    assert code == 1 and err.startswith("compress: error: ") and flag in err and err.count("\n") == 1, err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("model_type", ["gpt2", "albert"])
def test_non_bert_model_is_refused(model_type, tmp_path_factory, tiny_data, workdir, capsys):
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp(model_type)
    AutoConfig.for_model(model_type).save_pretrained(folder)
    code, err = _run(["--model", str(folder), "--data", str(tiny_data), "--heads", "0.5"], capsys)
    assert code == 1 and "not a BERT-family encoder" in err and "--model" in err and err.count("\n") == 1, err
    assert list(workdir.iterdir()) == []


def test_prune_takes_every_encoder_distill_takes():
    """prune checks only models.ENCODER_TYPES, so each of them must convert weight for weight."""
    from compress.models.compress_bert.convert import CONVERTIBLE_TYPES
    from compress.models.loading import ENCODER_TYPES

    assert ENCODER_TYPES <= set(CONVERTIBLE_TYPES)


def prune_cli(parent: Path, tiny_data: Path, tracking: str, workdir: Path, capsys) -> dict:
    """`compress prune` of half the heads and FFN neurons and one layer of a tiny 4-layer parent into workdir/out;
    returns its config."""
    code, err = _run(["--model", str(parent), "--data", str(tiny_data), "--heads", "0.5", "--ffn", "0.5",
                      "--drop-layers", "1", "--recover-epochs", "1", "--importance-batches", "2", "--max-train", "64",
                      "--latency-reps", "1", "--tracking", tracking, "--output", "out"], capsys)
    assert code == 0, err
    config = json.loads((workdir / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["attention_heads"] == [2, 2, 2] and config["intermediate_sizes"] == [32, 32, 32]
    return config


def tiny_layer_params(heads: int, ffn: int) -> int:
    """One layer of the tiny parents (H 32, heads 8 wide): q, k, v; output projection; norm; FFN in and out; norm."""
    return 3 * (32 * heads * 8 + heads * 8) + (heads * 8 * 32 + 32) + 2 * 32 + (32 * ffn + ffn + ffn * 32 + 32) + 2 * 32


@pytest.mark.parametrize(("model_type", "extra"), [("electra", {"embedding_size": 16}),
                                                   ("ernie", {"use_task_id": True, "task_type_vocab_size": 3}),
                                                   ("distilbert", {})])
def test_cli_prunes_an_electra_small_an_ernie_and_a_distilbert(model_type, extra, tiny_data, tracking, workdir,
                                                               tmp_path_factory, capsys):
    """ELECTRA-small's 16-wide embeddings and projection, ERNIE's task embedding (folded into the token types) and
    DistilBERT's lack of token types (one zero row) come through pruning; the head counts and FFN widths are cut as
    in BERT, and the result reloads without compress."""
    parent = save_tiny_bert(tmp_path_factory.mktemp(model_type) / "parent", model_type=model_type, **extra)
    config = prune_cli(parent, tiny_data, tracking, workdir, capsys)
    out = workdir / "out"
    assert config["pooler_act"] == {"electra": "gelu", "distilbert": "relu"}.get(model_type, "tanh")
    layer = tiny_layer_params  # 3 layers of 2 heads and 32 neurons, over the parent's 4 of 4 heads and 64 neurons
    vocab = len(AutoTokenizer.from_pretrained(parent))
    e = 16 if model_type == "electra" else 32  # the embedding block's width
    types = 1 if model_type == "distilbert" else 2  # DistilBERT's none become one zero row
    rest = (vocab + 128 + types) * e + 2 * e + (32 * 32 + 32) + (32 * 2 + 2)  # tables, norm, pooler/dense, head
    rest += (16 * 32 + 32) if model_type == "electra" else 0  # embeddings_project, 16 -> 32
    # what the parent has that the pruned model does not: ERNIE's task table (folded away), or, from DistilBERT,
    # less: the zero token-type row
    extra_params = {"ernie": 3 * 32, "distilbert": -32}.get(model_type, 0)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert sum(p.numel() for p in model.parameters()) == 3 * layer(2, 32) + rest
    parent_model = AutoModelForSequenceClassification.from_pretrained(parent)
    assert sum(p.numel() for p in parent_model.parameters()) == 4 * layer(4, 64) + rest + extra_params
    b = batch()
    with torch.no_grad():
        expected = model(**b).logits
    elsewhere, _ = logits_without_compress(out, b, workdir)
    torch.testing.assert_close(elsewhere, expected, atol=0, rtol=0)


def test_cli_prunes_a_roberta(tiny_data, tracking, workdir, tmp_path_factory, capsys):
    """RoBERTa converts weight for weight, so prune runs on it as on BERT; the result keeps RoBERTa's position ids
    and BPE tokenizer (pad id 1, no token types) and reloads where compress is not installed."""
    parent = save_tiny_roberta(tmp_path_factory.mktemp("roberta") / "parent")
    config = prune_cli(parent, tiny_data, tracking, workdir, capsys)
    out = workdir / "out"
    assert config["roberta_positions"] and config["pad_token_id"] == 1
    # 3 layers of 2 heads x 8 wide and 32 FFN neurons, over the parent's 4 layers of 4 heads and 64 neurons
    layer = tiny_layer_params
    vocab = len(AutoTokenizer.from_pretrained(parent))
    rest = vocab * 32 + 130 * 32 + 1 * 32 + 2 * 32 + (32 * 32 + 32) + (32 * 2 + 2)  # embeddings, norm, pooler, head
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert sum(p.numel() for p in model.parameters()) == 3 * layer(2, 32) + rest
    parent_model = AutoModelForSequenceClassification.from_pretrained(parent)
    assert sum(p.numel() for p in parent_model.parameters()) == 4 * layer(4, 64) + rest
    b = batch()
    b["input_ids"][0, 6:] = 1  # RoBERTa's pad id
    with torch.no_grad():
        expected = model(**b).logits
    elsewhere, name = logits_without_compress(out, b, workdir)
    assert name == "CompressBertForSequenceClassification"
    torch.testing.assert_close(elsewhere, expected, atol=0, rtol=0)
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "RobertaTokenizer"  # the parent's, saved beside it
