from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataeff.cli import main
from dataeff.errors import DataeffError
from dataeff.synth.dedup import NearDup
from dataeff.synth.quality import (
    CopyingConfig,
    Corpus,
    QualityConfig,
    RepetitionConfig,
    Share,
    common_span,
    copy_threshold,
    copying_share,
    duplicate_share,
    irrelevance_share,
    is_copy,
    is_repetitive,
    loop_span,
    loop_threshold,
    measure,
    non_factual_share,
    quality_table,
    read_corpus,
    repetition_share,
    sample_indices,
    source_overlap,
)


def _distinct(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# --- repetition ------------------------------------------------------------------------------------------


def test_a_repeated_sentence_is_a_loop_once_it_covers_thirty_words_or_half_the_document() -> None:
    sentence = "The cat sat on the mat. "
    assert loop_span(sentence * 6) == 36  # 6 words x 6 copies
    assert is_repetitive(_distinct(60) + " " + sentence * 5)  # 30 words of 90
    assert not is_repetitive(_distinct(60) + " " + sentence * 4)  # 24 words of 84: below 30 and below half
    assert is_repetitive(sentence * 4)  # the whole document is the loop
    assert not is_repetitive(sentence * 2 + _distinct(4))  # two copies are not a loop, however long
    assert loop_span("The cat. THE CAT! the cat") == loop_span("the cat the cat the cat") == 6


def test_loop_threshold_is_half_a_short_document_but_at_least_min_words() -> None:
    assert [loop_threshold(m) for m in (10, 24, 40, 41, 60, 500)] == [12, 12, 20, 21, 30, 30]
    loop = " ".join(["one two three four five"] * 4)  # 20 words
    assert is_repetitive(_distinct(20) + " " + loop)  # 40 words: needs 20
    assert not is_repetitive(_distinct(21) + " " + loop)  # 41 words: needs 21
    assert is_repetitive("ha " * 12) and not is_repetitive("ha " * 11)
    assert not is_repetitive("no, no, no! " + _distinct(60))


def test_copies_are_counted_back_to_back() -> None:
    unit = _distinct(10, "u")
    three = " ".join([unit] * 3)
    assert loop_span(three) == 30 and is_repetitive(three)
    short = " ".join(three.split()[:-1])  # the third copy lacks a word: only two whole copies
    assert loop_span(short) == 0
    # Four whole copies and a cut fifth: the cut copy is covered too.
    four_cut = " ".join((" ".join([_distinct(7, "v")] * 5)).split()[:31])
    assert loop_span(four_cut) == 31
    spread = " ".join([unit, _distinct(5, "x"), unit, _distinct(5, "y"), unit])  # copies not back to back
    assert loop_span(spread) == 0
    assert is_repetitive(_distinct(50) + " " + " ".join(["and then the dog ran home"] * 6))
    assert loop_span("ha " * 40) == 40


def test_units_longer_than_max_period_are_not_looked_for() -> None:
    text = " ".join([_distinct(60)] * 3)
    assert loop_span(text) == 0
    assert loop_span(text, RepetitionConfig(max_period=60)) == 180


# --- pair-copying ----------------------------------------------------------------------------------------


def test_common_span_finds_the_longest_shared_run() -> None:
    seed = _distinct(100, "s")
    text = _distinct(30, "t") + " " + " ".join(seed.split()[20:80]) + " " + _distinct(30, "r")
    assert common_span(seed, text) == 60
    assert common_span(seed, _distinct(40, "q")) == 0
    assert common_span("", seed) == 0


@given(st.lists(st.sampled_from("abc"), max_size=14), st.lists(st.sampled_from("abc"), max_size=14))
def test_common_span_matches_brute_force(a: list[str], b: list[str]) -> None:
    brute = max((k for k in range(1, min(len(a), len(b)) + 1)
                 if any(a[i : i + k] == b[j : j + k] for i in range(len(a) - k + 1) for j in range(len(b) - k + 1))),
                default=0)
    assert common_span(" ".join(a), " ".join(b)) == brute


def test_copy_threshold_is_fifty_words_or_half_the_shorter_document() -> None:
    assert copy_threshold(200, 300) == 50
    assert copy_threshold(300, 60) == 30
    assert copy_threshold(10, 300) == 8  # never below min_words
    seed = _distinct(200, "s")
    shared = seed.split()[10:60]  # 50 words
    text = _distinct(75, "a") + " " + " ".join(shared) + " " + _distinct(75, "b")
    assert is_copy(seed, text)
    text49 = _distinct(75, "a") + " " + " ".join(shared[:49]) + " " + _distinct(76, "b")
    assert not is_copy(seed, text49)
    short_text = " ".join(seed.split()[:8]) + " " + _distinct(8, "c")  # 16 words, 8 shared
    assert is_copy(seed, short_text)
    assert not is_copy(seed, " ".join(seed.split()[:7]) + " " + _distinct(9, "c"))
    assert copying_share([(seed, text), (seed, text49)]).count == 1


# --- duplicates, irrelevance, overlap, judge -------------------------------------------------------------


def test_duplicate_share_counts_dropped_documents() -> None:
    docs = [_distinct(100, f"d{i}x") for i in range(10)]
    near = docs[3].split()
    near[50] = "zebra"  # J = 91/101 of 5-word shingles
    corpus = [*docs, docs[1].upper(), docs[1], " ".join(near)]
    share = duplicate_share(corpus)
    assert (share.count, share.total) == (3, 13)


def test_irrelevance_is_cosine_below_alpha() -> None:
    vectors = {"x": (1.0, 0.0), "y": (0.0, 1.0), "cos.8": (0.8, 0.6), "cos.6": (0.6, 0.8)}

    def encode(texts: Sequence[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    pairs = [("x", "cos.8"), ("x", "y"), ("x", "cos.6")]
    share = irrelevance_share(pairs, encode, alpha=0.6)
    assert (share.count, share.total) == (1, 3)  # a cosine of exactly α is not below it
    assert irrelevance_share(pairs, encode, alpha=0.81).count == 3
    assert irrelevance_share(pairs, encode, alpha=0.0).count == 0
    assert irrelevance_share(pairs, encode, alpha=0.6, batch=1) == share
    with pytest.raises(DataeffError, match="unit-norm"):
        irrelevance_share([("x", "y")], lambda texts: np.ones((len(texts), 2)), alpha=0.3)
    with pytest.raises(DataeffError, match="one row per text"):
        irrelevance_share([("x", "y"), ("y", "x")], lambda texts: np.ones((1, 2)) / np.sqrt(2), alpha=0.3)


def test_source_overlap_counts_every_occurrence_against_own_seed_or_pool() -> None:
    assert source_overlap(["a b c x y"], [2, 4], sources=["a b c d e"]).counts == {2: (2, 4), 4: (0, 2)}
    assert source_overlap(["a b a b a b"], [2], sources=["a b"]).counts == {2: (3, 5)}
    texts, seeds = ["p q r s", "x y z w"], ["x y z w", "p q r s"]
    assert source_overlap(texts, [2], seeds=seeds).counts == {2: (0, 6)}
    assert source_overlap(texts, [2], sources=seeds).counts == {2: (6, 6)}
    assert source_overlap(["a b"], [4], sources=["a b c d"]).share(4) is None  # no 4-grams to measure


def test_non_factual_share_excludes_abstentions() -> None:
    def judge(source: str, text: str) -> bool | None:
        return None if "?" in text else "cheese" in text

    items = [("", "the moon is cheese"), ("", "the sky is blue"), ("", "is it?"), ("", "cheese moon")]
    share, abstained = non_factual_share(items, judge)
    assert share is not None and (share.count, share.total, abstained) == (2, 3, 1)
    assert non_factual_share([("", "?")], judge) == (None, 1)
    with pytest.raises(DataeffError, match="judge returned"):
        non_factual_share([("", "x")], lambda s, t: "yes")


# --- rows, report, invariance ----------------------------------------------------------------------------


def _corpus(rng: np.random.Generator) -> Corpus:
    seeds = [_distinct(60, f"s{i}x") for i in range(12)]
    texts = [" ".join(seeds[0].split()[:55]) + " " + _distinct(20, "n"),  # copies its seed
             "the end " * 20,                                               # a loop
             *[_distinct(50, f"t{i}x") for i in range(10)]]
    texts.append(texts[5])                                                  # a duplicate
    return Corpus("synth", texts, [*seeds, seeds[0]])


def test_measure_and_report_with_a_real_reference_row() -> None:
    rng = np.random.default_rng(0)
    real = Corpus("real", [_distinct(50, f"r{i}x") for i in range(20)])
    cfg = QualityConfig(progress=False)
    judge_calls: list[tuple[str, str]] = []

    def judge(source: str, text: str) -> bool:
        judge_calls.append((source, text))
        return "end" in text

    report = quality_table([_corpus(rng)], real, cfg, judge=judge)
    real_row, synth = report.rows
    assert real_row.kind == "real" and real_row.pair_copying is None
    assert real_row.notes["pair_copying"].startswith("n/a")
    assert synth.repetition is not None and (synth.repetition.count, synth.repetition.total) == (1, 13)
    assert synth.duplicates is not None and synth.duplicates.count == 1
    assert synth.pair_copying is not None and (synth.pair_copying.count, synth.pair_copying.total) == (1, 13)
    assert synth.pair_irrelevance is None and synth.notes["pair_irrelevance"] == "not measured: no encoder"
    assert synth.non_factual is not None and synth.non_factual.count == 1
    assert synth.source_overlap is not None and synth.source_overlap.against == "seed"
    assert ("", "the end " * 20) not in judge_calls and any(src for src, _ in judge_calls)  # seeds reach the judge
    d = report.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["rows"][1]["pair_irrelevance"] is None
    md = report.to_markdown()
    assert md.splitlines()[2].startswith("| real (real)")
    assert "not measured" in md and "n/a" in md

    without_judge = measure(real, "real", cfg)
    assert without_judge.non_factual is None and without_judge.notes["non_factual"] == "not measured: no judge"
    assert without_judge.to_dict()["non_factual"] is None


def test_unpaired_corpus_overlaps_against_the_reference() -> None:
    real = Corpus("real", ["a b c d e f g h"])
    row = measure(Corpus("s", ["a b c d x y", "q r s t", "A, b c d e f g h!"]), "synthetic",
                  QualityConfig(progress=False, overlap_n=[2]), reference=real.texts)
    assert row.source_overlap is not None and row.source_overlap.against == "reference"
    assert row.source_overlap.counts == {2: (10, 15)}
    assert row.reference_copies is not None and (row.reference_copies.count, row.reference_copies.total) == (1, 3)
    assert row.notes["pair_copying"].startswith("n/a")
    alone = measure(Corpus("s", ["a b"]), "synthetic", QualityConfig(progress=False))
    assert alone.reference_copies is None and alone.notes["reference_copies"] == "n/a: no reference"


def test_sample_is_seeded_sorted_and_capped() -> None:
    assert sample_indices(5, 10, 0) == [0, 1, 2, 3, 4]
    s = sample_indices(1000, 50, 3)
    assert len(s) == 50 == len(set(s)) and s == sorted(s) and s == sample_indices(1000, 50, 3)
    assert s != sample_indices(1000, 50, 4)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(list(range(13))))
def test_metrics_do_not_depend_on_document_order(order: list[int]) -> None:
    corpus = _corpus(np.random.default_rng(0))
    shuffled = Corpus("synth", [corpus.texts[i] for i in order], [corpus.seeds[i] for i in order])  # type: ignore[index]
    cfg = QualityConfig(progress=False, overlap_n=[2, 8])
    a, b = measure(corpus, "synthetic", cfg), measure(shuffled, "synthetic", cfg)
    for key in ("repetition", "duplicates", "pair_copying", "source_overlap"):
        assert getattr(a, key) == getattr(b, key)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=40).map(" ".join), min_size=1, max_size=8))
def test_shares_are_bounded(texts: list[str]) -> None:
    for share in (repetition_share(texts), duplicate_share(texts), copying_share([(t, t[::-1]) for t in texts])):
        assert 0 <= share.count <= share.total == len(texts)
        low, high = share.ci95
        assert 0.0 <= low <= share.value <= high <= 1.0
    for matched, total in source_overlap(texts, [1, 3], sources=texts[:1]).counts.values():
        assert 0 <= matched <= total


# --- reading corpora and the command ---------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_corpus_schema(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", [
        json.dumps({"text": " story one ", "seed_text": "seed one", "model": "x"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "story two", "seed": 17}),
        json.dumps({"text": "story three", "seed": "seed three"}),
    ])
    corpus = read_corpus(path)
    assert corpus.texts == ["story one", "story two", "story three"]
    assert corpus.seeds == ["seed one", None, "seed three"] and corpus.empty == 1 and corpus.name == "s"
    assert read_corpus(_write(tmp_path / "u.jsonl", [json.dumps({"text": "x"})])).seeds is None


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "ok"', "s.jsonl:2: malformed JSON"),
    ('{"body": "x"}', "s.jsonl:2: no field 'text' (found: body)"),
    ('{"text": 3}', "s.jsonl:2: field 'text' is int, expected a string"),
    ('{"text": "x", "seed_text": [1]}', "s.jsonl:2: field 'seed_text' is list"),
    ('["text"]', "s.jsonl:2: expected a JSON object"),
])
def test_read_corpus_refuses_bad_lines_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "s.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(DataeffError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_corpus(path)


def test_quality_command_writes_json_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real.txt"
    real.write_text("\n\n".join(_distinct(40, f"r{i}x") for i in range(30)), encoding="utf-8")
    synth = _write(tmp_path / "gen.jsonl", [json.dumps({"text": t, "seed_text": s})
                                           for t, s in zip(_corpus(np.random.default_rng(0)).texts,
                                                           _corpus(np.random.default_rng(0)).seeds or [], strict=True)])
    out = tmp_path / "q" / "quality.json"
    assert main(["quality", str(synth), f"reference={real}", f"out={out}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| real/train (real)" in printed and "| gen (synthetic)" in printed
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert [r["kind"] for r in report["rows"]] == ["real", "synthetic"]
    assert report["rows"][1]["repetition"]["count"] == 1
    assert report["rows"][0]["non_factual"] is None

    bad = _write(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"txt": "b"}'])
    assert main(["quality", str(bad), f"out={tmp_path / 'x.json'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dataeff: error: {bad}:2: no field 'text' (found: txt)"]
    assert not (tmp_path / "x.json").exists()


def test_real_data_reference_row(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reference row on real TinyStories and WikiText-2 text: loops almost never fire, and the same documents
    with a sampling loop appended are all flagged."""
    from dataeff.data import DataConfig, read_source, resolve_sources

    cfg = QualityConfig(progress=False, sample=2000)
    rows = []
    for corpus in ("tinystories", "wikitext2"):
        docs = read_source(resolve_sources(DataConfig(corpus=corpus))["val"])
        row = measure(Corpus(f"{corpus}/val", docs), "real", cfg)
        rows.append(row)
        assert row.repetition is not None and row.repetition.value < 0.01
        assert row.duplicates is not None
        if corpus == "tinystories":
            assert row.duplicates.value < 0.01
        else:
            # WikiText-2 read one line per document has section headings ("= = History = ="): those are its
            # duplicates, and nothing else is.
            dropped = NearDup().find(docs).drop
            assert dropped and all(docs[i].startswith("=") or len(docs[i].split()) <= 8 for i in dropped)
        looped = [d + " " + " ".join(["and then she went to the park"] * 5) for d in docs[:200]]
        assert repetition_share(looped).count == 200
    with capsys.disabled():
        print()
        for row in rows:
            assert row.repetition is not None and row.duplicates is not None
            print(f"reference row {row.name}: repetition {row.repetition.cell()}, duplicates {row.duplicates.cell()}, "
                  f"median {row.median_words:.0f} words")


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="min_copies"):
        RepetitionConfig(min_copies=1)
    with pytest.raises(ValueError, match="share"):
        RepetitionConfig(share=1.5)
    with pytest.raises(ValueError, match="share"):
        CopyingConfig(share=0)
    with pytest.raises(ValueError, match="alpha"):
        QualityConfig(alpha=2)
    with pytest.raises(ValueError, match="no documents"):
        repetition_share([])
    with pytest.raises(ValueError, match="between"):
        Share(3, 2)
