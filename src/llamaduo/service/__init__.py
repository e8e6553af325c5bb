"""The only network client: calls to the service LLM.

    client = ServiceClient(cfg.service, db_path=store.service_db)
    reply = await client.chat_json(messages, schema=JudgeReply, model="gpt-4o", temperature=0.7,
                                   max_tokens=512, sample_index=3, stage="judge", round=0)
    reply.ok, reply.parsed, reply.raw, reply.error, reply.cached
    results = client.run([coro, ...], progress=reporter)   # in order; reporter: optional ProgressReporter
    replies = client.run_batch([(messages, JudgeReply, {"sample_index": 3}), ...], model="gpt-4o",
                               temperature=0.7, max_tokens=512, stage="judge", round=0)  # Batch API

Every attempt is logged in SQLite (`service.sqlite`, see `calllog`): request hash, model, tokens,
cost, latency, status, raw reply. Successful replies are cached by content (provider, model,
messages, parameters, sample index), so a rerun with unchanged inputs sends nothing. Provider
faults (429, 5xx, timeouts, connection errors, malformed bodies) are retried within limits and
never raise; a reply that is not valid JSON for its schema gets bounded repair calls. Any other
exception is a bug and propagates; of the expected outcomes only `BudgetExceeded` raises, so the
loop can stop cleanly. API keys are read from the environment at call time and never written.
Nothing here draws on a terminal: `run` reports progress to the `ProgressReporter` it is given.

Modules: `api` (types and the `Client` protocol), `client` (the call path), `providers` (OpenAI-
compatible and Anthropic), `anthropic_tools` (OpenAI's tools, tool turns and response formats in
Anthropic's shapes), `transport` (HTTP for OpenAI-compatible chat calls), `retry` (faults, the
retry loop), `parsing` (JSON out of replies), `batch` (the Batch API, over several provider
batches when a job is larger than one), `pricing` (cost, budget), `pacing` (RPM/TPM), `calllog`
(SQLite).
"""

from llamaduo.service.api import (
    BatchRequest,
    BudgetExceeded,
    Client,
    ProgressReporter,
    ServiceError,
    ServiceReply,
    UnsupportedField,
)
from llamaduo.service.client import ServiceClient
from llamaduo.service.parsing import extract_json, strict_schema

__all__ = [
    "BatchRequest",
    "BudgetExceeded",
    "Client",
    "ProgressReporter",
    "ServiceClient",
    "ServiceError",
    "ServiceReply",
    "UnsupportedField",
    "extract_json",
    "strict_schema",
]
