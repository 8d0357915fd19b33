"""The OpenAI SDK client, and how its errors map onto item outcomes.

Retries (429 honouring Retry-After, 5xx, timeouts, connection errors with exponential back-off)
and timeouts are the SDK's own; we only pick ``max_retries`` and ``timeout``. The key comes from
``OPENAI_API_KEY`` only and is registered for redaction before any request.
"""

from __future__ import annotations

import openai

from .redact import redact, register_env_key

# Whole-run problems: every further request would fail the same way, so stop.
FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class FatalAPIError(RuntimeError):
    """Raised to stop the run (bad key, no access, unknown model)."""


def make_client(base_url: str | None, timeout: float, max_retries: int) -> openai.AsyncOpenAI:
    """``AsyncOpenAI`` with the key from the environment (the SDK's retry and timeout handling)."""
    key = register_env_key()
    if not key:
        raise ValueError("OPENAI_API_KEY is not set (for servers without auth, set it to any value, e.g. EMPTY)")
    return openai.AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)


def error_reason(err: BaseException) -> str:
    """A short, redacted description of an API error for the failures file and logs."""
    if isinstance(err, openai.APIStatusError):
        msg = err.message
        return redact(f"api_error {err.status_code}: {msg}")[:2000]
    if isinstance(err, openai.APITimeoutError):
        return "api_error: timed out after all retries"
    if isinstance(err, openai.APIConnectionError):
        return redact(f"api_error: connection failed after all retries ({err.__cause__!r})")[:2000]
    return redact(f"{type(err).__name__}: {err}")[:2000]


def is_retryable_later(err: BaseException) -> bool:
    """Errors that leave the item unpaid and worth retrying on a later run (not a 4xx request error)."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return isinstance(err, (openai.APITimeoutError, openai.APIConnectionError))
