"""The generation client: one interface to OpenAI-compatible endpoints and to local models, built to be
trusted with a large bill.

    from dataeff.generate.llm import LLMConfig, Request, run_job

    cfg = LLMConfig(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B", api_key_env="")
    job = run_job(cfg, [Request([{"role": "user", "content": "Name three rivers."}])], manifest="job.json")
    job.results[0].text, job.summary.line()

See :mod:`dataeff.generate.llm.job` for the contract (cache, limits, retries, budget, early stops) and
``docs/generation.md`` for configs and the faults handled.
"""

from dataeff.generate.llm.cache import Answer, Cache
from dataeff.generate.llm.config import LLMConfig, LLMJobConfig
from dataeff.generate.llm.job import JobResult, JobSummary, run_job, run_job_async
from dataeff.generate.llm.request import Request, Result, request_key
from dataeff.generate.llm.template import chat_to_text

__all__ = [
    "Answer",
    "Cache",
    "JobResult",
    "JobSummary",
    "LLMConfig",
    "LLMJobConfig",
    "Request",
    "Result",
    "chat_to_text",
    "request_key",
    "run_job",
    "run_job_async",
]
