"""compress share: the conversion maths, the BERT -> ALBERT / CompressBert weight mapping, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import logits_without_compress, padded_batch, save_tiny_bert, save_tiny_roberta
from transformers import AlbertForSequenceClassification, AutoModelForSequenceClassification

from compress.cli.main import main
from compress.models.measure import count_params
from compress.models.compress_bert import CompressBertForSequenceClassification
from compress.steps.share import calibration_batches, convert
from compress.sharing.convert import (albert_param_count, compress_shared_param_count, input_grams, layer_groups,
    merge_layers, pad_layers, regmean, to_albert, to_compress_shared, truncated_svd)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**padded_batch()).logits


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().err


# --- maths -----------------------------------------------------------------------------------------------------

def test_layer_groups_are_consecutive_and_cover_every_group():
    assert layer_groups(6, 1) == [0] * 6
    assert layer_groups(6, 2) == [0, 0, 0, 1, 1, 1]
    assert layer_groups(6, 4) == [0, 0, 1, 2, 2, 3]
    assert layer_groups(12, 12) == list(range(12))
    for layers in range(1, 25):
        for groups in range(1, layers + 1):
            g = layer_groups(layers, groups)
            assert sorted(set(g)) == list(range(groups)) and g == sorted(g)
    with pytest.raises(ValueError):
        layer_groups(4, 5)


def test_truncated_svd_reproduces_a_matrix_at_its_rank():
    gen = torch.Generator().manual_seed(0)
    # (V=50, H=16) of rank 6, in float64 so that rank 6 is exact and the error is float64 round-off
    f64 = dict(generator=gen, dtype=torch.float64)
    low_rank = torch.randn(50, 6, **f64) @ torch.randn(6, 16, **f64)
    a, b, error = truncated_svd(low_rank, 6)
    assert a.shape == (50, 6) and b.shape == (6, 16) and error < 1e-12
    torch.testing.assert_close(a @ b, low_rank, atol=1e-10, rtol=0)
    _, _, error_full = truncated_svd(low_rank, 16)  # E = H = full rank: exact
    assert error_full < 1e-12
    # below the rank, the error is the discarded singular values' share (Eckart-Young)
    s = torch.linalg.svdvals(low_rank)
    _, _, error_4 = truncated_svd(low_rank, 4)
    assert error_4 == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-9)


def test_regmean_beats_the_mean_on_its_own_objective_and_keeps_equal_layers():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 5, generator=gen) for _ in range(2)]
    biases = [torch.randn(3, generator=gen) for _ in range(2)]
    inputs = [torch.randn(40, 5, generator=gen) * torch.tensor([3.0, 1, 1, 0.1, 0.1]) + 1 for _ in range(2)]
    grams = [torch.cat([x, torch.ones(40, 1)], 1).T @ torch.cat([x, torch.ones(40, 1)], 1) for x in inputs]

    def loss(w, b):
        return sum(((x @ w.T + b) - (x @ wl.T + bl)).pow(2).sum() for x, wl, bl in zip(inputs, weights, biases))

    w, b = regmean(weights, biases, grams, alpha=1.0)
    assert loss(w, b) < loss(sum(weights) / 2, sum(biases) / 2)
    same_w, same_b = regmean([weights[0]] * 2, [biases[0]] * 2, grams)
    torch.testing.assert_close(same_w, weights[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(same_b, biases[0], atol=1e-5, rtol=0)
    layers = [{"output.LayerNorm.weight": torch.ones(2)}, {"output.LayerNorm.weight": torch.zeros(2)}]
    assert merge_layers(layers, "mean")["output.LayerNorm.weight"].tolist() == [0.5, 0.5]
    assert merge_layers(layers, "first")["output.LayerNorm.weight"].tolist() == [1.0, 1.0]


# --- the weight mapping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["mean", "first", "regmean"])
def test_a_group_per_layer_is_the_teacher_itself(bert, init):
    batches = [padded_batch()] if init == "regmean" else None
    expected = bert(**padded_batch(), output_hidden_states=True)
    albert, error = convert(bert, share="all", groups=4, embedding=None, init=init, batches=batches)
    assert isinstance(albert, AlbertForSequenceClassification) and error == 0.0
    out = albert.eval()(**padded_batch(), output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(expected.hidden_states)  # distillation pairs them layer by layer
    for mine, theirs in zip(out.hidden_states[1:], expected.hidden_states[1:], strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    for kind in ("attention", "ffn"):
        shared, _ = convert(bert, share=kind, groups=4, embedding=None, init=init, batches=batches)
        torch.testing.assert_close(logits(shared), expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_albert_runs_each_layer_with_its_groups_weights(bert, groups):
    """With init first, ALBERT must equal the teacher with every layer overwritten by its group's first layer."""
    import copy

    which = layer_groups(4, groups)
    reference = copy.deepcopy(bert)
    for i, g in enumerate(which):
        reference.bert.encoder.layer[i].load_state_dict(bert.bert.encoder.layer[which.index(g)].state_dict())
    albert, _ = to_albert(bert, groups, None, "first")
    torch.testing.assert_close(logits(albert), logits(reference), atol=1e-5, rtol=0)
    for kind in ("attention", "ffn"):
        reference = copy.deepcopy(bert)
        for i, g in enumerate(which):
            source, target = bert.bert.encoder.layer[which.index(g)], reference.bert.encoder.layer[i]
            for sub in (("attention",) if kind == "attention" else ("intermediate", "output")):
                getattr(target, sub).load_state_dict(getattr(source, sub).state_dict())
        shared, _ = convert(bert, share=kind, groups=groups, embedding=None, init="first")
        torch.testing.assert_close(logits(shared), logits(reference), atol=1e-5, rtol=0)


def test_factorised_embeddings_are_exact_when_the_tables_have_low_rank(bert):
    """ALBERT's E-wide tables, E-wide LayerNorm and E -> H mapping reproduce BERT's embedding output exactly
    when the (row-centred) word, position and type tables fit in E - 1 dimensions; CompressBert's in E."""
    import copy

    low = copy.deepcopy(bert)
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(5, 32, generator=gen)  # rank 5 in H = 32, plus a per-row offset LayerNorm removes
    with torch.no_grad():
        emb = low.bert.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            n = table.weight.shape[0]
            table.weight.copy_(torch.randn(n, 5, generator=gen) @ basis + torch.randn(n, 1, generator=gen))
    expected = logits(low)
    albert, error = convert(low, share="all", groups=4, embedding=6, init="mean")
    assert albert.config.embedding_size == 6 and error < 1e-6
    torch.testing.assert_close(logits(albert), expected, atol=1e-5, rtol=0)
    compress_model, error = convert(low, share="attention", groups=4, embedding=5, init="mean")
    assert error < 1e-6
    torch.testing.assert_close(logits(compress_model), expected, atol=1e-5, rtol=0)
    # on the real (full-rank) random tables a small E loses something, and says how much
    _, error = convert(bert, share="all", groups=4, embedding=8, init="mean")
    assert 0.05 < error < 1


@pytest.mark.parametrize(("kind", "groups", "embedding"),
                         [("all", 1, None), ("all", 2, 8), ("attention", 1, None), ("ffn", 3, 8)])
def test_parameter_count_matches_the_formula(bert, kind, groups, embedding):
    model, _ = convert(bert, share=kind, groups=groups, embedding=embedding, init="mean")
    c = bert.config
    sizes = dict(vocab=c.vocab_size, positions=c.max_position_embeddings, types=c.type_vocab_size,
                 hidden=c.hidden_size, intermediate=c.intermediate_size, labels=c.num_labels)
    if kind == "all":
        expected = albert_param_count(**sizes, groups=groups, embedding=embedding or c.hidden_size)
    else:
        expected = compress_shared_param_count(
            **sizes, layers=4, embedding=embedding, attention_modules=groups if kind == "attention" else 4,
            ffn_modules=groups if kind == "ffn" else 4)
    assert count_params(model) == expected
    assert count_params(model) < count_params(bert)


# --- saved models load without compress ------------------------------------------------------------------------

def load_elsewhere(folder: Path, tmp: Path, trust: bool = False) -> tuple[torch.Tensor, str]:
    """Logits of `folder` on padded_batch(), loaded by transformers in a fresh interpreter without compress."""
    return logits_without_compress(folder, padded_batch(), tmp, trust)


def test_cli_share_all_writes_an_albert_that_transformers_loads_alone(tiny_teacher, tiny_data, workdir, capsys):
    code, err = run_cli(["share", "--model", str(tiny_teacher), "--data", str(tiny_data), "--groups", "2",
                         "--embedding", "12", "--recover-epochs", "0", "--output", "out", "--latency_reps", "1"],
                        capsys)
    assert code == 0, err
    assert "before recovery" in err and "svd_error" in err
    # the CLI's conversion, recomputed in memory: same rows, same seed
    from compress.data.tasks import load_task
    from compress.data.datamodule import TaskDataModule
    from compress.models.loading import load_tokenizer

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    dm = TaskDataModule(load_task(data=str(tiny_data)), load_tokenizer(str(tiny_teacher)), seed=42)
    in_memory, _ = convert(teacher, share="all", groups=2, embedding=12, init="regmean",
                           batches=calibration_batches(dm, 256, 32))
    reloaded, name = load_elsewhere(workdir / "out", workdir)
    assert name == "AlbertForSequenceClassification"
    torch.testing.assert_close(reloaded, logits(in_memory), atol=1e-6, rtol=0)
    config = json.loads((workdir / "out" / "config.json").read_text())
    assert (config["model_type"], config["embedding_size"], config["num_hidden_groups"], config["inner_group_num"],
            config["hidden_act"]) == ("albert", 12, 2, 1, "gelu")
    metrics = json.loads((workdir / "out" / "compress.json").read_text())["metrics"]
    for key in ("student_score", "teacher_score", "retention", "student_params", "teacher_params", "compression",
                "student_mb", "latency_ms", "speedup", "groups", "embedding_size", "svd_error",
                "score_before_recovery"):
        assert key in metrics, key
    assert metrics["score_before_recovery"] == metrics["student_score"]  # nothing trained in between
    assert (metrics["groups"], metrics["embedding_size"]) == (2, 12) and 0 < metrics["svd_error"] < 1
    # compress evaluate reads it back like any other model
    code, err = run_cli(["evaluate", "--model", "out", "--data", str(tiny_data), "--latency_reps", "1"], capsys)
    assert code == 0, err


def test_cli_share_recovery_with_cached_teacher_logits_trains_as_with_the_live_teacher(tiny_teacher, tiny_data,
                                                                                       workdir, capsys):
    """--cache_teacher: the same student as a live-teacher run, and the next run reads the logits from disk."""
    from safetensors.torch import load_file

    common = ["share", "--model", str(tiny_teacher), "--data", str(tiny_data), "--groups", "2", "--recover_epochs",
              "2", "--alpha_hidden", "0", "--latency_reps", "1", "--teacher_cache", "cache",
              "--tracking", f"sqlite:///{workdir}/mlruns/mlflow.db"]
    code, err = run_cli([*common, "--output", "live"], capsys)
    assert code == 0, err
    code, err = run_cli([*common, "--output", "cached", "--cache_teacher"], capsys)
    assert code == 0, err
    assert "teacher logits cached in" in err
    (stored,) = (workdir / "cache" / "logits").glob("*.safetensors")
    assert load_file(stored)["logits"].shape == (96, 2)  # every training row, both labels
    code, err = run_cli([*common, "--output", "reread", "--cache_teacher"], capsys)
    assert code == 0, err
    assert f"read from {stored.relative_to(workdir)}; the teacher is not run" in err

    live, cached, reread = (load_file(workdir / name / "model.safetensors") for name in ("live", "cached", "reread"))
    assert live.keys() == cached.keys() == reread.keys()
    for key in live:
        # cached rows were scored in epoch 1's batches, padded otherwise than epoch 2's: equal to rounding
        torch.testing.assert_close(cached[key], live[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(reread[key], cached[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["attention", "ffn"])
def test_cli_share_attention_or_ffn_recovers_and_loads_with_its_code(tiny_teacher, tiny_data, workdir, capsys, kind):
    code, err = run_cli(["share", "--model", str(tiny_teacher), "--data", str(tiny_data), "--share", kind,
                         "--groups", "1", "--init", "mean", "--recover_epochs", "1", "--batch_size", "32",
                         "--output", "out", "--latency_reps", "1", "--max_length", "16"]
                        + (["--embedding", "16"] if kind == "attention" else []), capsys)
    assert code == 0, err
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "out")
    assert isinstance(model, CompressBertForSequenceClassification)
    assert getattr(model.config, f"{'attention' if kind == 'attention' else 'ffn'}_map") == [0, 0, 0, 0]
    assert (workdir / "out" / "modeling_compress_bert.py").exists()
    reloaded, name = load_elsewhere(workdir / "out", workdir, trust=True)
    assert name == "CompressBertForSequenceClassification"
    torch.testing.assert_close(reloaded, logits(model), atol=1e-6, rtol=0)
    metrics = json.loads((workdir / "out" / "compress.json").read_text())["metrics"]
    assert metrics["embedding_size"] == (16 if kind == "attention" else 32)
    assert metrics["student_params"] < metrics["teacher_params"]


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def not_bert(tiny_root) -> Path:
    from transformers import GPT2Config

    folder = tiny_root / "gpt2"
    GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("extra", "flag"), [
    (["--groups", "0"], "--groups"),
    (["--groups", "5"], "--groups"),
    (["--embedding", "32"], "--embedding"),
    (["--embedding", "48", "--share", "attention"], "--embedding"),
    (["--share", "heads"], "--share"),
    (["--init", "svd"], "--init"),
    (["--recover_epochs=-1"], "--recover_epochs"),
    (["--cache_teacher"], "--cache_teacher"),  # with the default hidden-state loss, which needs the live teacher
    (["NOT_BERT"], "--model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_teacher, tiny_data, not_bert, workdir, capsys, extra, flag):
    model = str(not_bert) if extra == ["NOT_BERT"] else str(tiny_teacher)
    extra = [] if extra == ["NOT_BERT"] else extra
    code, err = run_cli(["share", "--model", model, "--data", str(tiny_data), *extra], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compress: error: ") and flag in lines[0], err
    assert list(workdir.iterdir()) == []  # no outputs/, no mlruns/


# --- RoBERTa and the models built on it -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def roberta_folder(tiny_root) -> Path:
    return save_tiny_roberta(tiny_root / "roberta")


def roberta_batch() -> dict:
    b = padded_batch()
    b["input_ids"][0, 6:] = 1  # RoBERTa's pad id on the padded positions, as its tokenizer writes them
    return b


def share_and_reload(folder: Path, args: list[str], inputs: dict, tiny_data: Path, workdir: Path, capsys,
                     said: list[str] | None = None) -> dict:
    """`compress share` on `folder` with `args` into workdir/out (2 groups, 1 recovery epoch on 64 rows); the model
    written loads without compress (through its saved code unless it is an ALBERT) with the same logits on `inputs`.
    Returns its config; `said`, if given, receives what the command printed to stderr."""
    code, err = run_cli(["share", "--model", str(folder), "--data", str(tiny_data), "--groups", "2", *args,
                         "--recover-epochs", "1", "--max_train", "64", "--output", "out", "--latency_reps", "1"],
                        capsys)
    assert code == 0, err
    if said is not None:
        said.append(err)
    config = json.loads((workdir / "out" / "config.json").read_text())
    albert = config["model_type"] == "albert"
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "out").eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    elsewhere, name = logits_without_compress(workdir / "out", inputs, workdir, trust=not albert)
    assert name == ("AlbertForSequenceClassification" if albert else "CompressBertForSequenceClassification")
    torch.testing.assert_close(elsewhere, expected, atol=1e-6, rtol=0)
    return config


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_a_group_per_layer_is_the_roberta_itself(model_type, tmp_path):
    """RoBERTa's weights map onto ALBERT (its position table shifted by pad + 1) and CompressBert exactly."""
    roberta = AutoModelForSequenceClassification.from_pretrained(save_tiny_roberta(tmp_path, model_type)).eval()
    b = roberta_batch()
    real = b["attention_mask"].bool()
    expected = roberta(**b, output_hidden_states=True)
    albert, error = convert(roberta, share="all", groups=4, embedding=None, init="regmean", batches=[b])
    assert isinstance(albert, AlbertForSequenceClassification) and error == 0.0
    assert albert.config.max_position_embeddings == 130 - 2
    out = albert.eval()(**b, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    for mine, theirs in zip(out.hidden_states[1:], expected.hidden_states[1:], strict=True):
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=0)  # padding sits at other positions
    for kind in ("attention", "ffn"):
        shared, _ = convert(roberta, share=kind, groups=4, embedding=None, init="mean")
        assert shared.config.roberta_positions
        torch.testing.assert_close(shared.eval()(**b).logits, expected.logits, atol=1e-5, rtol=0)


def test_roberta_shares_into_one_group_as_its_first_layer(roberta_folder):
    """groups 1, init first: every layer runs layer 0's weights; so must the converted model."""
    import copy

    roberta = AutoModelForSequenceClassification.from_pretrained(roberta_folder).eval()
    reference = copy.deepcopy(roberta)
    for layer in reference.roberta.encoder.layer:
        layer.load_state_dict(roberta.roberta.encoder.layer[0].state_dict())
    expected = reference(**roberta_batch()).logits
    albert, _ = to_albert(roberta, 1, None, "first")
    torch.testing.assert_close(albert.eval()(**roberta_batch()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["all", "attention"])
def test_cli_shares_a_roberta(roberta_folder, tiny_data, workdir, capsys, kind):
    config = share_and_reload(roberta_folder, ["--share", kind, "--embedding", "12"], roberta_batch(), tiny_data,
                              workdir, capsys)
    if kind == "all":  # ALBERT numbers positions from 0: RoBERTa's 130-row table loses its first pad + 1 rows
        assert (config["max_position_embeddings"], config["num_hidden_groups"]) == (128, 2)
    else:
        assert config["roberta_positions"] and config["attention_map"] == [0, 0, 1, 1]
    metrics = json.loads((workdir / "out" / "compress.json").read_text())["metrics"]
    assert metrics["student_params"] < metrics["teacher_params"] and metrics["embedding_size"] == 12


# --- ELECTRA and ERNIE ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def electra_folder(tiny_root) -> Path:
    """ELECTRA-small's layout: 16-wide embeddings projected to the 32-wide layers, a gelu head."""
    return save_tiny_bert(tiny_root / "electra", model_type="electra", embedding_size=16)


@pytest.fixture(scope="module")
def ernie_folder(tiny_root) -> Path:
    return save_tiny_bert(tiny_root / "ernie", model_type="ernie", use_task_id=True, task_type_vocab_size=3)


@pytest.fixture(scope="module")
def distilbert_folder(tiny_root) -> Path:
    return save_tiny_bert(tiny_root / "distilbert", model_type="distilbert")


def test_a_group_per_layer_is_the_electra_ernie_or_distilbert_itself(electra_folder, ernie_folder,
                                                                      distilbert_folder):
    """An ELECTRA (its projection and gelu head kept) and a DistilBERT (its ReLU head) map onto CompressBert exactly,
    an ERNIE onto ALBERT and CompressBert (its task embedding folded into the token types); neither ELECTRA nor
    DistilBERT can be an ALBERT (tanh head). regmean records DistilBERT's Linears under its own names."""
    b = padded_batch()
    electra, ernie, distilbert = (AutoModelForSequenceClassification.from_pretrained(f).eval()
                                  for f in (electra_folder, ernie_folder, distilbert_folder))
    for parent, kinds in ((electra, ("attention", "ffn")), (ernie, ("all", "attention", "ffn")),
                          (distilbert, ("attention", "ffn"))):
        expected = parent(**b).logits
        for kind in kinds:
            shared, _ = convert(parent, share=kind, groups=4, embedding=None, init="mean")
            torch.testing.assert_close(shared.eval()(**b).logits, expected, atol=1e-5, rtol=0)
    shared, _ = convert(distilbert, share="ffn", groups=4, embedding=None, init="regmean", batches=[b])
    torch.testing.assert_close(shared.eval()(**b).logits, distilbert(**b).logits, atol=1e-5, rtol=0)
    for model, act in ((electra, "gelu"), (distilbert, "relu")):
        with pytest.raises(ValueError, match=f"cannot become an ALBERT: ALBERT's head is tanh where its is {act}"):
            to_albert(model, 2)


def test_distilbert_grams_are_those_of_its_converted_self(distilbert_folder):
    from compress.models.compress_bert import from_bert

    distilbert = AutoModelForSequenceClassification.from_pretrained(distilbert_folder).eval()
    theirs, ours = input_grams(distilbert, [padded_batch()]), input_grams(from_bert(distilbert), [padded_batch()])
    for mine, expected in zip(ours, theirs, strict=True):
        for key in expected:
            torch.testing.assert_close(mine[key], expected[key])


@pytest.mark.parametrize(("parent", "kind"), [("electra", "attention"), ("ernie", "all"), ("distilbert", "ffn")])
def test_cli_shares_an_electra_an_ernie_and_a_distilbert(parent, kind, electra_folder, ernie_folder,
                                                         distilbert_folder, tiny_data, workdir, capsys):
    folder = {"electra": electra_folder, "ernie": ernie_folder, "distilbert": distilbert_folder}[parent]
    embedding = ["--embedding", "12"] if parent == "ernie" else []
    config = share_and_reload(folder, ["--share", kind, *embedding], padded_batch(), tiny_data, workdir, capsys)
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "out")
    if parent == "electra":
        assert (config["projected_embedding_size"], config["pooler_act"]) == (16, "gelu")
        assert config["attention_map"] == [0, 0, 1, 1]
    elif parent == "distilbert":
        assert (config["pooler_act"], config["type_vocab_size"], config["ffn_map"]) == ("relu", 1, [0, 0, 1, 1])
    else:  # ERNIE's 3 task types x 32 are gone, folded into the token-type rows
        assert (config["embedding_size"], config["num_hidden_groups"]) == (12, 2)
        vocab = config["vocab_size"]
        assert count_params(model) == albert_param_count(vocab=vocab, positions=128, types=2, hidden=32,
                                                         intermediate=64, groups=2, embedding=12, labels=2)


@pytest.fixture(scope="module")
def compress_bert_folder(tiny_root) -> Path:
    from compress.models.compress_bert import CompressBertConfig

    folder = tiny_root / "compress_bert"  # what `share --share attention --groups 1` writes from a 2-layer BERT
    CompressBertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, attention_map=[0, 0]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("parent", "extra", "flag", "why"), [
    ("electra", ["--share", "all"], "--share all", "gelu"),
    ("distilbert", ["--share", "all"], "--share all", "relu"),
    ("electra", ["--share", "attention", "--embedding", "8"], "--embedding 8", "already 16 wide"),
    ("compress_bert", [], "--model", "already shares modules"),
])
def test_share_refuses_what_it_cannot_map(parent, extra, flag, why, electra_folder, distilbert_folder,
                                          compress_bert_folder, tiny_data, workdir, capsys):
    folder = {"electra": electra_folder, "distilbert": distilbert_folder}.get(parent, compress_bert_folder)
    code, err = run_cli(["share", "--model", str(folder), "--data", str(tiny_data), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and flag in lines[0] and why in lines[0], err
    assert list(workdir.iterdir()) == []


# --- a pruned model (prune, then share) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(bert):
    """The tiny BERT with layers cut to 3, 1, 2 and 0 heads and 40, 10, 64 and 5 FFN neurons, as a global prune
    might leave them."""
    import copy

    from compress.models.compress_bert import from_bert
    from compress.pruning import slice_heads, slice_neurons

    model = from_bert(copy.deepcopy(bert)).eval()
    slice_heads(model, [[0, 1, 2], [1], [0, 2], []])
    slice_neurons(model, [list(range(40)), list(range(10)), list(range(64)), list(range(5))])
    return model


def test_zero_heads_and_neurons_pad_a_pruned_layer_without_changing_it(pruned):
    from compress.models.compress_bert import CompressBertForSequenceClassification, to_compress_config
    from compress.models.compress_bert.convert import bert_named_state, rename_key
    from compress.sharing.convert import bert_layers

    state = bert_named_state(pruned)
    layers = pad_layers(bert_layers(state, 4))
    assert layers[3]["attention.self.query.weight"].shape == (3 * 8, 32)  # 0 heads grown to 3 of width 8
    assert layers[3]["output.dense.weight"].shape == (32, 64) and layers[3]["output.dense.bias"].shape == (32,)
    assert not layers[3]["attention.output.dense.weight"].any() and not layers[1]["intermediate.dense.bias"][10:].any()
    padded = CompressBertForSequenceClassification(
        to_compress_config(pruned.config, attention_heads=[3] * 4, intermediate_sizes=[64] * 4)).eval()
    weights = {k: v for k, v in state.items() if not k.startswith("bert.encoder.layer.")}
    weights |= {rename_key(f"bert.encoder.layer.{i}.{k}"): v
                for i, layer in enumerate(layers) for k, v in layer.items()}
    assert not [k for k in padded.load_state_dict(weights, strict=False).missing_keys if "_ids" not in k]
    torch.testing.assert_close(padded(**padded_batch()).logits, pruned(**padded_batch()).logits, atol=1e-6, rtol=0)


def test_a_converted_bert_records_the_same_grams_as_the_bert(bert):
    from compress.models.compress_bert import from_bert

    theirs, ours = input_grams(bert, [padded_batch()]), input_grams(from_bert(bert), [padded_batch()])
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(mine[key], expected[key])


@pytest.mark.parametrize("kind", ["attention", "ffn", "all"])
@pytest.mark.parametrize("init", ["mean", "regmean"])
def test_a_pruned_model_shares_its_layers(pruned, kind, init):
    """A group per layer is the pruned model itself; two groups share modules as large as their largest layer,
    started from the padded layers (mean: their average, counting a missing head or neuron as zero)."""
    grams = input_grams(pruned, [padded_batch()]) if init == "regmean" else None
    same, _ = to_compress_shared(pruned, kind, 4, None, init, grams)
    torch.testing.assert_close(same.eval()(**padded_batch()).logits, pruned(**padded_batch()).logits, atol=0, rtol=0)
    shared, _ = to_compress_shared(pruned, kind, 2, None, init, grams)
    c = shared.config
    attention, ffn = kind in ("attention", "all"), kind in ("ffn", "all")
    assert c.attention_heads == ([3, 2] if attention else [3, 1, 2, 0])
    assert c.intermediate_sizes == ([40, 64] if ffn else [40, 10, 64, 5])
    assert c.attention_map == ([0, 0, 1, 1] if attention else [0, 1, 2, 3])
    assert c.ffn_map == ([0, 0, 1, 1] if ffn else [0, 1, 2, 3])
    if init == "mean" and attention:  # layer 1's one head (old head 1) sits in row block 0, next to layer 0's head 0
        q0, q1 = (pruned.bert.encoder.attention[i].query.weight for i in (0, 1))
        expected = torch.cat([(q0[:8] + q1) / 2, q0[8:] / 2])
        torch.testing.assert_close(shared.bert.encoder.attention[0].query.weight, expected, atol=0, rtol=0)
    assert torch.isfinite(shared.eval()(**padded_batch()).logits).all()


def test_cli_shares_a_pruned_model(pruned, tiny_teacher, tiny_data, workdir, capsys):
    """--share all from a pruned model writes CompressBert (ALBERT has one layer size), which reloads without
    compress; sharing its output again is refused."""
    from transformers import AutoTokenizer

    pruned.save_pretrained(workdir / "pruned")
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(workdir / "pruned")
    said = []
    config = share_and_reload(workdir / "pruned", [], padded_batch(), tiny_data, workdir, capsys, said)  # --share all
    assert config["model_type"] == "compress_bert" and config["attention_map"] == config["ffn_map"] == [0, 0, 1, 1]
    assert (config["attention_heads"], config["intermediate_sizes"]) == ([3, 2], [40, 64])
    metrics = json.loads((workdir / "out" / "compress.json").read_text())["metrics"]
    assert metrics["student_params"] < metrics["teacher_params"] == count_params(pruned)
    # The padded heads and neurons are computed: per layer 768 FLOPs a head-dimension (q, k, v, out: 2*32*4; scores
    # and sum over 128 keys: 2*128*2) and 128 an FFN neuron (in and out: 2*32*2), plus 17 for pooler and classifier.
    # Widths [24, 8, 16, 0] and [40, 10, 64, 5] run as [24, 24, 16, 16] and [40, 40, 64, 64].
    parent, shared = 768 * 48 + 128 * 119 + 17, 768 * 80 + 128 * 208 + 17
    assert metrics["flops_ratio"] == pytest.approx(shared / parent)  # 1.69
    assert "so this model computes 69% more FLOPs per token than its parent and will be slower" in said[0]
    code, err = run_cli(["share", "--model", str(workdir / "out"), "--data", str(tiny_data), "--groups", "1",
                         "--output", "again"], capsys)
    assert code == 1 and "already shares modules" in err and not (workdir / "again").exists()
