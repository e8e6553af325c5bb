"""The service API key: read from the environment variable the config names, never from the config.

`api_key` is what the client sends; `require_key` is what `llamaduo run` checks before its first
stage, so a missing key is said at once instead of after round 0 has trained.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from llamaduo.config import ServiceConfig
from llamaduo.service.api import ServiceError


def _loopback(base_url: str | None) -> bool:
    host = urlparse(base_url or "").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def api_key(cfg: ServiceConfig) -> str:
    """The key in `cfg.api_key_env`; a loopback server without one gets a placeholder (they ignore it)."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if _loopback(cfg.base_url):
        return "not-needed"
    raise ServiceError(
        f"service.api_key_env: environment variable {cfg.api_key_env} is not set; export it (or name the variable "
        "that holds the key) before running — nothing has been run or paid for"
    )


def require_key(cfg: ServiceConfig) -> None:
    """Fail now, in one line, when the service key a run will need is missing."""
    api_key(cfg)
