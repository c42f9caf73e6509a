"""QuALITY for closed-book (and open-book) question answering, as the EntiGraph paper asks it: each question
prefixed with its article's reference so that it makes sense without the article, validation and test split
by article, accuracy with bootstrap intervals.

Two ways to answer. By log-likelihood (:mod:`dataeff.eval.tasks`, tasks ``quality`` and ``quality_val``),
like the other multiple-choice tasks: each option is scored as a continuation of the question. By
generation from a few-shot chain-of-thought prompt (:func:`cot_messages`, sent through the generation client
by :mod:`dataeff.generate.qa`): the shots are our own, about well-known books outside QuALITY, so no QuALITY
content leaks into the prompt; an answer is read by :func:`parse_answer`, and one that never yields a
letter of the question's options counts as not attempted, never as right.

The data is L-Eval's 15-article QuALITY subset (``quality_leval_subset/quality.jsonl``): one article per
line, its questions with options ``(A) ... (D)`` inside the question text and gold answers ``(B) ...``. The
few questions L-Eval added are kept (they cannot be told apart reliably by their text).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dataeff.errors import DataeffError
from dataeff.fsutil import json_records

Split = Literal["validation", "test", "all"]
VALIDATION_SHARE = 0.2  # the first 20% of articles by title, as in EntiGraph's code; the rest is test

_OPTION = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$", re.M)
_GOLD = re.compile(r"^\s*\(([A-Z])\)")
_BY = re.compile(r"^by\b\s*(.*)$", re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# "Answer: B.", "answer is (C)"; the letter is a capital, so "answer a question" is no answer.
_ANSWER = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*\(?([A-Z])\b")


@dataclass
class QAItem:
    """One question: its article's reference, the options and the gold index; ``passages`` (open book)
    are retrieved text placed before the question."""

    article: str  # the article's reference: title, and author when known
    title: str
    author: str | None
    question: str
    options: list[str]
    gold: int
    where: str  # file:line of its article
    passages: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The question as asked closed-book: prefixed with the article's reference."""
        by = f", written by {self.author}," if self.author else ","
        q = self.question[:1].lower() + self.question[1:]
        return f'In the context of "{self.title}"{by} {q}'

    @property
    def context(self) -> str:
        """The log-likelihood context: any passages, the question, then the answer cue."""
        return "".join(f"{p}\n\n" for p in self.passages) + f"Question: {self.prompt}\nAnswer:"


def _clean(line: str) -> str:
    line = " ".join(line.split())
    # Pulp-magazine headers are set in capitals; "LARRY M. HARRIS" reads as "Larry M. Harris".
    return string.capwords(line.lower()) if line.isupper() else line


def article_reference(text: str) -> tuple[str, str | None]:
    """(title, author) from an article's first lines: the title, then a "By AUTHOR" line when there is one."""
    lines = [_clean(x) for x in _COMMENT.sub("", text).split("\n") if x.strip()]
    if not lines:
        return "", None
    title, author = lines[0].rstrip("."), None
    for i, line in enumerate(lines[1:4], start=1):
        m = _BY.match(line)
        if m:
            author = _clean(m.group(1)) if m.group(1) else (lines[i + 1] if i + 1 < len(lines) else None)
            break
    return title, author


def _question(text: str, where: str) -> tuple[str, list[str]]:
    """The question's stem and its options, in order A, B, ... (a gap or a repeat is refused)."""
    found = list(_OPTION.finditer(text))
    if len(found) < 2:
        raise DataeffError(f"{where}: expected options (A) ... (B) ... in the question, found {len(found)}")
    letters = [m.group(1) for m in found]
    if letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise DataeffError(f"{where}: options are labelled {', '.join(letters)}; expected A, B, ... in order")
    return " ".join(text[: found[0].start()].split()), [" ".join(m.group(2).split()) for m in found]


@dataclass(frozen=True)
class Article:
    reference: str  # title, and " by AUTHOR" when known
    title: str
    author: str | None
    text: str
    where: str  # file:line


def _records(path: Path) -> Iterator[tuple[Article, list[Any], list[Any]]]:
    """Each line's article with its raw questions and answers."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataeffError(f"{path}: not valid UTF-8 ({e.reason})") from None
    for where, record in json_records(raw, str(path)):
        text, questions, answers = record.get("input"), record.get("instructions"), record.get("outputs")
        if not isinstance(text, str) or not text.strip():
            raise DataeffError(f"{where}: field 'input' (the article) must be a non-empty string")
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise DataeffError(f"{where}: fields 'instructions' and 'outputs' must be lists of equal length")
        title, author = article_reference(text)
        yield Article(f"{title} by {author}" if author else title, title, author, text, where), questions, answers


def read_articles(path: str | Path) -> list[Article]:
    """The articles of an L-Eval QuALITY file, in file order (for open-book retrieval and raw CPT)."""
    return [article for article, _, _ in _records(Path(path))]


def read_quality(path: str | Path) -> list[QAItem]:
    """Every question of an L-Eval QuALITY file, in file order."""
    path = Path(path)
    items = []
    for article, questions, answers in _records(path):
        for j, (q, a) in enumerate(zip(questions, answers, strict=True), start=1):
            at = f"{article.where}: question {j}"
            if not isinstance(q, str) or not isinstance(a, str):
                raise DataeffError(f"{at}: the question and its answer must be strings")
            stem, options = _question(q, at)
            m = _GOLD.match(a)
            if m is None:
                raise DataeffError(f"{at}: the answer {a[:40]!r} does not start with an option letter such as (B)")
            gold = ord(m.group(1)) - ord("A")
            if gold >= len(options):
                raise DataeffError(f"{at}: answer letter {m.group(1)} is out of range (options A-"
                                   f"{chr(ord('A') + len(options) - 1)})")
            items.append(QAItem(article.reference, article.title, article.author, stem, options, gold, article.where))
    if not items:
        raise DataeffError(f"{path}: holds no questions")
    return items


def split_items(items: list[QAItem], split: Split) -> list[QAItem]:
    """The questions of the validation articles (the first 20% by title) or the test articles (the rest)."""
    if split == "all":
        return list(items)
    articles = sorted({it.article for it in items}, key=str.casefold)
    n_val = max(1, round(VALIDATION_SHARE * len(articles)))
    if len(articles) < 2:
        raise DataeffError(f"quality: {len(articles)} article; a validation/test split needs two or more")
    chosen = set(articles[:n_val] if split == "validation" else articles[n_val:])
    return [it for it in items if it.article in chosen]


# ---------------------------------------------------------------------------------------------------------
# accuracy


def bootstrap_interval(correct: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``correct`` (0/1 per question), resampling questions."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) == 0:
        return math.nan, math.nan
    means = np.random.default_rng(seed).choice(correct, size=(n_boot, len(correct)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def accuracy(correct: np.ndarray, name: str = "acc") -> dict[str, float | list[float]]:
    """``name`` (the mean) and ``name_ci`` (its 95% bootstrap interval)."""
    lo, hi = bootstrap_interval(correct)
    return {name: float(np.mean(correct)), f"{name}_ci": [lo, hi]}


# ---------------------------------------------------------------------------------------------------------
# generation: few-shot chain of thought


@dataclass(frozen=True)
class Shot:
    title: str
    author: str
    question: str
    options: tuple[str, str, str, str]
    reasoning: str
    answer: str


# Our own questions about well-known books, none of them in QuALITY.
SHOTS = (
    Shot("Moby-Dick", "Herman Melville", "What does Captain Ahab want above all?",
         ("To bring home a full cargo of oil", "To kill the white whale that took his leg",
          "To find a new route to the Pacific", "To rescue a lost crew"),
         "Ahab lost his leg to the white whale, Moby Dick, and he drives the Pequod around the world to hunt it, "
         "caring little for the cargo.", "B"),
    Shot("Pride and Prejudice", "Jane Austen", "Why does Elizabeth first refuse Mr. Darcy's proposal?",
         ("She is already engaged to Mr. Collins", "She wants to marry for money",
          "She believes he is proud and that he harmed Wickham and her sister Jane", "Her father forbids it"),
         "Elizabeth thinks Darcy arrogant, believes Wickham's story against him, and knows he separated Jane from "
         "Bingley, so she refuses him.", "C"),
    Shot("Frankenstein", "Mary Shelley", "What does the creature ask Victor to make for him?",
         ("A companion of his own kind", "A ship to sail to England", "A new face", "A home in Geneva"),
         "Lonely and rejected by people, the creature demands that Victor create a female companion for him.",
         "A"),
    Shot("Romeo and Juliet", "William Shakespeare", "Why does Juliet drink the friar's potion?",
         ("To poison Tybalt", "To fake her death and escape marrying Paris", "To forget Romeo",
          "To cure an illness"),
         "Her parents insist she marry Paris; the friar's potion makes her seem dead so that she can later join "
         "Romeo.", "B"),
    Shot("Nineteen Eighty-Four", "George Orwell", "What is Winston Smith's job at the Ministry of Truth?",
         ("Writing new laws", "Guarding prisoners", "Training the Thought Police",
          "Rewriting old newspaper articles to match the Party's current line"),
         "Winston alters past records and news stories so that they always agree with what the Party says now.",
         "D"),
)

SYSTEM = ("Answer multiple-choice questions about books and articles from memory. Think step by step, then end "
          "with a line of the form 'Answer: X.' where X is the letter of the correct option.")


def _ask(prompt: str, options: list[str] | tuple[str, ...], passages: list[str]) -> str:
    lines = [f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(options)]
    context = "".join(f"{p}\n\n" for p in passages)
    return f"{context}Question: {prompt}\n" + "\n".join(lines)


def cot_messages(item: QAItem, n_shots: int = 5) -> list[dict[str, str]]:
    """A chat of ``n_shots`` worked examples then the question; retrieved passages come before the question."""
    if not 0 <= n_shots <= len(SHOTS):
        raise DataeffError(f"quality: n_shots={n_shots} must be 0-{len(SHOTS)}")
    messages = [{"role": "system", "content": SYSTEM}]
    for s in SHOTS[:n_shots]:
        prompt = f'In the context of "{s.title}", written by {s.author}, {s.question[:1].lower()}{s.question[1:]}'
        messages.append({"role": "user", "content": _ask(prompt, s.options, [])})
        messages.append({"role": "assistant", "content": f"{s.reasoning}\nAnswer: {s.answer}."})
    messages.append({"role": "user", "content": _ask(item.prompt, item.options, item.passages)})
    return messages


def parse_answer(text: str | None, n_options: int) -> int | None:
    """The option index of the last ``Answer: X`` in ``text``, or None when there is none or X is no option."""
    if not text:
        return None
    found = _ANSWER.findall(text)
    if not found:
        return None
    index = ord(found[-1].upper()) - ord("A")
    return index if 0 <= index < n_options else None


def score_answers(items: list[QAItem], answers: list[int | None]) -> dict[str, float | int | list[float]]:
    """Accuracy over all questions (an unattempted one is wrong), the attempt rate, and the accuracy over the
    attempted questions only (what EntiGraph's code reports), each with a bootstrap interval."""
    if len(items) != len(answers):
        raise DataeffError(f"quality: {len(answers)} answers for {len(items)} questions")
    attempted = np.array([a is not None for a in answers], dtype=np.float64)
    correct = np.array([a == it.gold for it, a in zip(items, answers, strict=True)], dtype=np.float64)
    out: dict[str, float | int | list[float]] = {"n": len(items), "chance": float(np.mean([1 / len(it.options) for it in items])),
                                                 **accuracy(correct), **accuracy(attempted, "attempt_rate")}
    if attempted.any():
        out |= accuracy(correct[attempted > 0], "acc_attempted")
    return out
