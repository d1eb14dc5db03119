"""--augment's copies: words replaced by their nearest whole words in an embedding table or by a masked LM's
predictions, seeded, cached on disk under a key of everything that makes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_bert

from compress.data.tasks import load_task
from compress.engine import augment
from compress.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher: Path):
    return load_tokenizer(str(tiny_teacher))


def embeddings_with_pairs(tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Random rows, except that each pair's two words point the same way, give or take a little."""
    vocab = tokenizer.get_vocab()
    table = torch.randn(len(vocab), 16, generator=torch.Generator().manual_seed(0))
    for a, b in pairs:
        table[vocab[b]] = table[vocab[a]] * 3 + 0.01 * torch.randn(16, generator=torch.Generator().manual_seed(1))
    return table


def test_whole_words_leave_out_specials_and_pieces(tokenizer) -> None:
    words = augment.whole_words(tokenizer)
    assert "good" in words.values() and "movie" in words.values()
    assert not {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"} & set(words.values())


def test_embedding_neighbours_are_the_nearest_whole_words(tokenizer) -> None:
    near = augment.EmbeddingNeighbours(embeddings_with_pairs(tokenizer, [("good", "superb"), ("plot", "story")]),
                                       tokenizer, k=1)
    parts, found = near("The plot, good; zebra!")
    assert parts == ["", "The", " ", "plot", ", ", "good", "; ", "zebra", "!"]  # words at the odd places
    # cosine ignores the 3x length; "zebra" is not in the vocabulary ([UNK]), so it has no neighbours and is kept;
    # the uncased tokenizer reads "The" as "the", a whole word with a (random) nearest neighbour of its own
    assert sorted(found) == [1, 3, 5] and found[3] == ["story"] and found[5] == ["superb"]
    assert len(augment.EmbeddingNeighbours(embeddings_with_pairs(tokenizer, []), tokenizer)("good")[1][1]) == 15


def test_copies_are_seeded_and_replace_words_by_their_candidates_only(tokenizer) -> None:
    near = augment.EmbeddingNeighbours(embeddings_with_pairs(tokenizer, []), tokenizer, k=3)
    texts = [("the plot was good",), ("a very dull film and a poor story",)]
    copies, dropped = augment.copies_of(texts, 4, seed=1, candidates=near)
    assert copies == augment.copies_of(texts, 4, seed=1, candidates=near)[0]  # the same seed, the same copies
    assert copies != augment.copies_of(texts, 4, seed=2, candidates=near)[0]
    assert len(copies) + dropped == 8 and len(set(copies)) == len(copies) and not set(texts) & set(copies)
    for (copy,) in copies:
        source = next(t for (t,) in texts if len(t.split()) == len(copy.split()))
        for old, new in zip(source.split(), copy.split()):
            assert new == old or new in near(old)[1][1]
    # with one candidate a word, "bad plot" has three copies at most, each made once; a dev text is never a copy
    single = augment.EmbeddingNeighbours(embeddings_with_pairs(tokenizer, [("bad", "good")]), tokenizer, k=1)
    (other,) = single("plot")[1][1]
    made, dropped = augment.copies_of([("bad plot",)], 20, seed=0, candidates=single)
    assert sorted(made) == sorted([("good plot",), (f"bad {other}",), (f"good {other}",)]) and dropped == 17
    assert augment.copies_of([("bad plot",)], 20, seed=0, candidates=single, dev_texts=made[:2])[0] == made[2:]


def test_masked_lm_proposes_whole_words_in_context(tiny_teacher: Path, tokenizer, tmp_path: Path) -> None:
    from transformers import AutoConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(AutoConfig.from_pretrained(tiny_teacher))
    words = set(augment.whole_words(tokenizer).values())
    lm = augment.MaskedLMCandidates(model, tokenizer, k=4)
    parts, found = lm("the film was awful")
    assert sorted(found) == [1, 3, 5, 7]
    for i, candidates in found.items():
        assert len(candidates) == 4 and set(candidates) <= words and parts[i] not in candidates
    # the prediction is the model's for the word masked in its own sentence
    ids = tokenizer("the film [MASK] awful", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, 3]
    best = max((logits[tokenizer.convert_tokens_to_ids(w)].item(), w) for w in words - {"was"})[1]
    assert found[5][0] == best


def test_the_copies_are_cached_by_what_makes_them(tiny_teacher: Path, tiny_data: Path, tokenizer,
                                                  tmp_path: Path) -> None:
    task = load_task(data=str(tiny_data))
    calls = []

    def candidates():
        calls.append(1)
        return augment.EmbeddingNeighbours(embeddings_with_pairs(tokenizer, []), tokenizer)

    def made(n=2, seed=0, tok=tokenizer, cache=tmp_path):
        return augment.augment(task, n, seed, method="neighbours", model_path=str(tiny_teacher), tokenizer=tok,
                               candidates=candidates, cache_root=cache)

    first = made()
    assert not first.from_cache and first.file.parent == tmp_path / "augment" and len(calls) == 1
    assert len(first.texts) + first.dropped == 2 * 96
    again = made()
    assert again.from_cache and again.texts == first.texts and again.dropped == first.dropped and len(calls) == 1
    assert json.loads(first.file.read_text())["dropped"] == first.dropped
    for other in (made(n=3), made(seed=1), made(tok=load_tokenizer(str(save_tiny_bert(tmp_path / "b",
                                                                                   extra_vocab=["yak"]))))):
        assert not other.from_cache and other.file != first.file
    assert len(calls) == 4
    assert not made(cache=None).from_cache and len(calls) == 5  # no cache folder: made every time, stored nowhere
