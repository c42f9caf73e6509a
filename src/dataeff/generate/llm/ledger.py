"""Token and cost accounting, and the hard budget.

Cost is ``prompt_tokens · input + completion_tokens · output`` with the config's prices in USD per million
tokens, times ``batch_discount`` for Batch API answers. The budget bounds what the *job's* answers cost:
every answer the job returns (those bought by an earlier run count at the price recorded in the cache),
plus the tokens of answers that failed their schema. A killed and rerun job therefore stays within one
budget, and a stopped one resumes by raising it.

The budget is hard: before an attempt is sent, its worst case (an upper bound on its prompt tokens plus
``max_tokens``) is reserved, and an attempt whose worst case does not fit beside what is spent and what is
in flight is not sent; the job stops cleanly instead, with nothing half-done.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataeff.errors import DataeffError
from dataeff.generate.llm.config import LLMConfig


@dataclass(frozen=True)
class Price:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) * factor / 1e6


def price_for(cfg: LLMConfig, model: str) -> Price:
    """The configured price of ``model``; a cost budget without one is refused, never silently free."""
    entry = cfg.prices.get(model)
    if entry is None:
        if cfg.budget_usd > 0:
            known = ", ".join(sorted(cfg.prices)) or "none"
            raise DataeffError(f"llm.prices: no price for model {model!r} (priced: {known}); a cost budget needs "
                               f"llm.prices.{model}.input and .output in USD per million tokens")
        return Price(0.0, 0.0)
    return Price(float(entry.get("input", 0.0)), float(entry.get("output", 0.0)))


class Ledger:
    def __init__(self, cfg: LLMConfig, price: Price, prior_tokens: int = 0, prior_cost: float = 0.0):
        self.budget_tokens = cfg.budget_tokens
        self.budget_usd = cfg.budget_usd
        self.price = price
        self.prior_tokens, self.prior_cost = prior_tokens, prior_cost  # the job's spend before this run
        self.prompt_tokens = self.completion_tokens = 0  # this run
        self.cost = 0.0
        self.reserved_tokens, self.reserved_cost = 0, 0.0

    @property
    def job_tokens(self) -> int:
        return self.prior_tokens + self.prompt_tokens + self.completion_tokens

    @property
    def job_cost(self) -> float:
        return self.prior_cost + self.cost

    def reserve(self, tokens: int, factor: float = 1.0, completion: int = 0,
                force: bool = False) -> tuple[int, float] | None:
        """Reserve an attempt's worst case (``tokens`` in all, ``completion`` of them completion tokens);
        ``None`` when it does not fit the budget, unless ``force`` (work already submitted, to be billed)."""
        cost = self.price.cost(tokens - completion, completion, factor)
        if not force and self.budget_tokens and self.job_tokens + self.reserved_tokens + tokens > self.budget_tokens:
            return None
        if not force and self.budget_usd and self.job_cost + self.reserved_cost + cost > self.budget_usd:
            return None
        self.reserved_tokens += tokens
        self.reserved_cost += cost
        return tokens, cost

    def release(self, reservation: tuple[int, float]) -> None:
        self.reserved_tokens -= reservation[0]
        self.reserved_cost -= reservation[1]

    def charge(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float:
        cost = self.price.cost(prompt_tokens, completion_tokens, factor)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += cost
        return cost

    @property
    def exhausted_message(self) -> str:
        parts = []
        if self.budget_tokens:
            parts.append(f"{self.job_tokens:,} of {self.budget_tokens:,} tokens")
        if self.budget_usd:
            parts.append(f"${self.job_cost:.4f} of ${self.budget_usd:.4f}")
        return "budget reached: the job's answers used " + " and ".join(parts) + \
            "; the next request could exceed it (raise llm.budget_tokens / llm.budget_usd and rerun to continue)"
