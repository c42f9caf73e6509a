from __future__ import annotations

import re
import unicodedata

import numpy as np
import pytest
from datasketch import MinHashLSH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataeff.synth.dedup import (
    NearDup,
    NearDupConfig,
    _mix,
    jaccard,
    ngram_hashes,
    normalize,
    shingles,
    word_hashes,
    words,
)

_VOCAB = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "red", "sun"]


def _story(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_VOCAB + [f"w{i}" for i in range(400)], size=n))


# --- normalization and hashing ---------------------------------------------------------------------------


def test_normalize_folds_case_spacing_and_punctuation_into_word_breaks() -> None:
    assert normalize("  Hello,\tWORLD!!  It's  an e-mail. ") == "hello world it s an e mail"
    assert normalize("Straße ﬁne") == "strasse fine"  # casefold and NFKC
    assert normalize("...!?") == ""
    assert words("Año 2024: café") == ["año", "2024", "café"]


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_ascii_fast_path_matches_the_unicode_rule(text: str) -> None:
    slow = re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split()
    assert words(text) == slow


@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 12))
def test_ngram_hashes_are_the_polynomial_of_every_window(values: list[int], n: int) -> None:
    """The prefix-sum trick gives the direct polynomial of every window, so two windows hash equal exactly when
    they hold the same words (with words drawn from four, repeats are common)."""
    hashes = np.array([0x1234567890ABCDEF * (v + 1) % 2**64 for v in values], dtype=np.uint64)
    got = ngram_hashes(hashes, n)
    windows = [tuple(values[i : i + n]) for i in range(len(values) - n + 1)]
    assert len(got) == len(windows)
    base = 0x9E3779B97F4A7C15
    direct = []
    for i in range(len(windows)):
        g = 0
        for h in hashes[i : i + n].tolist():
            g = (g * base + h) % 2**64
        direct.append(g + n)
    assert np.array_equal(got, _mix(np.array(direct, dtype=np.uint64)))
    for i in range(len(windows)):
        for j in range(len(windows)):
            assert (got[i] == got[j]) == (windows[i] == windows[j])


def test_shingles_are_stable_across_processes_and_order_sensitive() -> None:
    # Pinned values: a salted or platform-dependent hash would change them between runs.
    assert word_hashes("hello")[0] == np.uint64(0x9555E8555C62DCFD)
    assert sorted(shingles("one two three four five six")) == [8700241598571194033, 15437125891566841443]
    assert shingles("one two", n=5) == shingles("One, two!", n=5)
    assert len(shingles("one two", n=5)) == 1  # shorter than n: one shingle of the whole text
    assert shingles("", n=5) == frozenset()
    assert shingles("a b c d e f", n=5) != shingles("f e d c b a", n=5)
    assert len(shingles("a b c d e f", n=5)) == 2


def test_jaccard_is_the_true_set_similarity() -> None:
    assert jaccard(frozenset({1, 2, 3}), frozenset({2, 3, 4})) == 0.5
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert jaccard(frozenset({1}), frozenset()) == 0.0


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="threshold"):
        NearDupConfig(threshold=0.0)
    with pytest.raises(ValueError, match="ngram"):
        NearDup(ngram=0)


# --- finding duplicates ----------------------------------------------------------------------------------


def test_hand_made_near_duplicates_are_found_and_distinct_texts_kept() -> None:
    rng = np.random.default_rng(1)
    base = _story(rng, 120)
    edited = base.split()
    edited[60] = "zebra"
    near = " ".join(edited)  # one word changed: J = 111/121
    texts = [base, _story(rng, 120), near, _story(rng, 120), base.upper() + "!"]
    result = NearDup().find(texts)
    assert jaccard(shingles(base), shingles(near)) > 0.9
    assert result.drop == (2, 4)
    assert result.duplicate_of == {2: 0, 4: 0}
    assert (result.exact, result.near, result.against) == (1, 1, 0)
    assert result.groups == [[0, 2, 4]]
    assert result.keep == [0, 1, 3]


def test_templated_documents_are_candidates_but_true_jaccard_rejects_them() -> None:
    """40 documents: one 60-word template plus 8 topic words of their own (true Jaccard 56/72 = 0.78 < τ).
    LSH proposes many pairs and MinHash estimates put some above τ, so clustering LSH candidates merges
    most of the 40 topics into one cluster; confirmation by true Jaccard keeps every one."""
    rng = np.random.default_rng(2)
    template = _story(rng, 60)
    docs = [template + " " + " ".join(f"topic{i}x{j}" for j in range(8)) for i in range(40)]
    nd = NearDup()
    assert jaccard(shingles(docs[0]), shingles(docs[1])) == pytest.approx(56 / 72)

    result = nd.find(docs)
    assert result.drop == ()
    assert result.candidates >= 100
    assert result.rejected == result.candidates

    # What MinHash alone does with the same signatures: union-find over LSH candidate pairs.
    sigs = [nd.signature(d) for d in docs]
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, s in enumerate(sigs):
        lsh.insert(i, s)
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, s in enumerate(sigs):
        for j in lsh.query(s):
            parent[root(i)] = root(j)
    clusters = [root(i) for i in range(len(docs))]
    assert max(clusters.count(c) for c in clusters) >= 30
    # The estimate alone would also call some pairs duplicates.
    assert any(sigs[i].jaccard(sigs[j]) >= 0.8 for i in range(len(docs)) for j in range(i))
    assert not any(nd.pair_is_duplicate(docs[0], d) for d in docs[1:])


def test_exact_duplicates_keep_the_first_and_follow_its_fate() -> None:
    rng = np.random.default_rng(3)
    a, b = _story(rng, 50), _story(rng, 50)
    a_near = a.replace(a.split()[25], "zebra", 1)
    texts = [a, a_near, b, a_near.lower(), "", " ... ", a]
    result = NearDup().find(texts)
    # a_near is a near duplicate of a; its exact copy joins a's group; the two empty texts are exact duplicates.
    assert result.duplicate_of == {1: 0, 3: 0, 5: 4, 6: 0}
    assert result.exact == 3 and result.near == 1


def test_against_reference_drops_texts_that_copy_the_reference() -> None:
    rng = np.random.default_rng(4)
    real = [_story(rng, 80) for _ in range(30)]
    copied = real[7].split()
    copied[40] = "zebra"
    synthetic = [_story(rng, 80), " ".join(copied), real[12].title(), _story(rng, 80), " ".join(copied)]
    result = NearDup().find(synthetic, against=real)
    assert result.reference_match == {1: 7, 2: 12, 4: 7}
    assert result.drop == (1, 2, 4)
    assert (result.against, result.exact, result.near) == (3, 0, 0)
    assert result.reference_candidates >= 1
    # Without the reference only the exact copy inside the synthetic set goes.
    assert NearDup().find(synthetic).drop == (4,)


def test_find_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(5)
    template = _story(rng, 60)
    docs = [template + " " + _story(rng, 6) for _ in range(60)] + [_story(rng, 40) for _ in range(20)]
    docs += [d + " end" for d in docs[:10]]
    first = NearDup(seed=7).find(docs)
    again = NearDup(seed=7).find(list(docs))
    assert first == again
    assert NearDup(seed=7).signature(docs[0]) == NearDup(seed=7).signature(docs[0])
    assert NearDup(seed=8).signature(docs[0]) != NearDup(seed=7).signature(docs[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(_VOCAB[:6]), min_size=0, max_size=14).map(" ".join), min_size=1, max_size=12))
def test_find_invariants(texts: list[str]) -> None:
    """Every dropped text is confirmed against a kept earlier text, no two kept texts are confirmed duplicates
    of each other, and a pair's verdict from pair_is_duplicate is what find decides."""
    nd = NearDup(threshold=0.5, ngram=2)
    result = nd.find(texts)
    kept = set(result.keep)
    assert set(result.drop) | kept == set(range(len(texts))) and not set(result.drop) & kept
    for i, j in result.duplicate_of.items():
        assert j < i and j in kept
        assert jaccard(shingles(texts[i], 2), shingles(texts[j], 2)) >= 0.5
    for i in kept:
        for j in kept:
            if i < j:
                assert normalize(texts[i]) != normalize(texts[j])
                assert not nd.pair_is_duplicate(texts[i], texts[j])
    if len(texts) >= 2:
        pair = nd.find(texts[:2])
        assert (pair.drop == (1,)) == nd.pair_is_duplicate(texts[0], texts[1])
