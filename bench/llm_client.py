"""Generation-client throughput: requests/s against `dataeff serve`'s fixed-latency test model, and cache hits/s.

The server runs in its own process (``dataeff serve test``, answers after exactly ``--latency`` seconds, an
async sleep), so what limits the rate is the client: its limiter, retry wrapper, the openai SDK, the SQLite
commit of every answer, the result bookkeeping. A client without overhead would do ``concurrency / latency``
requests/s (``ideal_rps_*``); the target is at least 0.9 of that at concurrency 1, 8 and 64.

Cache hits: a job of ``--cached`` requests whose answers are all in the cache (stored through the cache's
own API under the job's keys, so filling it costs no server time) is run end to end by ``run_job``: keys,
lookups, re-validation, results, manifest. Target: at least 5,000 answers/s.

The last line is one JSON object: rps_c1, rps_c8, rps_c64 and their ideal_rps_*, ratio_c64, cached_rps.

    python bench/llm_client.py            # latency 1 s; 10, 80 and 640 requests; 20,000 cached; ~40 s
    python bench/llm_client.py --quick    # 6, 48 and 384 requests; 5,000 cached; ~25 s

The machine's 1-minute load average is printed with the figures: on a shared machine, time the client waits for
a core adds to every request's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataeff.generate.llm import Answer, Cache, LLMConfig, Request, request_key, run_job
from dataeff.generate.llm.request import resolve_params


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "dataeff.cli", "serve", "test", "port=0",
                             f"test_latency={latency}", "test_tokens=16"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("dataeff serve: "):
        proc.kill()
        raise SystemExit(f"dataeff serve did not start: {line!r}")
    return proc, line.split()[2]


def requests(n: int, tag: str) -> list[Request]:
    return [Request([{"role": "system", "content": "You rewrite text."},
                     {"role": "user", "content": f"Rewrite document {tag}-{i} in plain words."}]) for i in range(n)]


def config(url: str, cache: Path, concurrency: int) -> LLMConfig:
    return LLMConfig(base_url=url, model="test", api_key_env="", cache=str(cache), concurrency=concurrency,
                     max_tokens=16, progress=False, timeout=30.0)


def online_rps(url: str, work: Path, concurrency: int, n: int) -> float:
    cfg = config(url, work / f"c{concurrency}.sqlite", concurrency)
    start = time.perf_counter()
    job = run_job(cfg, requests(n, f"c{concurrency}"), manifest=work / f"c{concurrency}.json")
    elapsed = time.perf_counter() - start
    if job.summary.answered != n:
        raise SystemExit(f"concurrency {concurrency}: {job.summary.line()}")
    return n / elapsed


def cached_rps(url: str, work: Path, n: int) -> float:
    cfg = config(url, work / "cached.sqlite", 64)
    reqs = requests(n, "cached")
    cache = Cache(cfg.cache)
    for req in reqs:
        key = request_key(cfg.model, req, resolve_params(cfg, req))
        cache.put(key, cfg.model, Answer("a cached answer of sixteen words " * 2, "length", 20, 16))
    cache.close()
    start = time.perf_counter()
    job = run_job(cfg, reqs, manifest=work / "cached.json")
    elapsed = time.perf_counter() - start
    if job.summary.cached != n or job.summary.sent:
        raise SystemExit(f"cached: {job.summary.line()}")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests: ~25 s")
    parser.add_argument("--latency", type=float, default=1.0, help="the test model's seconds per answer")
    parser.add_argument("--rounds", type=float, default=0, help="requests per concurrency slot (0: 10, or 6 with --quick)")
    parser.add_argument("--cached", type=int, default=0, help="cached requests (0: 20000, or 5000 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (6 if args.quick else 10)
    n_cached = args.cached or (5000 if args.quick else 20000)
    proc, url = start_server(args.latency)
    out: dict[str, float] = {"latency_s": args.latency, "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for c in (1, 8, 64):
                rps = online_rps(url, work, c, int(rounds * c))
                ideal = c / args.latency
                out |= {f"rps_c{c}": round(rps, 2), f"ideal_rps_c{c}": round(ideal, 2), f"ratio_c{c}": round(rps / ideal, 3)}
                print(f"concurrency {c:>2}: {rps:8.2f} requests/s, ideal {ideal:7.2f}, ratio {rps / ideal:.3f}", flush=True)
            out["cached_requests"] = n_cached
            out["cached_rps"] = round(cached_rps(url, work, n_cached), 1)
            print(f"cache hits: {out['cached_rps']:,.0f} answers/s over {n_cached:,} requests", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
