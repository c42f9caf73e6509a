"""The answer cache: one SQLite file, content-addressed by request key, safe to share between processes.

Three tables:

- ``answers``: one row per request key that got a valid answer, written (and committed) the moment it
  arrives, so a job killed at any point resumes without sending a finished request again. Only successes are
  stored: a failed request is sent again by the next run.
- ``parse_failures``: every raw answer that failed its schema, with the error and its token usage; nothing
  the provider billed is lost, and a later fix of the parser can re-read them.
- ``batches``: the journal of Batch API submissions (uploaded file, batch id, request keys, status), so a
  restarted job polls the batches it already paid for instead of submitting them again.

WAL mode with ``synchronous=NORMAL`` keeps a commit durable across a killed process (not across power loss)
at a few tens of microseconds per answer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataeff.errors import DataeffError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL, finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
    batch INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS parse_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, model TEXT NOT NULL, raw TEXT NOT NULL,
    error TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS parse_failures_key ON parse_failures(key);
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY, batch_id TEXT, keys TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
"""
_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds) or 32766.
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = 0.0
    batch: bool = False


@dataclass(frozen=True)
class BatchEntry:
    input_file_id: str
    batch_id: str | None
    keys: list[str]
    status: str


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


class Cache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataeffError(f"{self.path}: not a usable answer cache ({e})") from None

    def close(self) -> None:
        self.db.close()

    # answers

    def get_many(self, keys: Sequence[str]) -> dict[str, Answer]:
        found: dict[str, Answer] = {}
        for chunk in _chunks(keys):
            rows = self.db.execute(
                "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, cost_usd, batch FROM answers "
                f"WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, text, finish, p, c, cost, batch in rows:
                found[key] = Answer(text, finish, p, c, cost, bool(batch))
        return found

    def put(self, key: str, model: str, answer: Answer) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens,
             answer.cost_usd, int(answer.batch), time.time()))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    # parse failures

    def add_parse_failure(self, key: str, model: str, answer: Answer, error: str) -> None:
        self.db.execute(
            "INSERT INTO parse_failures (key, model, raw, error, prompt_tokens, completion_tokens, cost_usd, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, answer.text, error, answer.prompt_tokens, answer.completion_tokens, answer.cost_usd,
             time.time()))

    def parse_failures(self, key: str | None = None) -> list[dict[str, object]]:
        sql = "SELECT key, raw, error, prompt_tokens, completion_tokens, cost_usd FROM parse_failures"
        rows = self.db.execute(sql + " WHERE key = ? ORDER BY id", (key,)) if key else self.db.execute(sql + " ORDER BY id")
        names = ("key", "raw", "error", "prompt_tokens", "completion_tokens", "cost_usd")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def failure_spend(self, keys: Sequence[str]) -> tuple[int, float]:
        """Tokens and cost of the failed parses of ``keys``: paid for, though no answer came of them."""
        tokens, cost = 0, 0.0
        for chunk in _chunks(keys):
            t, c = self.db.execute(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost_usd), 0) "
                f"FROM parse_failures WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchone()
            tokens, cost = tokens + int(t), cost + float(c)
        return tokens, cost

    # batch journal

    def add_batch(self, input_file_id: str, keys: Iterable[str]) -> None:
        now = time.time()
        self.db.execute("INSERT INTO batches VALUES (?, NULL, ?, 'uploaded', ?, ?)",
                        (input_file_id, json.dumps(list(keys)), now, now))

    def set_batch(self, input_file_id: str, batch_id: str | None, status: str) -> None:
        self.db.execute("UPDATE batches SET batch_id = ?, status = ?, updated = ? WHERE input_file_id = ?",
                        (batch_id, status, time.time(), input_file_id))

    def open_batches(self) -> list[BatchEntry]:
        """Submissions not yet collected: uploaded but maybe not created, or created and not finished."""
        rows = self.db.execute(
            "SELECT input_file_id, batch_id, keys, status FROM batches WHERE status != 'collected' ORDER BY created")
        return [BatchEntry(f, b, json.loads(k), s) for f, b, k, s in rows]
