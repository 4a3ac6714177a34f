"""What tuneforge's clients of OpenAI-compatible endpoints share (the GRPO judge reward, `tuneforge data generate`'s
teacher): which failures of the official ``openai`` client are worth a retry."""

from __future__ import annotations

RETRIED_STATUS = frozenset({408, 409, 429})
"""HTTP statuses retried besides every 5xx: request timeout, conflict, rate limit."""


def is_transient(error: BaseException) -> bool:
    """A connection error, a timeout, 408 / 409 / 429 or any 5xx: the same call may succeed later."""
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):   # APITimeoutError is a connection error
        return True
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and (status in RETRIED_STATUS or status >= 500)
