"""Request and response bodies in OpenAI's shapes (chat completions, completions, models, errors).

Requests are validated strictly (a string where a number belongs is an error, not coerced) and every error
becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the field.
Fields OpenAI defines that tuneforge does not implement are refused when set to anything but their default
(``n > 1``, ``logprobs``), never silently ignored; unknown fields are ignored, as OpenAI's
compatible servers do.

:func:`parse_body` is the one door a request body comes through; whatever the bytes, it returns a validated
model or raises :class:`APIError` 400 naming the field, never anything else: JSON that is not JSON, not UTF-8,
nested deeper than :data:`MAX_DEPTH` (no ``RecursionError``), with an integer of more digits than Python
converts, a string holding a lone surrogate (``"\\ud800"``: valid JSON, not valid Unicode; it cannot be
tokenized, encoded in an answer or used as a path), or ``NaN`` / ``Infinity`` where a number belongs. The
request models are also the request bodies published in the OpenAPI schema (``/openapi.json``), and the
response models below the answers (:func:`openapi_components`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_DEPTH = 32                       # JSON nesting a request body may have (a chat request needs 4)
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1   # what torch.Generator.manual_seed accepts

ROLES = ("system", "user", "assistant", "developer", "tool")


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
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None       # an assistant turn's calls (earlier turns of an agent loop)
    tool_call_id: str | None = None                # a tool result: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_may_be_left_out(cls, data: Any) -> Any:
        # an assistant turn that calls tools may leave its content out or null (OpenAI's shape); any other turn
        # must give it (a missing content is "Field required" at messages.N.content)
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            data = {**data, "content": None}
        return data

    @field_validator("content")
    @classmethod
    def _content_not_null(cls, content: Any, info: Any) -> Any:
        if content is None and info.data.get("role") != "assistant":
            raise ValueError("must be a string or a list of text parts (only an assistant turn may be null)")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                    description="a JSON Schema; the answer is JSON that validates against it")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                              "maxItems": 4}, {"type": "null"}]})
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    # text (the default), or JSON constrained while decoding (serving/guided.py; serve's guided_decoding)
    response_format: ResponseFormat | None = None

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
    tools: list[Any] | None = Field(None, max_length=128, description="function definitions (OpenAI's shape)")
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: Literal[False] | None = None          # not implemented: refused rather than ignored
    # vLLM's extra parameter: arguments of the chat template (over the adapter's run's template_kwargs)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _template_kwargs(cls, v: Any) -> Any:
        from tuneforge.data.templates import check_template_kwargs

        return None if v is None else check_template_kwargs(v, "chat_template_kwargs")

    def conversation(self) -> list[dict]:
        """The messages as tuneforge's data shapes them (calls' arguments as objects, results with their call's
        id); APIError 400 naming the message for a result that answers no call or arguments that are not JSON."""
        from tuneforge.data.errors import RecordError
        from tuneforge.data.tools import check_conversation, normalise_calls

        out: list[dict] = []
        for i, m in enumerate(self.messages):
            message: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role != "assistant" and m.tool_calls:
                raise APIError(400, f"messages.{i}.tool_calls: only an assistant message makes calls",
                               param=f"messages.{i}.tool_calls")
            try:
                if m.tool_calls:
                    message["tool_calls"] = normalise_calls([c.model_dump() for c in m.tool_calls],
                                                            f"messages.{i}")
            except RecordError as e:
                raise APIError(400, str(e), param=f"messages.{i}.tool_calls") from None
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        if any(m.get("tool_calls") or m["role"] == "tool" for m in out):
            # the history's consistency only: any tool a call names is accepted here, with any arguments
            named = {c["function"]["name"] for m in out for c in m.get("tool_calls") or []}
            try:
                check_conversation(out, [{"function": {"name": n, "parameters": {}}} for n in named])
            except RecordError as e:
                where = str(e).split(" ", 1)[0].replace("[", ".").replace("]", "")
                raise APIError(400, str(e).replace("messages[", "messages.").replace("]", "", 1),
                               param=where if where.startswith("messages") else "messages") from None
        return out

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})
    echo: bool = False
    max_tokens: int | None = Field(None, ge=1, description="default 16 (or the server's limit, if lower)")
    logprobs: int | None = Field(None, le=0)

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise APIError(400, "prompt: must not be empty: send a string or a list of strings", param="prompt")
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


def chat_response(rid: str, model: str, created: int, text: str | None, finish_reason: str, usage: dict,
                  tool_calls: list[dict] | None = None, reasoning: str | None = None) -> dict:
    message: dict = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None,
                     ) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


# ------------------------------------------------------------------------------------------ parsing


def parse_body(model: type[_Strict], raw: bytes) -> Any:
    """``raw`` JSON -> ``model``; :class:`APIError` 400 naming the field (or ``body``) for anything else."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"body: JSON nested deeper than {MAX_DEPTH} levels", param="body",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:     # JSONDecodeError, and integers of over 4300 digits
        reason = "an integer of more than 4300 digits" if "digits" in str(e) else str(e)
        raise APIError(400, f"body: not valid JSON ({reason})", param="body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "body: expected a JSON object", param="body", code="invalid_json")
    _check_json_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        field, message = _describe(e)
        raise APIError(400, message, param=field, code="invalid_value") from None


def _check_json_tree(data: Any) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and strings (keys too) holding a lone surrogate."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _has_lone_surrogate(value):
                field = _field_name(path)
                raise APIError(400, f"{field}: holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
                               "which is not text: send valid Unicode", param=field, code="invalid_value")
            continue
        if isinstance(value, dict | list):
            if len(path) >= MAX_DEPTH:
                raise APIError(400, f"body: JSON nested deeper than {MAX_DEPTH} levels", param="body",
                               code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii() and _has_lone_surrogate(key):
                    stack.append((key, path))
                stack.append((item, (*path, key)))


def _field_name(path: tuple) -> str:
    """``a.b.0`` of a path into the body; a key that is not printable on one line (``"\\n"``, a lone surrogate,
    ...) in JSON's escaped form, so that the name stays one line of valid text."""
    parts = [str(p) if str(p).isprintable() and not _has_lone_surrogate(str(p)) else json.dumps(str(p))
             for p in path]
    return ".".join(parts) or "body"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_UNION_MEMBERS = {"str", "int", "float", "bool", "list[str]", "list[TextPart]", "TextPart"}


def _describe(error: ValidationError) -> tuple[str, str]:
    """``(field, message)`` of a validation error; a union field reports one error per member (``prompt.str``,
    ``prompt.list[str]``): the message names the field itself."""
    errors = error.errors()
    err = errors[0]
    locs = [x["loc"] for x in errors if x["loc"][:1] == err["loc"][:1]]
    common = []
    for parts in zip(*locs, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if len(locs) > 1 and common and str(common[-1]) in _UNION_MEMBERS:
        common.pop()
    field = ".".join(str(p) for p in common) or "body"
    if len(locs) > 1 and len(common) < len(err["loc"]):
        return field, f"{field}: wrong type or value ({'; '.join(x['msg'] for x in errors[:2])})"
    return field, f"{field}: {err['msg']}"


# ------------------------------------------------------------------------------------ response shapes


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx answer."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = Field(None, description="a leading <think> block of the answer, apart")


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    """``stream: false``; with ``stream: true`` the answer is ``text/event-stream``: ``chat.completion.chunk``
    events, the last with ``finish_reason``, then ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    method: str | None = None
    loaded: bool | None = None
    pinned: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterStatus(BaseModel):
    status: Literal["ok"]
    lora_name: str
    method: str | None = None


class Health(BaseModel):
    """``status``: ``ok`` (200), or ``draining`` (503) from a shutdown signal until the process exits."""

    status: Literal["ok", "draining"]
    running: int
    waiting: int
    loaded_adapters: list[str]


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream (the one after the finish carries only ``usage``, when asked for)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]


SCHEMA_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                              UnloadAdapterRequest, ChatCompletionChunk, CompletionChunk,
                                              ErrorResponse)


def openapi_components() -> dict[str, dict]:
    """JSON schemas of the request bodies and stream events (and what they reference), keyed as
    ``components/schemas`` wants."""
    out: dict[str, dict] = {}
    for model in SCHEMA_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def openapi_event_stream(chunk: type[BaseModel]) -> dict:
    """The ``text/event-stream`` content of a streamed answer: each event's ``data`` is a ``chunk`` (or an
    error, should the request fail midway) as JSON, and the last one ``[DONE]``."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}}


def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of an endpoint whose JSON body is ``model`` (the endpoint parses it with
    :func:`parse_body`, so that every error keeps OpenAI's shape)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
