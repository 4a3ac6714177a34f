"""Request and response bodies in OpenAI's shapes (chat completions, completions, models, errors).

Requests are validated strictly (a string where a number belongs is an error, not coerced) and every error
becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the field.
Fields OpenAI defines that tuneforge does not implement are refused when set to anything but their default
(``n > 1``, ``logprobs``, ``tools``), never silently ignored; unknown fields are ignored, as OpenAI's
compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "user", "assistant", "developer")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status,
                                                                    "invalid_request_error" if status < 500
                                                                    else "server_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = Field(None, max_length=0)
    logprobs: Literal[False] | None = None          # not implemented: refused rather than ignored

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, le=0)

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return prompts


class LoadAdapterRequest(_Strict):
    """vLLM's ``/v1/load_lora_adapter`` body (plus ``pinned``)."""

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1)
    pinned: bool = False


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:
    chunk: dict = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage is not None:
        chunk["choices"], chunk["usage"] = [], usage
    return chunk


def chat_response(rid: str, model: str, created: int, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None,
                     ) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
