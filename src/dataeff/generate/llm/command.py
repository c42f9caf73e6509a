"""``dataeff llm``: a JSONL file of requests through the generation client, a JSONL file of results out.

Each request line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": TEXT}`` (one user
message, after an optional ``"system"`` message), with optional ``sample_index``, ``prompt_version``,
``params`` (temperature, top_p, max_tokens, stop, seed) and ``"json": true`` (the answer must be a JSON
object; it is validated, re-asked if it is not, and returned parsed under ``"json"``). Each result line,
in request order: ``index, ok, text, json, error, cached, finish_reason, prompt_tokens, completion_tokens,
cost_usd, attempts``. The command prints the job summary as JSON; a job that stopped before answering
everything (budget, error rate, unreachable server, pending batches) ends with an error line saying why,
after its results so far are written. Rerun the same command to continue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path
from dataeff.generate.llm.config import LLMJobConfig
from dataeff.generate.llm.job import JobResult, run_job
from dataeff.generate.llm.request import Request

_KEYS = {"messages", "prompt", "system", "sample_index", "prompt_version", "params", "json"}


def read_requests(path: str | Path) -> list[Request]:
    p = Path(path)
    if not p.is_file():
        raise DataeffError(f"requests: {p}: no such file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataeffError(f"{p}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or set(row) - _KEYS or ("messages" in row) == ("prompt" in row):
            raise DataeffError(f"{p}:{n}: expected an object with messages or prompt (and optionally "
                               f"{', '.join(sorted(_KEYS - {'messages', 'prompt'}))})")
        messages = row.get("messages")
        if messages is None:
            messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
                [{"role": "user", "content": row["prompt"]}]
        out.append(Request(messages=messages, schema=dict[str, Any] if row.get("json") else None,
                           sample_index=row.get("sample_index", 0), prompt_version=row.get("prompt_version", ""),
                           params=row.get("params") or {}))
    return out


def write_results(path: str | Path, job: JobResult) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in job.results:
            f.write(json.dumps({
                "index": r.index, "ok": r.ok, "text": r.text, "json": r.parsed, "error": r.error, "cached": r.cached,
                "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "cost_usd": r.cost_usd, "attempts": r.attempts,
            }, ensure_ascii=False) + "\n")


def llm_command(cfg: LLMJobConfig) -> JobResult:
    if not cfg.requests or not cfg.out:
        raise DataeffError("llm: set requests=FILE.jsonl and out=RESULTS.jsonl")
    requests = read_requests(cfg.requests)
    manifest = cfg.manifest or str(Path(cfg.out).with_suffix(".manifest.json"))
    job = run_job(cfg.llm, requests, manifest=manifest)
    write_results(cfg.out, job)
    print(json.dumps(job.summary.to_dict(), indent=2))
    if job.summary.stop_reason != "done":
        raise DataeffError(f"llm: stopped early: {job.summary.stop_message}; results so far in {cfg.out}")
    return job
