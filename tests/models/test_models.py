"""compress.models: layer maps, the DistilBERT-style student, head detection, model resolution and the vocab check."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from compress.infra.errors import CompressError
from compress.models.loading import (check_encoder, check_text_classifier, has_task_head, load_classifier, load_config,
    load_tokenizer, resolve_model, same_tokens, student_from_teacher, teacher_layer_map)

from helpers import save_tiny_bert

# --- teacher_layer_map ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [
        (6, 3, [0, 2, 4]),
        (12, 6, [0, 2, 4, 6, 8, 10]),
        (4, 2, [0, 2]),
        (4, 4, [0, 1, 2, 3]),
        (4, 1, [0]),
        (12, 4, [0, 3, 6, 9]),
        (6, 4, [0, 1, 3, 4]),  # 0*6//4, 1*6//4, 2*6//4, 3*6//4
    ],
)
def test_teacher_layer_map(teacher: int, student: int, expected: list[int]) -> None:
    assert teacher_layer_map(teacher, student) == expected


@pytest.mark.parametrize(("teacher", "student"), [(6, 0), (6, 7), (6, -1), (1, 2)])
def test_teacher_layer_map_bounds(teacher: int, student: int) -> None:
    with pytest.raises(CompressError, match=rf"--layers {student}\b.*{teacher}"):
        teacher_layer_map(teacher, student)


# --- student_from_teacher ---------------------------------------------------------------------------------------------


def _teacher(layers: int = 4, hidden: int = 32, intermediate: int = 64, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=intermediate, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def _n(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_student_param_count_matches_a_shallower_bert_and_the_formula() -> None:
    import copy

    from transformers import BertForSequenceClassification

    teacher = _teacher()
    student = student_from_teacher(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher's config was copied, not changed

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = 2
    assert _n(student) == _n(BertForSequenceClassification(config))

    # one BERT layer: q, k, v, attention-out (H*H + H each), 2 LayerNorms (2H each), FFN in (H*I + I), FFN out (I*H + H)
    h, i = 32, 64
    per_layer = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h)
    assert per_layer == sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
    assert _n(teacher) - _n(student) == 2 * per_layer


def test_student_copies_the_chosen_layers_embeddings_pooler_and_head() -> None:
    teacher = _teacher()
    student = student_from_teacher(teacher, [0, 2])
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2]):
        prefix_s, prefix_t = f"bert.encoder.layer.{new}.", f"bert.encoder.layer.{old}."
        keys = [k for k in s_state if k.startswith(prefix_s)]
        assert keys
        for key in keys:
            assert torch.equal(s_state[key], t_state[prefix_t + key[len(prefix_s):]]), key
    for key in s_state:
        if not key.startswith("bert.encoder."):  # embeddings, pooler, classifier
            assert torch.equal(s_state[key], t_state[key]), key
    # layer 1 of the student is teacher layer 2, not teacher layer 1
    q = "bert.encoder.layer.{}.attention.self.query.weight"
    assert not torch.equal(s_state[q.format(1)], t_state[q.format(1)])


def test_student_is_an_independent_copy() -> None:
    teacher = _teacher()
    before = teacher.bert.embeddings.word_embeddings.weight.detach().clone()
    student = student_from_teacher(teacher, [1, 3])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert torch.equal(teacher.bert.embeddings.word_embeddings.weight, before)


def test_student_with_every_layer_is_the_teacher() -> None:
    teacher = _teacher()
    student = student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids, attention_mask=mask).logits,
                           teacher(input_ids=ids, attention_mask=mask).logits)


def test_student_keeps_the_attention_implementation() -> None:
    teacher = _teacher()
    teacher.config._attn_implementation = "eager"  # what load_classifier(attn_implementation="eager") gives
    student = student_from_teacher(teacher, [0, 2])
    assert student.config._attn_implementation == "eager"
    out = student(input_ids=torch.tensor([[2, 7, 8, 3]]), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 4, 4)


# --- has_task_head ----------------------------------------------------------------------------------------------------


def test_has_task_head(tiny_teacher: Path, tiny_encoder: Path) -> None:
    config = load_config(str(tiny_teacher))
    # the conftest teacher never named its labels (LABEL_0, LABEL_1): any two names match
    assert has_task_head(config, ["0", "1"])
    assert has_task_head(config, ["negative", "positive"])
    assert not has_task_head(config, ["a", "b", "c"])
    assert not has_task_head(load_config(str(tiny_encoder)), ["0", "1"])


def test_has_task_head_with_named_labels(tmp_path: Path) -> None:
    from transformers import BertConfig

    config = BertConfig(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                        architectures=["BertForSequenceClassification"])
    assert has_task_head(config, ["neg", "pos"])
    assert not has_task_head(config, ["pos", "neg"])  # same names, other order: the head's outputs mean other things
    assert not has_task_head(config, ["0", "1"])
    config.architectures = ["BertForMaskedLM"]
    assert not has_task_head(config, ["neg", "pos"])
    config.architectures = None
    assert not has_task_head(config, ["neg", "pos"])


def test_load_classifier_keeps_or_adds_the_head(tiny_teacher: Path, tiny_encoder: Path) -> None:
    from safetensors.torch import load_file

    with_head = load_classifier(str(tiny_teacher), ["neg", "pos"])
    saved = load_file(str(tiny_teacher / "model.safetensors"))
    assert torch.equal(with_head.classifier.weight, saved["classifier.weight"])  # kept, not re-initialised
    assert with_head.config.id2label == {0: "neg", 1: "pos"}
    added = load_classifier(str(tiny_encoder), ["a", "b", "c"])
    assert added.config.num_labels == 3 and added.classifier.out_features == 3
    assert added.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_a_fresh_head_comes_from_the_seed_alone(tiny_encoder: Path) -> None:
    heads = []
    for caller_seed, seed in ((1, 7), (2, 7), (1, 8)):
        torch.manual_seed(caller_seed)
        heads.append(load_classifier(str(tiny_encoder), ["a", "b", "c"], seed=seed).classifier.weight)
        # the caller's random stream goes on as if nothing had been drawn
        after = torch.rand(3)
        torch.manual_seed(caller_seed)
        assert torch.equal(after, torch.rand(3))
    assert torch.equal(heads[0], heads[1])  # same seed, whatever the caller's random state
    assert not torch.equal(heads[0], heads[2])


def _copy_with(src: Path, dst: Path, *, config: dict | None = None, drop: str | None = None) -> Path:
    """`src` copied, its config.json updated with `config` and the tensors whose names hold `drop` left out."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        (dst / "config.json").write_text(json.dumps(json.loads((dst / "config.json").read_text()) | config))
    if drop:
        weights = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if drop not in k}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(("change", "wanted"), [
    ({"drop": ".layer.3."}, "it lacks 16 of the model's tensors (bert.encoder.layer.3."),
    ({"config": {"num_hidden_layers": 2}},
     "it holds 32 tensors that config.json has no place for (bert.encoder.layer.2."),
    ({"config": {"num_hidden_layers": 6}}, "it lacks 32 of the model's tensors (bert.encoder.layer.4."),
    ({"config": {"intermediate_size": 128}}, "12 of its tensors have other sizes than config.json gives"),
    ({"drop": "bert."}, "of the model's tensors (bert.embeddings.LayerNorm.bias, ...)"),  # 71, or 69 past the pooler
    ({"drop": "classifier."}, "it lacks 2 of the model's tensors (classifier.bias, ...)"),
])
def test_a_weights_file_that_does_not_match_its_config_is_refused(change: dict, wanted: str, tiny_teacher: Path,
                                                                  tmp_path: Path) -> None:
    """transformers loads what matches and leaves the rest random (its report of it is silenced for a new head's
    sake): evaluate, export and bench worked on random weights and exited 0."""
    from transformers import AutoModelForSequenceClassification

    from compress.models.loading import load_weights

    folder = _copy_with(tiny_teacher, tmp_path / "changed", **change)
    with pytest.raises(CompressError, match=r"^--model .*changed: the weights file does not match its config\.json") \
            as refused:
        load_weights(AutoModelForSequenceClassification, str(folder), "--model")
    assert wanted in str(refused.value)
    if "classifier" in change.get("drop", ""):  # a head of the task's labels is the one part that may come new
        assert load_classifier(str(folder), ["a", "b", "c"]).classifier.out_features == 3
    else:
        with pytest.raises(CompressError, match=re.escape(wanted)):
            load_classifier(str(folder), ["a", "b", "c"])


def test_a_pretraining_checkpoint_and_an_encoder_without_a_pooler_load_under_a_new_head(tiny_teacher: Path,
                                                                                      tmp_path: Path) -> None:
    """Tensors beside the body (BERT's MLM and NSP heads) are no error, nor is a missing pooler, which a new head
    is trained with (sentence encoders are often saved without one)."""
    from transformers import AutoConfig, BertForPreTraining, BertModel

    config = AutoConfig.from_pretrained(tiny_teacher)
    BertForPreTraining(config).save_pretrained(tmp_path / "pretraining")
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "no_pooler")
    for name in ("pretraining", "no_pooler"):
        for file in tiny_teacher.glob("tokenizer*"):
            (tmp_path / name / file.name).write_bytes(file.read_bytes())
        assert load_classifier(str(tmp_path / name), ["a", "b"]).classifier.out_features == 2
    with pytest.raises(CompressError, match=r"it lacks 2 of the model's tensors \(bert\.pooler\.dense\.bias"):
        load_classifier(str(_copy_with(tiny_teacher, tmp_path / "headed_no_pooler", drop="pooler")), ["0", "1"])


def test_bench_times_an_encoder_without_a_pooler_and_a_buffer_in_the_file_is_no_error(tiny_teacher: Path,
                                                                                      tmp_path: Path) -> None:
    """Masked-LM checkpoints (roberta-base's 'pooler newly initialized') and sentence encoders have no pooler, which
    `compress bench` never needed; some files hold a buffer the model makes itself (token_type_ids)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertForMaskedLM

    from compress.models.loading import load_weights

    BertForMaskedLM(AutoConfig.from_pretrained(tiny_teacher)).save_pretrained(tmp_path / "mlm")
    with pytest.raises(CompressError, match="it lacks 2 of the model's tensors"):
        load_weights(AutoModel, str(tmp_path / "mlm"), "--model")
    assert load_weights(AutoModel, str(tmp_path / "mlm"), "--model", may_be_new=("pooler",)).pooler is not None
    folder = _copy_with(tiny_teacher, tmp_path / "with_buffer")
    weights = load_file(str(folder / "model.safetensors"))
    weights["bert.embeddings.token_type_ids"] = torch.zeros(1, 128, dtype=torch.long)
    save_file(weights, str(folder / "model.safetensors"))
    load_weights(AutoModelForSequenceClassification, str(folder), "--model")


# --- resolve_model ----------------------------------------------------------------------------------------------------


def test_resolve_model_local_folder(tiny_teacher: Path) -> None:
    assert resolve_model(str(tiny_teacher), "--teacher") == str(tiny_teacher)


@pytest.mark.parametrize("name", ["./no/such/folder", "/definitely/not/here", "~/not-a-model-folder-xyz"])
def test_resolve_model_missing_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(CompressError, match=r"^--teacher .*no such model folder"):
        resolve_model(name, "--teacher")


def test_resolve_model_unknown_hub_name_fails_fast_offline() -> None:
    # conftest sets HF_HUB_OFFLINE=1: a name that is neither a folder nor cached must fail at once
    start = time.perf_counter()
    with pytest.raises(CompressError, match=r"^--student no-such-model-xyz: .*unreachable"):
        resolve_model("no-such-model-xyz", "--student")
    assert time.perf_counter() - start < 5


def test_resolve_model_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "weights_only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CompressError, match=r"^--model .*weights_only.*no config\.json"):
        resolve_model(str(folder), "--model")


def test_load_config_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CompressError, match=r"^--teacher .*unreadable config\.json"):
        load_config(str(folder), "--teacher")


# --- check_encoder / same_tokens ------------------------------------------------------------------------------------


def test_check_encoder_rejects_gpt2(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=4).save_pretrained(tmp_path / "gpt2")
    config = load_config(str(tmp_path / "gpt2"), "--teacher")
    with pytest.raises(CompressError, match=r"^--teacher: model type 'gpt2' is not a BERT-family encoder"):
        check_encoder(config, "--teacher")


def test_check_encoder_accepts_bert(tiny_teacher: Path) -> None:
    check_encoder(load_config(str(tiny_teacher)), "--teacher")


@pytest.mark.parametrize(("model_type", "ok"), [("mpnet", True), ("deberta-v2", True), ("roberta", True),
                                                ("albert", True), ("gpt2", False), ("vit", False)])
def test_check_text_classifier_takes_any_encoder_family(model_type: str, ok: bool) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    if ok:
        check_text_classifier(config, "--teacher")
    else:
        with pytest.raises(CompressError, match=rf"^--teacher: model type '{model_type}' is not a text encoder"):
            check_text_classifier(config, "--teacher")


TEXTS = [("a good film",), ("the plot was dull",)]


def test_same_tokens(tiny_teacher: Path, tmp_path: Path) -> None:
    same = save_tiny_bert(tmp_path / "same", hidden=16, heads=2, intermediate=32)
    other = save_tiny_bert(tmp_path / "other", extra_vocab=["zebra"])
    t_tok = load_tokenizer(str(tiny_teacher))
    assert same_tokens(t_tok, load_tokenizer(str(same)), TEXTS)
    assert not same_tokens(t_tok, load_tokenizer(str(other)), TEXTS)


def test_same_tokens_same_vocabulary_other_ids(tiny_teacher: Path, tmp_path: Path) -> None:
    # the same words, but one tokenizer keeps case: "Good" is [UNK] to it, "good" to the other
    from transformers import AutoTokenizer

    cased = AutoTokenizer.from_pretrained(tiny_teacher, do_lower_case=False)
    t_tok = load_tokenizer(str(tiny_teacher))
    assert same_tokens(t_tok, cased, TEXTS)
    assert not same_tokens(t_tok, cased, [("A Good film",)])


def test_same_tokens_same_size_different_words(tiny_teacher: Path, tmp_path: Path) -> None:
    # same vocab_size, one word swapped: the sizes agree but token ids mean other words
    other = save_tiny_bert(tmp_path / "swapped")
    vocab = json.loads((other / "tokenizer.json").read_text())
    words = vocab["model"]["vocab"]
    assert "superb" in words
    words["zzzz"] = words.pop("superb")
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    if (other / "vocab.txt").exists():
        (other / "vocab.txt").write_text((other / "vocab.txt").read_text().replace("superb", "zzzz"))
    assert not same_tokens(load_tokenizer(str(tiny_teacher)), load_tokenizer(str(other)), TEXTS)
