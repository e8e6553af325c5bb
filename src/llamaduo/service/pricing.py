"""What a call costs (`service.prices`) and the run's budget in USD and tokens."""

from __future__ import annotations

from llamaduo.config import Price, ServiceConfig
from llamaduo.service.api import BudgetExceeded


def price(prices: dict[str, Price], model: str) -> tuple[float, float] | None:
    """(USD per M input tokens, per M output tokens); a dated model name matches its family's
    longest listed prefix (`gpt-4o-2024-08-06` -> `gpt-4o`). None when the model has no price."""
    if model in prices:
        p = prices[model]
    else:
        match = max((k for k in prices if model.startswith(k)), key=len, default=None)
        if match is None:
            return None
        p = prices[match]
    return p.input_per_mtok, p.output_per_mtok


def cost(prices: dict[str, Price], model: str, tin: int, tout: int) -> float:
    p = price(prices, model)
    return 0.0 if p is None else (tin * p[0] + tout * p[1]) / 1e6


class Budget:
    """Spend so far (seeded from the call log, so a new process sees earlier spend) against the limits."""

    def __init__(self, cfg: ServiceConfig, usd: float = 0.0, tokens: int = 0):
        self.max_usd = cfg.max_usd
        self.max_tokens = cfg.max_tokens
        self.usd = usd
        self.tokens = tokens

    def check(self) -> None:
        if self.max_usd is not None and self.usd >= self.max_usd:
            raise BudgetExceeded(f"spent ${self.usd:.4f} of max_usd ${self.max_usd}")
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            raise BudgetExceeded(f"used {self.tokens} of max_tokens {self.max_tokens}")

    def spend(self, usd: float, tokens: int) -> None:
        self.usd += usd
        self.tokens += tokens
