"""What the stages see of the service: reply and request types, errors, and the typed interfaces
(`Client` for judge, synth, deploy and serve; `ProgressReporter` for whoever draws progress)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from llamaduo.errors import UserError
from llamaduo.reporting import ProgressReporter

T = TypeVar("T")


@dataclass
class ServiceReply:
    ok: bool
    parsed: BaseModel | None
    raw: str | None
    error: str | None = None
    cached: bool = False
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    extra: dict[str, Any] | None = None


class BudgetExceeded(RuntimeError):
    """Raised before a call that would start after the run's budget is spent."""


class ServiceError(UserError):
    """A configuration problem with the service (missing key, unknown provider)."""


class UnsupportedField(ValueError):
    """A request field (tools, response_format ...) this provider's API path cannot carry."""

    def __init__(self, field: str, provider: str, why: str = ""):
        super().__init__(f"the {provider} provider cannot carry {field}" + (f": {why}" if why else ""))
        self.field, self.provider, self.why = field, provider, why


BatchRequest = tuple[list[dict[str, str]], type[BaseModel] | None, dict[str, Any]]
"""One `run_batch` request: (messages, schema or None for a text reply, meta with `sample_index`)."""


class Client(Protocol):
    """The service client as the stages use it (`ServiceClient` is the implementation)."""

    async def chat_json(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        sample_index: int = 0,
        stage: str = "",
        round: int | None = None,
    ) -> ServiceReply: ...

    async def chat_text(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        sample_index: int = 0,
        stage: str = "",
        round: int | None = None,
        request_fields: dict[str, Any] | None = None,
    ) -> ServiceReply: ...

    def run(self, coros: Sequence[Awaitable[T]], progress: ProgressReporter | None = None) -> list[T]: ...

    def run_batch(
        self,
        requests: Sequence[BatchRequest],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        stage: str = "",
        round: int | None = None,
        poll_s: float = 5.0,
        timeout_s: float = 86400.0,
    ) -> list[ServiceReply]: ...

    def ledger(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
