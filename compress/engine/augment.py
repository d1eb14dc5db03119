"""Augmented copies of the training texts (TinyBERT's word replacement), soft-target only, seeded and cached on disk.

Each copy replaces each whole word of a text, with probability P_REPLACE, by one of K candidates for it: the top
predictions of a masked LM for that word masked in its sentence (`--augment_model`, TinyBERT's recipe), or else the
word's nearest neighbours by cosine among the teacher's own input-embedding rows of whole-word tokens. A word the
tokenizer splits into pieces is kept (TinyBERT asks GloVe there, which compress does not ship). A copy that changed
nothing, repeats another copy or is a dev text is dropped.

The copies are a pure function of the texts, N, the seed, the model that proposes words (its weights and tokenizer) and
the recipe's constants, so they are stored under --teacher_cache/augment keyed by those, as the teacher's logits are.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.infra.paths import share_like_open

P_REPLACE = 0.4  # TinyBERT's p_t: the chance that a word is replaced in a copy
TOP_K = 15  # TinyBERT's K: candidates per word
_WORD = re.compile(r"(\w+)")  # split keeps the separators: parts at odd indices are the words
_VERSION = 1  # bump when the recipe changes, so no older copies are read


@dataclass(frozen=True)
class Augmented:
    texts: list[tuple[str, ...]]
    """the copies kept, row by row."""
    dropped: int
    """copies that changed no word, repeated another copy of their row, or were a dev text."""
    file: Path | None
    from_cache: bool


# Candidates: for one text, its parts (words at odd indices) and, by part index, the words that may replace it.
Candidates = Callable[[str], tuple[list[str], dict[int, list[str]]]]


def whole_words(tokenizer) -> dict[int, str]:
    """Token id -> word, for the tokens that are a whole alphabetic word on their own (read after a space, as a word
    inside a sentence is: "Ġgood" for byte-level BPE, "good" for WordPiece), specials and word pieces left out."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    ids = [i for i in vocab.values() if i not in special]
    words = [tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]).strip() for i in ids]
    keep = [(i, w) for i, w in zip(ids, words) if w.isalpha()]
    back = tokenizer([" " + w for _, w in keep], add_special_tokens=False)["input_ids"]
    return {i: w for (i, w), again in zip(keep, back) if again == [i]}


def _token(tokenizer, word: str, words: dict[int, str]) -> int | None:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] in words else None


class EmbeddingNeighbours:
    """Each whole word's TOP_K nearest whole words by cosine over an input-embedding table (the teacher's own)."""

    def __init__(self, embeddings: torch.Tensor, tokenizer, k: int = TOP_K) -> None:
        self.tokenizer, self.k = tokenizer, k
        self.words = whole_words(tokenizer)
        self.ids = torch.tensor(sorted(self.words))  # (W,)
        self.unit = F.normalize(embeddings.detach().float().cpu(), dim=-1)  # (V, H)
        self._memo: dict[str, list[str]] = {}

    def _neighbours(self, word: str) -> list[str]:
        if word not in self._memo:
            token = _token(self.tokenizer, word, self.words)
            if token is None:
                self._memo[word] = []
            else:
                cosine = self.unit[self.ids] @ self.unit[token]  # (W,)
                cosine[self.ids == token] = -2.0  # never the word itself
                top = cosine.topk(min(self.k, len(self.ids) - 1)).indices
                self._memo[word] = [self.words[int(self.ids[j])] for j in top]
        return self._memo[word]

    def __call__(self, text: str) -> tuple[list[str], dict[int, list[str]]]:
        parts = _WORD.split(text)
        found = {i: self._neighbours(parts[i]) for i in range(1, len(parts), 2)}
        return parts, {i: c for i, c in found.items() if c}


class MaskedLMCandidates:
    """Each whole word's TOP_K whole-word predictions by a masked LM, with the word masked in its own text."""

    def __init__(self, model, tokenizer, k: int = TOP_K, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.k, self.max_length = model.eval(), tokenizer, k, max_length
        self.words = whole_words(tokenizer)
        self.allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
        self.allowed[list(self.words)] = True

    @torch.inference_mode()
    def __call__(self, text: str) -> tuple[list[str], dict[int, list[str]]]:
        parts = _WORD.split(text)
        spots = [i for i in range(1, len(parts), 2) if _token(self.tokenizer, parts[i], self.words) is not None]
        if not spots:
            return parts, {}
        # one masked variant per word, all in one batch
        variants = ["".join(self.tokenizer.mask_token if j == i else p for j, p in enumerate(parts)) for i in spots]
        enc = self.tokenizer(variants, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()  # (W, S, V)
        found = {}
        for row, i in enumerate(spots):
            where = (enc["input_ids"][row] == self.tokenizer.mask_token_id).nonzero()
            if not len(where):  # the word was cut off by max_length
                continue
            scores = logits[row, where[0, 0], : len(self.allowed)].clone()  # (V,)
            scores[~self.allowed[: scores.shape[0]]] = float("-inf")
            word = parts[i].casefold()
            picks = [self.words[int(t)] for t in scores.topk(self.k + 1).indices if int(t) in self.words]
            found[i] = [w for w in picks if w.casefold() != word][: self.k]
        return parts, {i: c for i, c in found.items() if c}


def copies_of(texts: list[tuple[str, ...]], n: int, seed: int, candidates: Candidates,
              dev_texts: list[tuple[str, ...]] = ()) -> tuple[list[tuple[str, ...]], int]:
    """Up to `n` copies of each text, each whole word replaced with probability P_REPLACE by one of its candidates;
    the same texts, n, seed and candidates give the same copies. Returns the copies, row by row, and how many were
    dropped (unchanged, repeated, or a dev text)."""
    def same(text: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(" ".join(t.split()).casefold() for t in text)

    dev = {same(t) for t in dev_texts}
    out, dropped = [], 0
    for row, text in enumerate(texts):
        fields = [candidates(t) for t in text]  # a pair's two texts, each with its own candidates
        rng = random.Random(f"augment-{seed}-{row}")  # a string seed hashes the same in every process
        seen = {same(text)}
        for _ in range(n):
            copy = []
            for parts, found in fields:
                parts = list(parts)
                for i, words in sorted(found.items()):
                    if rng.random() < P_REPLACE:
                        parts[i] = rng.choice(words)
                copy.append("".join(parts))
            key = same(tuple(copy))
            if key in seen or key in dev:
                dropped += 1
                continue
            seen.add(key)
            out.append(tuple(copy))
    return out, dropped


def cache_key(task, n: int, seed: int, method: str, model_path: str, tokenizer) -> str:
    """The rows (task.fingerprint), N, the seed, how words are proposed (method, the proposing model's weights and
    tokenizer) and the recipe's constants."""
    from compress.engine.logit_cache import tokenizer_digest
    from compress.infra.identity import weights_identity

    parts = [_VERSION, task.fingerprint, n, seed, method, str(Path(model_path).resolve()),
             weights_identity(model_path), tokenizer_digest(tokenizer), P_REPLACE, TOP_K]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def augment(task, n: int, seed: int, *, method: str, model_path: str, tokenizer,
            candidates: Callable[[], Candidates], cache_root: Path | None) -> Augmented:
    """`n` augmented copies of each of `task`'s training texts: read from `cache_root` when made before, else made
    with `candidates()` (called only then: a masked LM is loaded only when needed) and stored there."""
    file = None
    if cache_root is not None:
        file = cache_root / "augment" / f"{cache_key(task, n, seed, method, model_path, tokenizer)[:24]}.json"
        try:
            stored = json.loads(file.read_text())
            return Augmented([tuple(t) for t in stored["texts"]], stored["dropped"], file, True)
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or a truncated or foreign file: made anew
            pass
    print(f"augment: making {n} copies of each of {len(task.train_texts):,} training texts ({method})", file=sys.stderr)
    texts, dropped = copies_of(task.train_texts, n, seed, candidates(), task.dev_texts)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"texts": texts, "dropped": dropped}, ensure_ascii=False))
        share_like_open(tmp)  # the cache may be shared by a team's runs
        os.replace(tmp, file)
    return Augmented(texts, dropped, file, False)
