"""Keep the API key out of everything we write: journal, outputs, failures, logs, error messages.

A server may echo the key back (in an error body or even in model output); every write path runs
its text through :func:`redact` so the key cannot reach disk or stderr by any route. Bytes that are
written as received (generated images) are checked with :func:`contains_secret` and refused.
"""

from __future__ import annotations

import logging
import os

MASK = "***"
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret so :func:`redact` masks it from now on (short values are ignored)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def register_env_key() -> str | None:
    """Read ``OPENAI_API_KEY`` (the only source of the key) and register it for redaction."""
    key = os.environ.get("OPENAI_API_KEY")
    register_secret(key)
    return key


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def contains_secret(data: bytes) -> bool:
    """Whether bytes we would write as they are (image files) hold a registered secret."""
    return any(secret.encode("utf-8") in data for secret in _secrets)


class RedactingFormatter(logging.Formatter):
    """Formats the whole record (message, args and traceback) and then redacts it."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install_logging(level: int = logging.INFO) -> None:
    """Route all logging to stderr through the redacting formatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    if level > logging.DEBUG:
        # The SDK's retry notices are useful; per-request HTTP lines are noise at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
