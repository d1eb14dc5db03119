"""Vocabulary pruning: keep the embedding rows and tokenizer entries a task's text uses, drop the rest.

    kept = kept_ids(tokenizer, train_texts, corpus_texts=more_text, top_n=5000)    # which ids stay
    model, tokenizer, mapping = prune_vocabulary(model, tokenizer, kept)            # slice rows, rewrite tokenizer
    unk_rate(tokenizer, dev_texts, parent_tokenizer)                                # dev tokens lost to [UNK]
    dropped_rate(parent_tokenizer, dev_texts, kept)                                  # dev tokens spelled anew

The word embedding of a BERT-base is 23 M of its 110 M parameters, and a task's text uses a few thousand of its
30,522 rows. Pruned ids keep their old order, so [PAD] = 0 (BERT) and <s> = 0, <pad> = 1 (RoBERTa) stay where
they were. The result is an ordinary checkpoint: `save_pretrained` writes a tokenizer.json and config.json that
AutoTokenizer and AutoModelForSequenceClassification load without compress, and that map text to the new ids.

What stays the same: a text whose tokens were all kept is split into the same tokens and gets the same logits.
  - WordPiece splits greedily, longest match first; a longer match in the pruned vocabulary would have been in the
    parent's too, so the parent's split is still the longest.
  - Byte-level BPE applies the lowest-ranked merge among adjacent pairs until none applies. Every intermediate token
    of the parent's run is a node in the merge tree of a kept token, so keeping, for each kept token, every merge
    that builds it (and, recursively, its parts) keeps every merge the run used; the merges left are a subset of
    the parent's in the same order, so the lowest-ranked available one is the one the parent chose.
What changes on other text: WordPiece spells a word that held a dropped token from the longest kept pieces
("groceries" as gr ##oc ##eri ##es), and a word it cannot spell at all becomes one [UNK] (with every kept piece of
it). Byte-level BPE keeps its 256-symbol byte alphabet, so it spells a dropped token from smaller kept pieces, down
to single bytes, and never makes an unknown token (RoBERTa's tokenizer has none in its BPE model: without the
alphabet, characters it lost would vanish silently on reload); its unk_rate is 0 by construction, and dropped_rate
says how much of a text it spells anew.
Refused in one line: SentencePiece Unigram (ALBERT, XLM-R, CamemBERT), BPE that is not byte-level, and anything
else whose tokenizer.json this module does not know how to rewrite. Pruning that would drop nothing is refused too
(see prune_vocabulary).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from torch import nn

from compress.infra.errors import CompressError

Text = str | Sequence[str]  # one text, or a (text, text) pair as TaskData holds them


def _inputs(texts: Iterable[Text]) -> list[str | tuple[str, str]]:
    """What `Tokenizer.encode_batch` takes: a str, or a pair; TaskData's 1-tuples become plain strings."""
    out = []
    for text in texts:
        if isinstance(text, str):
            out.append(text)
        elif len(text) == 1:
            out.append(text[0])
        elif len(text) == 2:
            out.append((text[0], text[1]))
        else:
            raise ValueError(f"a text is a string or a pair of strings, not {len(text)} strings")
    return out


def _encodings(tokenizer, texts: Iterable[Text], chunk: int = 512):
    """The backend's encodings of `texts` with special tokens, in chunks (a corpus may be large), untruncated.

    The backend is what `tokenizer(text)` calls; a copy without truncation or padding so every token of a long text
    counts and no padding does.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    inputs = _inputs(texts)
    for start in range(0, len(inputs), chunk):
        yield from backend.encode_batch(inputs[start:start + chunk], add_special_tokens=True)


def count_tokens(tokenizer, texts: Iterable[Text]) -> Counter[int]:
    """How often each id occurs in the tokenization of `texts`, special tokens included as the tokenizer adds them
    ([CLS] and [SEP] once per text, twice [SEP] for a pair), without truncation."""
    counts: Counter[int] = Counter()
    for encoding in _encodings(tokenizer, texts):
        counts.update(encoding.ids)
    return counts


def _backend_json(tokenizer) -> dict:
    """The tokenizer's tokenizers-library serialization, refused in one line unless it is one this module rewrites."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CompressError(f"vocabulary pruning: {type(tokenizer).__name__} has no tokenizers backend "
                            "(tokenizer.json) to rewrite")
    data = json.loads(backend.to_str())
    kind = data["model"].get("type")
    if kind == "Unigram":
        raise CompressError("vocabulary pruning: the tokenizer is a SentencePiece Unigram model (as ALBERT's and "
                            "XLM-R's); compress rewrites only WordPiece and byte-level BPE vocabularies, and has no "
                            "check that a pruned Unigram model still segments text as before")
    if kind == "BPE" and not _byte_level(data):
        raise CompressError("vocabulary pruning: the tokenizer is a BPE that is not byte-level (a SentencePiece "
                            "BPE?); compress rewrites only WordPiece and byte-level BPE vocabularies")
    if kind not in ("WordPiece", "BPE"):
        raise CompressError(f"vocabulary pruning: the tokenizer's model is {kind}; compress rewrites only WordPiece "
                            "and byte-level BPE vocabularies")
    if kind == "BPE" and (data["model"].get("continuing_subword_prefix") or data["model"].get("end_of_word_suffix")):
        raise CompressError("vocabulary pruning: the byte-level BPE marks subwords with a prefix or suffix, which "
                            "compress does not rewrite")
    _remap_post_processor(data.get("post_processor"), {})  # refuses a post-processor it cannot remap, before any work
    return data


def _byte_level(data: dict) -> bool:
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _merges(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as [a, b] pairs; files from before 0.20 hold "a b" strings
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _bpe_closure(data: dict, kept: set[int]) -> set[int]:
    """`kept` plus, for each kept token, the parts of every merge that builds it (recursively), which byte-level BPE
    needs to split text of kept tokens as before, plus the byte alphabet, which it needs to spell any other text."""
    vocab = data["model"]["vocab"]
    token_of = {i: t for t, i in vocab.items()}
    built_by: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(data["model"]):
        built_by.setdefault(a + b, []).append((a, b))
    # every byte a text can hold, so the pruned tokenizer can always fall back to spelling it byte by byte
    tokens = {t for t in pre_tokenizers.ByteLevel.alphabet() if t in vocab}
    todo = [token_of[i] for i in kept if i in token_of]
    while todo:
        token = todo.pop()
        if token in tokens:
            continue
        tokens.add(token)
        for a, b in built_by.get(token, ()):
            todo += [a, b]
    return kept | {vocab[t] for t in tokens}


def _complete(tokenizer, data: dict, kept: Iterable[int]) -> set[int]:
    """`kept` with the tokenizer's special tokens and, for BPE, the merge closure and byte alphabet."""
    done = set(kept) | set(tokenizer.all_special_ids)
    return _bpe_closure(data, done) if data["model"]["type"] == "BPE" else done


def _character_pieces(tokenizer, data: dict, texts: list[Text]) -> set[int]:
    """The ids of the one-character WordPiece pieces (`x`, and `##x` with the model's prefix) of every character
    the texts hold after the tokenizer's normalizer (lower-casing, accent stripping), so any word of those
    characters can still be spelled."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    chars = set()
    for text in texts:
        for part in ((text,) if isinstance(text, str) else text):
            chars |= set(normalizer.normalize_str(part) if normalizer is not None else part)
    prefix = data["model"].get("continuing_subword_prefix", "##")
    vocab = data["model"]["vocab"]
    return {vocab[piece] for c in chars if not c.isspace() for piece in (c, prefix + c) if piece in vocab}


def kept_ids(tokenizer, train_texts: Iterable[Text], *, corpus_texts: Iterable[Text] = (),
             top_n: int | None = None, min_count: int = 1) -> list[int]:
    """The ids a pruned vocabulary keeps, ascending (so [PAD] = 0 stays 0).

    Kept: every special token of the tokenizer; every id the training texts produce; and the ids of `corpus_texts`
    (more in-domain text, --vocab_corpus). `top_n` (--vocab_top N) caps what the corpus adds: of the corpus ids that
    are neither special nor produced by the training texts, only the N most frequent in the corpus are kept (ties to
    the lower id), so the vocabulary holds at most N rows beyond what the training texts need. It ranks corpus
    tokens, so it needs a non-empty corpus. For byte-level BPE the list also holds what `prune_vocabulary` needs to
    keep the merges consistent (the parts of each kept token's merges and the 256-byte alphabet), so
    len(result) is the pruned vocabulary's size in every case.

    `min_count` (--vocab_min_count N) keeps only the training ids produced at least N times. A rarer word is then
    spelled from smaller kept pieces: for WordPiece the single-character pieces (`x` and `##x`) of every character
    in the training texts are kept for that, so it falls back to [UNK] only where a character itself is missing;
    byte-level BPE always keeps its byte alphabet. A text whose tokens were all kept still tokenizes as before.
    """
    if min_count < 1:
        raise CompressError(f"--vocab_min_count {min_count}: give 1 (every training token) or more")
    data = _backend_json(tokenizer)
    train_texts = list(train_texts)
    counts = count_tokens(tokenizer, train_texts)
    kept = set(tokenizer.all_special_ids) | {i for i, n in counts.items() if n >= min_count}
    if min_count > 1 and data["model"]["type"] == "WordPiece":
        kept |= _character_pieces(tokenizer, data, train_texts)
    corpus = count_tokens(tokenizer, corpus_texts)
    extra = [i for i in corpus if i not in kept]
    if top_n is not None:
        if top_n < 0:
            raise CompressError(f"--vocab_top {top_n}: give a count of 0 or more tokens")
        if not corpus:
            raise CompressError(f"--vocab_top {top_n}: it keeps the most frequent tokens of --vocab_corpus, and "
                                "there is no corpus text to rank (every training token is kept anyway)")
        extra = sorted(extra, key=lambda i: (-corpus[i], i))[:top_n]
    return sorted(_complete(tokenizer, data, kept | set(extra)))


def _remap_post_processor(node: dict | None, mapping: dict[int, int]) -> None:
    """Rewrite the special-token ids a post-processor inserts ([CLS] ... [SEP], <s> ... </s>) in place.

    With an empty `mapping` it only checks that every part is of a kind it knows.
    """
    if node is None:
        return
    kind = node.get("type")
    if kind == "Sequence":
        for part in node["processors"]:
            _remap_post_processor(part, mapping)
    elif kind == "TemplateProcessing":
        for special in node["special_tokens"].values():
            special["ids"] = [mapping.get(i, i) for i in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            node[key][1] = mapping.get(node[key][1], node[key][1])
    elif kind != "ByteLevel":  # ByteLevel only trims offsets; it holds no ids
        raise CompressError(f"vocabulary pruning: the tokenizer's post-processor {kind} is not one compress knows how "
                            "to rewrite")


def _rewrite_json(data: dict, mapping: dict[int, int]) -> dict:
    """The tokenizer.json of the pruned vocabulary: old id i becomes mapping[i], ids not in mapping are gone."""
    data = json.loads(json.dumps(data))
    model = data["model"]
    vocab = {t: mapping[i] for t, i in model["vocab"].items() if i in mapping}
    model["vocab"] = dict(sorted(vocab.items(), key=lambda item: item[1]))
    if model["type"] == "BPE":
        # a merge stays when its result does; _bpe_closure made sure its parts did too. List order is merge rank.
        model["merges"] = [[a, b] for a, b in _merges(model) if a + b in vocab]
    data["added_tokens"] = [dict(t, id=mapping[t["id"]]) for t in data["added_tokens"] if t["id"] in mapping]
    _remap_post_processor(data.get("post_processor"), mapping)
    if data.get("padding"):
        data["padding"]["pad_id"] = mapping[data["padding"]["pad_id"]]
    return data


def _rewrite_tokenizer(tokenizer, data: dict, mapping: dict[int, int]):
    """The pruned tokenizer, made the way a user will load it: saved, its tokenizer.json rewritten, loaded again.

    transformers 5 does not take tokenizer.json as it is: BertTokenizer, RobertaTokenizer and others rebuild their
    backend from the file's vocabulary (and merges) in their own __init__. Loading the rewritten file is therefore
    the only way to know the saved result maps text to the new ids; the check at the end says so.
    """
    expected = {t: mapping[i] for t, i in tokenizer.get_vocab().items() if i in mapping}
    with tempfile.TemporaryDirectory(prefix="compress-vocab-") as folder:
        files = Path(folder)
        # transformers 5 saves a tokenizers-backed tokenizer as tokenizer.json and a tokenizer_config.json that holds
        # no ids (no vocab.txt, no added_tokens_decoder), so tokenizer.json is the one file to rewrite
        tokenizer.save_pretrained(files)
        (files / "tokenizer.json").write_text(json.dumps(_rewrite_json(data, mapping), ensure_ascii=False))
        pruned = type(tokenizer).from_pretrained(files)
    if pruned.get_vocab() != expected:  # a transformers release that rebuilds the tokenizer differently
        raise RuntimeError(f"the pruned {type(tokenizer).__name__} did not load with the vocabulary written for it")
    return pruned


def _word_embedding(model) -> tuple[nn.Embedding, object, str]:
    """The (V, E) table of word vectors, and where it hangs (owner, attribute) so a smaller one can replace it.

    E is the hidden size for BERT, RoBERTa and DistilBERT, and the narrower embedding size for ELECTRA-small and
    ALBERT (projected to H later, outside the table). compress_bert's FactorisedEmbedding holds it as `.embed`.
    """
    embeddings = model.get_input_embeddings()
    table = embeddings if isinstance(embeddings, nn.Embedding) else getattr(embeddings, "embed", None)
    if isinstance(table, nn.Embedding):
        for owner in model.modules():
            for name, child in owner.named_children():
                if child is table:
                    return table, owner, name
    raise CompressError(f"vocabulary pruning: cannot find the word-embedding table of {type(model).__name__}")


def _config_token_ids(config) -> dict[str, int]:
    return {k: v for k, v in config.to_dict().items() if k.endswith("_token_id") and isinstance(v, int)}


def pruned_order(model, tokenizer, kept: Iterable[int], data: dict | None = None) -> list[int]:
    """The old ids the pruned vocabulary keeps, in their new order, without changing anything: every refusal of
    `prune_vocabulary` comes from here, so a command can ask before it trains (prune --vocab cuts after recovery).
    `data`: the tokenizer's backend JSON, when the caller has it already."""
    data = data if data is not None else _backend_json(tokenizer)
    if model.get_output_embeddings() is not None:
        raise CompressError(f"vocabulary pruning: {type(model).__name__} predicts over the vocabulary (a "
                            "language-model head); prune an encoder or a classifier")
    rows = _word_embedding(model)[0].num_embeddings
    known = set(tokenizer.get_vocab().values())
    if len(tokenizer) > rows:
        raise CompressError(f"vocabulary pruning: the tokenizer has {len(tokenizer):,} tokens but the model's "
                            f"embedding table {rows:,} rows; the tokenizer is not the model's own")
    config_ids = _config_token_ids(model.config)
    # RoBERTa numbers positions from config.pad_token_id, so its row stays whatever the tokenizer calls padding
    pad = {config_ids["pad_token_id"]} & known if "pad_token_id" in config_ids else set()
    order = sorted(_complete(tokenizer, data, kept) | pad)
    if unknown := [i for i in order if i not in known]:
        raise ValueError(f"kept ids {unknown[:5]} are not ids of the tokenizer")
    if len(order) == rows:
        raise CompressError(f"vocabulary pruning: the texts use all {rows:,} tokens of the vocabulary, so there is "
                            "nothing to drop")
    return order


def prune_vocabulary(model, tokenizer, kept: Iterable[int]):
    """Keep only the ids `kept` (with every special token and, for BPE, what its merges need; see kept_ids).

    New ids follow old ones in order: the k-th smallest kept id becomes k. The word-embedding rows are sliced from
    (V, E) to (V', E); config.vocab_size and config's *_token_id fields follow. The row of config.pad_token_id is
    always kept; another config id whose token was dropped becomes None (bos/eos/sep ids name tokens for generation,
    which a classifier does not do, and a config's defaults may not even be its tokenizer's). The tokenizer is
    rewritten. The model changes in place.
    Returns (model, tokenizer, mapping), mapping[old id] = new id for every kept id.

    Refused with CompressError: a tokenizer it cannot rewrite (see the module docstring), a model with a
    language-model head over the vocabulary, and a `kept` that drops nothing: pruning to the same size would write
    the same model under a new name, so the caller learns instead that the texts use the whole vocabulary.
    """
    data = _backend_json(tokenizer)
    order = pruned_order(model, tokenizer, kept, data)
    table, owner, name = _word_embedding(model)
    config_ids = _config_token_ids(model.config)
    mapping = {old: new for new, old in enumerate(order)}

    pruned_tokenizer = _rewrite_tokenizer(tokenizer, data, mapping)
    index = torch.tensor(order, dtype=torch.long, device=table.weight.device)
    padding_idx = mapping.get(table.padding_idx) if table.padding_idx is not None else None
    new = nn.Embedding(len(order), table.embedding_dim, padding_idx=padding_idx, device=table.weight.device,
                       dtype=table.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(table.weight.index_select(0, index))  # (V, E) -> (V', E)
    new.weight.requires_grad_(table.weight.requires_grad)
    new.train(table.training)
    setattr(owner, name, new)

    config = model.config
    config.vocab_size = len(order)
    for key, old in config_ids.items():
        setattr(config, key, mapping.get(old))
    # RoBERTa's embeddings keep the pad id to number positions from; it moves only if an id below it was dropped
    embeddings = getattr(model.base_model, "embeddings", None)
    if isinstance(getattr(embeddings, "padding_idx", None), int) and config.pad_token_id is not None:
        embeddings.padding_idx = config.pad_token_id
    return model, pruned_tokenizer, mapping


def unk_rate(tokenizer, texts: Iterable[Text], parent) -> float:
    """Share of the parent's tokens on `texts` that the pruned `tokenizer` turns into its unknown token.

    Over the tokens `parent` (the tokenizer before pruning) produces, special tokens left out: a token counts as
    lost when the pruned tokenizer puts its unknown token over any of its characters (same text of a pair,
    overlapping character offsets), unless the parent already made it unknown. A WordPiece word that loses one of its
    pieces becomes one [UNK]; all the word's parent tokens count as lost. Byte-level BPE never makes an unknown token
    (see the module docstring), so its rate is 0.0. 0.0 for texts without tokens.
    """
    texts = _inputs(texts)
    new_unk, old_unk = tokenizer.unk_token_id, parent.unk_token_id
    total = lost = 0
    for old, new in zip(_encodings(parent, texts), _encodings(tokenizer, texts), strict=True):
        unknown = [(seq, start, end) for i, seq, (start, end) in zip(new.ids, new.sequence_ids, new.offsets)
                   if i == new_unk]
        for i, seq, (start, end), special in zip(old.ids, old.sequence_ids, old.offsets, old.special_tokens_mask):
            if special:
                continue
            total += 1
            end = max(end, start + 1)  # byte-level offsets can be empty ("Ġ" alone); it still sits at `start`
            if i != old_unk and any(s == seq and a < end and start < b for s, a, b in unknown):
                lost += 1
    return lost / total if total else 0.0


def dropped_rate(parent, texts: Iterable[Text], kept: Iterable[int]) -> float:
    """Share of the parent's tokens on `texts` (special tokens left out) whose ids are not in `kept`.

    Those are the tokens the pruned model sees differently: spelled from smaller kept pieces, or lost to the unknown
    token. It is the wider measure beside unk_rate: pruned to BBC News' training texts, MiniLM-L6 dropped 0.5% of
    the dev set's tokens, and WordPiece re-spelled nearly all of them ("groceries" as gr ##oc ##eri ##es), so
    unk_rate was 5e-6. The two count different things: a kept token in a word that became [UNK] is lost but not
    dropped. 0.0 for texts without tokens.
    """
    kept = set(kept)
    total = dropped = 0
    for encoding in _encodings(parent, texts):
        for i, special in zip(encoding.ids, encoding.special_tokens_mask):
            if not special:
                total += 1
                dropped += i not in kept
    return dropped / total if total else 0.0
