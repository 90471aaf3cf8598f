"""OpenAI-compatible endpoints over the same predictors and batchers.

- ``POST /v1/completions`` (causal LM students; ``stream: true`` sends SSE ``data: {...}`` chunks and
  ``data: [DONE]``), ``POST /v1/chat/completions`` (students whose tokenizer has a chat template),
  ``POST /v1/embeddings`` (embedding students).
- The same three plus ``GET /models`` under ``/openai/v1`` — the base URL to give an OpenAI SDK
  (``OpenAI(base_url="http://host:8000/openai/v1")``). ``GET /v1/models`` stays the native models list.

``model`` is a model id or ``latest:<job name>``; responses name the model id that answered (as OpenAI names the
dated snapshot behind an alias). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal, TypeAlias

import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from app.deps import DatabaseDep, TenantDep
from app.http import json_response
from app.models import service as models_service
from app.serving.aliases import LATEST_PREFIX
from app.serving.deps import InferenceDep
from app.serving.errors import InvalidInput
from app.serving.generation import (
    Completion,
    GenerationRequest,
    ScoredToken,
    TokenLogprob,
    completion_scored,
    scored_tokens,
    token_piece,
)
from app.serving.predictor import TextOutput, TextPredictor, TextRequest
from app.serving.protocol import (
    ERROR_FORMAT_KEY,
    ProtocolError,
    parse_json_body,
    protocol_error,
    protocol_route,
    request_body_schema,
    until_answered,
)
from app.serving.service import InferenceService, ServedModel

ERROR_TYPES = {  # as OpenAI's API answers them (its SDKs pick their exception by the status)
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_CODES = {"not_found": "model_not_found", "queue_full": "rate_limit_exceeded", "unauthorized": "invalid_api_key"}


def openai_error_document(error: ProtocolError) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    code = ERROR_CODES.get(error.code, error.code)
    if code == "invalid_request" and "context length" in error.message:
        code = "context_length_exceeded"
    return {"error": {"message": error.message, "type": error_type, "param": error.param, "code": code}}


def render_openai_error(error: ProtocolError) -> Response:
    return Response(
        orjson.dumps(openai_error_document(error)),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


OpenAIRoute = protocol_route(render_openai_error)
OPENAI = {ERROR_FORMAT_KEY: "openai"}
INFERENCE = {**OPENAI, "x-inference": True}

# --- request shapes ------------------------------------------------------------------------------------------------

ModelName = Annotated[str, Field(min_length=1, max_length=256, description="A model id or `latest:<job name>`.")]
Stop = Annotated[str, Field(min_length=1, max_length=200)]
PromptText = Annotated[str, Field(max_length=1_000_000)]


def not_empty(value: Any) -> Any:
    """An empty list fails every member of the union below, and the error named the first (a string) alone."""
    if isinstance(value, list) and not value:
        raise PydanticCustomError("empty_list", "must not be empty: give a string or a list of strings")
    return value


# what OpenAI's prompt and input take: text, or token ids, which are taken only to be refused with a message that
# says so (a schema error per element did not)
TextsOrTokenIds: TypeAlias = Annotated[
    PromptText
    | Annotated[list[PromptText], Field(min_length=1)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[list[int]], Field(min_length=1)],
    BeforeValidator(not_empty),
]


def null_in_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """``null`` added to the schema of each optional field (``NullIsDefault`` reads it as the field's default)."""
    properties = schema.get("properties", {})
    for name, field in model.model_fields.items():
        prop = properties.get(name)
        if field.is_required() or prop is None or {"type": "null"} in prop.get("anyOf", []):
            continue
        kept = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
        properties[name] = {"anyOf": [prop, {"type": "null"}], **kept}


class NullIsDefault(BaseModel):
    """OpenAI's API takes ``null`` for any optional field and reads it as the field's default; the openai SDKs send
    it when a caller passes ``None`` (``temperature=None``), and so do proxies forwarding optional settings. Here a
    null for a field with a default is that default, and the schema says null is taken."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=null_in_schema)

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if not (value is None and key in fields and not fields[key].is_required())
        }


class StreamOptions(NullIsDefault):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices).")


MAX_CHOICES = 16
MAX_LOGPROBS = 5


class SamplingFields(NullIsDefault):
    model: ModelName
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or under 1e-5) = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices per prompt, each a completion of its own; with a seed, choice j samples with seed + j.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true (400 otherwise).")
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(
        None,
        ge=-(2**63),
        lt=2**64,
        description="Seeds the sampling: the same seed, prompt and parameters give the same completion (each prompt "
        "draws from its own generator, whatever it is batched with). Without it each completion draws afresh.",
    )
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="Lowers a token's logit by this × the times it was generated so far."
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="Lowers a token's logit by this once it was generated."
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300, description="Token id (a string of digits) → added to that token's logit."
    )


def generation_fields(
    body: SamplingFields, predictor: TextPredictor, model_id: str, logprobs: int | None, stream: bool = False
) -> dict[str, Any]:
    """The GenerationRequest fields a request's choices share: sampling, stop strings, log-probabilities, penalties
    and logit bias (token ids checked against the model's vocabulary). 400 when a model on the static path is asked
    for streamed log-probabilities (it scores a completion once it is whole; the engine scores token by token)."""
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        # ASCII digits only: ``isdigit`` also takes "²" (which ``int`` refuses) and "١" (which it reads as 1)
        if not (key.isascii() and key.isdigit()) or len(key) > 12 or int(key) >= predictor.vocab_size:
            raise bad_request(
                f"logit_bias keys are token ids of this model (0 to {predictor.vocab_size - 1}); got {key!r}",
                "logit_bias",
            )
        bias[int(key)] = value
    if not predictor.continuous and logprobs is not None and stream:
        raise bad_request(
            f"model {model_id} generates through transformers' generate (its cache or its generation config is one "
            "the serving engine does not take: chunked attention, forced tokens), which scores a completion once it "
            "is whole: ask for logprobs without stream",
            "logprobs",
        )
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": stops_of(body.stop),
        "logprobs": logprobs,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "logit_bias": bias,
    }


class CompletionRequest(SamplingFields):
    prompt: TextsOrTokenIds = Field(
        description="A prompt or a list of prompts (one choice each). Token arrays are not supported."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate; default 16 (cut to what the context leaves)."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of the generated tokens (the model's own distribution) and of this many most "
        "likely tokens at each step (with stream, each chunk carries its tokens').",
    )
    echo: bool = Field(
        False,
        description="Return the prompt before the completion (with logprobs: the prompt tokens' too; streamed, as "
        "each choice's first chunk).",
    )
    # what OpenAI's SDKs and proxies may send with their default values: those values are accepted, others refused
    suffix: str | None = Field(None, max_length=1000, description="Not supported: null or absent only.")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only equal to n (no server-side ranking).")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(NullIsDefault):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: PromptText | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256, description="A tool message's (handed to the template).")
    # what an earlier answer's message holds when the SDKs hand it back as history (``message.model_dump()``): the
    # refusal and annotations are taken and not used; calls (tools, functions, audio) are refused unless empty
    refusal: str | None = Field(None, max_length=1_000_000, description="An assistant message's refusal: not used.")
    annotations: list[Any] | None = Field(None, max_length=1000, description="An assistant message's: not used.")
    tool_calls: list[Any] | None = Field(None, description="Not supported: null, absent or empty only.")
    function_call: dict[str, Any] | None = Field(None, description="Not supported: null or absent only.")
    audio: dict[str, Any] | None = Field(None, description="Not supported: null or absent only.")


def refuse_calls(body: ChatCompletionRequest) -> None:
    """400 for what asks for tools, function calls, audio or storage (nothing here makes or reads them), in the
    request or in a message of its history; their empty values pass."""
    if body.tools:
        raise bad_request("tools are not supported (the model is served without function calling)", "tools")
    if body.tool_choice not in (None, "none"):
        raise bad_request('tool_choice: only "none" is supported (there are no tools)', "tool_choice")
    if body.store:
        raise bad_request("store: completions are not stored here; send false or leave it out", "store")
    for index, message in enumerate(body.messages):
        for field in ("tool_calls", "function_call", "audio"):
            if getattr(message, field):
                raise bad_request(
                    f"messages[{index}].{field}: tool calls, function calls and audio are not supported",
                    f"messages.{index}.{field}",
                )


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    logprobs: bool = Field(
        False, description="Log-probabilities of the message's tokens (with stream, each chunk carries its tokens')."
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: this many most likely tokens at each step."
    )
    max_tokens: int | None = Field(None, ge=0, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate; default: what the context leaves (up to the server limit)."
    )
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "text"} only: structured outputs (json_object, json_schema) are not supported.'
    )
    # what agent frameworks send with values that ask for nothing here: those values are accepted, others refused
    tools: list[Any] | None = Field(None, description="Not supported: null, absent or empty only.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Not supported: "none" only.')
    parallel_tool_calls: bool | None = Field(None, description="Taken and not used (there are no tools).")
    store: bool | None = Field(None, description="false only: completions are not stored.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Taken and not used (OpenAI's is for stored completions)."
    )


class EmbeddingRequest(NullIsDefault):
    model: ModelName
    input: TextsOrTokenIds = Field(description="A string or a list of strings (token arrays are not supported).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's width when given.")
    user: str | None = Field(None, max_length=256)


# --- response shapes (documentation) -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose keys and values came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# with "stream": true, a text/event-stream of events (OpenAPI 3.1 has no itemSchema, so the schema is one event's, as
# the OpenAPI 3.2 text gives the HTML standard's event): each ``data`` a JSON chunk, the last one "[DONE]"
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'A JSON chunk (a completion or chat.completion.chunk object), or "[DONE]" at the end.',
            "contentMediaType": "application/json",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}

# --- helpers -------------------------------------------------------------------------------------------------------


def bad_request(message: str, param: str) -> InvalidInput:
    return InvalidInput(message, errors=[{"loc": ["body", param], "msg": message}], param=param, status=400)


def require_task(served: ServedModel, task: str, endpoint: str) -> TextPredictor:
    predictor = served.predictor
    if not isinstance(predictor, TextPredictor) or predictor.task != task:
        raise bad_request(
            f"model {served.model_id} has task {served.record.task}; {endpoint} needs a model with task {task}", "model"
        )
    return predictor


def stops_of(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def max_tokens_of(requested: int | None, default: int, limit: int, param: str) -> tuple[int, Any]:
    """(max_tokens, overflow policy): an explicit value must fit the context with the prompt (else 400, as
    OpenAI answers); the default is cut to what the context and the KV budget leave (a 400 would name a field the
    client never sent)."""
    if requested is None:  # what the context and the server's KV budget leave
        return min(default, limit), "fit"
    if requested > limit:
        raise bad_request(f"{param} is {requested}; this server generates at most {limit} tokens", param)
    return requested, "refuse"


def usage_option(body: SamplingFields) -> tuple[bool, dict[str, None]]:
    """Whether a streamed request asked for a last chunk with its usage, and what every other chunk then carries
    (OpenAI: ``"usage": null``)."""
    include = body.stream and body.stream_options is not None and body.stream_options.include_usage
    return include, {"usage": None} if include else {}


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``choice`` of a request seeded with ``seed`` (choice 0 draws what ``n`` = 1 would)."""
    return None if seed is None else (seed + choice) % 2**64


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(document: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def usage_of(completions: list[Completion], choices: int = 1) -> dict[str, Any]:
    """OpenAI's usage: each prompt's tokens once, whatever its number of ``choices`` (``n``; prompt i's choices are
    completions i * n … i * n + n - 1), of them those the prefix cache gave, and every choice's generated tokens."""
    prompt = sum(c.prompt_tokens for c in completions[::choices])
    cached = sum(c.cached_tokens for c in completions[::choices])
    generated = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


#: (choice index, text delta, finish reason, the delta's scored tokens when logprobs were asked for) → a chunk
ChunkMaker = Callable[[int, str | None, str | None, Sequence[ScoredToken] | None], dict[str, Any]]


async def stream_generation(
    inference: InferenceService,
    served: ServedModel,
    requests: list[GenerationRequest],
    chunk: ChunkMaker,
    usage_chunk: Callable[[dict[str, Any]], dict[str, Any]] | None,
    choices: int,
    echo: Callable[[int, Sequence[TokenLogprob] | None], dict[str, Any]] | None = None,
    *,
    rows_field: str,
) -> Response:
    """Start the generation; once its prompts are accepted (or refused: then the error is the response), stream
    ``chunk(index, text, finish_reason, scored)`` documents as SSE (``scored``: the log-probabilities of the tokens
    the text delta covers, for requests that asked for them). A client that goes away stops the generation.
    ``choices``: completions per prompt (``n``). ``echo(index, prompt_logprobs)``: each choice's first chunk, its
    prompt (with its tokens' log-probabilities when the request asked for them, once the engine has them)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def post(*event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    for index, request in enumerate(requests):
        request.on_start = lambda _tokens: post("start")
        request.on_text = partial(post, "text", index)
        if request.logprobs is not None:
            request.on_logprobs = partial(post, "logprobs", index)
        if request.prompt_logprobs:
            request.on_prompt_logprobs = partial(post, "prompt", index)
    task = asyncio.ensure_future(inference.infer(served, requests, len(requests), rows_field=rows_field))

    def finished(_: Any) -> None:
        events.put_nowait(("done",))
        if task.cancelled() or task.exception() is not None:
            for request in requests:
                request.cancelled = True

    task.add_done_callback(finished)
    first = await events.get()
    if first[0] == "done":
        task.result()  # the request was refused: raise its error as the response
        events.put_nowait(first)

    async def body() -> AsyncIterator[bytes]:
        scored: dict[int, Sequence[ScoredToken]] = {}  # posted just before the text delta they belong to
        try:
            if echo is not None:  # prompts without log-probabilities are echoed at once, the others when scored
                for index, request in enumerate(requests):
                    if not request.prompt_logprobs:
                        yield sse(echo(index, None))
            while True:
                event = await events.get()
                if event[0] == "prompt":
                    assert echo is not None  # prompts are scored only for echo
                    yield sse(echo(event[1], event[2]))
                elif event[0] == "text":
                    index = event[1]
                    asked = requests[index].logprobs is not None
                    yield sse(chunk(index, event[2], None, scored.pop(index, [] if asked else None)))
                elif event[0] == "logprobs":
                    scored[event[1]] = event[2]
                elif event[0] == "done":
                    break
            try:
                completions: list[Completion] = task.result()
            except Exception as exc:
                yield sse(openai_error_document(protocol_error(exc)))
                yield b"data: [DONE]\n\n"
                return
            for index, completion in enumerate(completions):
                yield sse(chunk(index, None, completion.finish_reason, None))
            if usage_chunk is not None:
                yield sse(usage_chunk(usage_of(completions, choices)))
            yield b"data: [DONE]\n\n"
        finally:
            for request in requests:
                request.cancelled = True

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- endpoints -------------------------------------------------------------------------------------------------------


async def completions(request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    body = await parse_json_body(request, CompletionRequest)
    served = await inference.get(tenant, body.model)
    predictor = require_task(served, "causal_lm", "/v1/completions")
    given = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    prompts = [prompt for prompt in given if isinstance(prompt, str)]
    if len(prompts) != len(given):  # token ids: taken by the schema to say this, not "not a string" per element
        raise bad_request("token arrays are not supported; send a string or a list of strings", "prompt")
    if body.suffix is not None:
        raise bad_request("suffix is not supported (insertion needs a model trained for it)", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is supported only equal to n (no server-side ranking of choices)", "best_of")
    max_tokens, overflow = max_tokens_of(body.max_tokens, 16, inference.settings.max_completion_tokens, "max_tokens")
    shared = generation_fields(body, predictor, served.model_id, body.logprobs, body.stream)
    requests = [
        GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            overflow=overflow,
            seed=choice_seed(body.seed, choice),
            prompt_logprobs=body.echo and body.logprobs is not None,
            **shared,
        )
        for prompt in prompts  # choices in OpenAI's order: prompt i's choice j has index i * n + j
        for choice in range(body.n)
    ]
    completion_id, created, model = new_id("cmpl"), int(time.time()), served.model_id
    include_usage, null_usage = usage_option(body)

    def echoed(index: int) -> str:
        return prompts[index // body.n] if body.echo else ""

    def chunk(index: int, text: str | None, finish: str | None, scored: Sequence[ScoredToken] | None) -> dict[str, Any]:
        if scored is not None and body.echo:  # offsets count from the start of the echoed prompt
            start = len(echoed(index))
            scored = [(entry, piece, start + offset) for entry, piece, offset in scored]
        logprobs = None if scored is None else legacy_logprobs(predictor.tokenizer, scored)
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        } | null_usage

    if body.stream:

        def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
            return {**chunk(0, None, None, None), "choices": [], "usage": usage}

        def echo_chunk(index: int, prompt_logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
            document = chunk(index, echoed(index), None, None)
            if prompt_logprobs is not None:
                scored = scored_tokens(predictor.tokenizer, prompt_logprobs, 0, None)
                document["choices"][0]["logprobs"] = legacy_logprobs(predictor.tokenizer, scored)
            return document

        usage = usage_chunk if include_usage else None
        echo = echo_chunk if body.echo else None
        return await stream_generation(inference, served, requests, chunk, usage, body.n, echo, rows_field="prompt")
    results: list[Completion] = await until_answered(
        request.receive, requests, inference.infer(served, requests, len(requests), rows_field="prompt")
    )
    return json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [completion_choice(predictor, i, c, echoed(i), body.logprobs) for i, c in enumerate(results)],
            "usage": usage_of(results, body.n),
        }
    )


def completion_choice(
    predictor: TextPredictor, index: int, completion: Completion, echoed: str, logprobs: int | None
) -> dict[str, Any]:
    """One choice of /v1/completions: ``echoed`` (the prompt, with echo) before the text, and OpenAI's legacy
    ``logprobs`` object when they were asked for."""
    text = echoed + completion.text
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": completion.finish_reason}
    if logprobs is None:
        return choice
    tokenizer = predictor.tokenizer
    scored = scored_tokens(tokenizer, completion.prompt_logprobs or [], 0, None) if echoed else []
    # the prompt's tokens may not spell it exactly (special tokens, partial characters): the completion's count from
    # where the prompt ends
    scored += completion_scored(tokenizer, completion, len(echoed))
    return choice | {"logprobs": legacy_logprobs(tokenizer, scored)}


def legacy_logprobs(tokenizer: Any, scored: Sequence[ScoredToken]) -> dict[str, Any]:
    """/v1/completions' ``logprobs`` object for these tokens (a whole choice's, or a streamed chunk's)."""
    return {
        "tokens": [piece for _, piece, _ in scored],
        "token_logprobs": [entry.logprob for entry, _, _ in scored],
        "top_logprobs": [
            None if entry.logprob is None else {token_piece(tokenizer, token)[0]: value for token, value in entry.top}
            for entry, _, _ in scored
        ],
        "text_offset": [offset for _, _, offset in scored],
    }


def chat_logprobs(predictor: TextPredictor, completion: Completion) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` of a whole message."""
    tokenizer = predictor.tokenizer
    return chat_logprobs_of(tokenizer, completion_scored(tokenizer, completion, 0))


def chat_logprobs_of(tokenizer: Any, scored: Sequence[ScoredToken]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` for these tokens (a message's, or a streamed chunk's): per token its text,
    log-probability, UTF-8 bytes and the most likely tokens of its step."""

    def described(token: int, logprob: float) -> dict[str, Any]:
        piece, data = token_piece(tokenizer, token)
        return {"token": piece, "logprob": logprob, "bytes": list(data)}

    content = [
        described(entry.token, entry.logprob or 0.0)
        | {"top_logprobs": [described(token, value) for token, value in entry.top]}
        for entry, _, _ in scored
    ]
    return {"content": content, "refusal": None}


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


async def chat_completions(request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    body = await parse_json_body(request, ChatCompletionRequest)
    refuse_calls(body)  # before the model loads
    served = await inference.get(tenant, body.model)
    predictor = require_task(served, "causal_lm", "/v1/chat/completions")
    if not predictor.has_chat_template:
        raise bad_request(
            f"model {served.model_id} has no chat template (its tokenizer defines none); "
            "use /v1/completions with a prompt",
            "model",
        )
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad_request("give max_completion_tokens or max_tokens, not both", "max_tokens")
    limit = inference.settings.max_completion_tokens
    requested, param = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    max_tokens, overflow = max_tokens_of(requested, limit, limit, param)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    shared = generation_fields(body, predictor, served.model_id, logprobs, body.stream)
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(f"response_format {body.response_format.type} is not supported; only text", "response_format")
    messages = [
        {"role": m.role, "content": message_text(m)}
        | {key: value for key, value in (("name", m.name), ("tool_call_id", m.tool_call_id)) if value is not None}
        for m in body.messages
    ]
    requests = [
        GenerationRequest(
            messages=messages,
            max_tokens=max_tokens,
            overflow=overflow,
            max_tokens_field=(param,),
            seed=choice_seed(body.seed, choice),
            **shared,
        )
        for choice in range(body.n)
    ]
    completion_id, created, model = new_id("chatcmpl"), int(time.time()), served.model_id
    include_usage, null_usage = usage_option(body)

    def chunk(index: int, text: str | None, finish: str | None, scored: Sequence[ScoredToken] | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        logprobs = None if scored is None else chat_logprobs_of(predictor.tokenizer, scored)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        } | null_usage

    if body.stream:

        def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
            return {**chunk(0, None, None, None), "choices": [], "usage": usage}

        usage = usage_chunk if include_usage else None
        response = await stream_generation(inference, served, requests, chunk, usage, body.n, rows_field="n")
        assert isinstance(response, StreamingResponse)
        response.body_iterator = with_role_first(response.body_iterator, chunk, body.n)
        return response
    results: list[Completion] = await until_answered(
        request.receive, requests, inference.infer(served, requests, len(requests), rows_field="n")
    )
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": chat_logprobs(predictor, completion) if body.logprobs else None,
                    "finish_reason": completion.finish_reason,
                }
                for index, completion in enumerate(results)
            ],
            "usage": usage_of(results, body.n),
        }
    )


async def with_role_first(chunks: AsyncIterable[Any], chunk: ChunkMaker, choices: int) -> AsyncIterator[bytes]:
    """OpenAI's chat streams open with a chunk per choice whose delta carries the role."""
    for index in range(choices):
        opening = chunk(index, "", None, None)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield sse(opening)
    async for part in chunks:
        yield part


def encode_embeddings(model_id: str, encoding_format: str, output: TextOutput) -> bytes:
    """Runs in the inference thread."""
    values = output.values
    data: list[dict[str, Any]] = []
    for index in range(len(values)):
        row = values[index]
        embedding: Any = row if encoding_format == "float" else base64.b64encode(row.astype("<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": output.tokens, "total_tokens": output.tokens}
    document = {"object": "list", "data": data, "model": model_id, "usage": usage}
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


async def embeddings(request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    body = await parse_json_body(request, EmbeddingRequest)
    served = await inference.get(tenant, body.model)
    return Response(await run_embeddings(inference, served, body), media_type="application/json")


async def run_embeddings(inference: InferenceService, served: ServedModel, body: EmbeddingRequest) -> bytes:
    """One embeddings request on a loaded model: the JSON response body. Shared by the route above and the ASGI
    fast path (app/serving/fastpath.py)."""
    predictor = require_task(served, "embedding", "/v1/embeddings")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(text, str) for text in texts):
        raise bad_request("token arrays are not supported; send a string or a list of strings", "input")
    if body.dimensions is not None and body.dimensions != predictor.hidden_size:
        raise bad_request(
            f"dimensions {body.dimensions} is not supported; this model's embeddings have {predictor.hidden_size}",
            "dimensions",
        )
    encode = partial(encode_embeddings, served.model_id, body.encoding_format)
    encoded: bytes = await inference.infer(
        served, TextRequest([str(t) for t in texts], truncate=False), len(texts), encode, rows_field="input"
    )
    return encoded


MAX_LISTED = 1000


# what the OpenAI endpoints serve: completions and chat (causal LMs), embeddings (embedders)
OPENAI_TASKS = frozenset({"causal_lm", "embedding"})


async def list_models(db: DatabaseDep, tenant: TenantDep) -> Response:
    """The tenant's models that the OpenAI endpoints serve (causal LMs and embedders; newest first, up to 1,000), then
    a ``latest:<job name>`` alias per job name and the user-set aliases that name one of them. Tabular and text
    classifiers, which every OpenAI endpoint refuses, are served by the native and KServe endpoints only."""

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        documents: list[dict[str, Any]] = []
        aliases: list[dict[str, Any]] = []
        with db.read() as conn:
            listers = ((models_service.list_models, documents, "id"), (models_service.list_aliases, aliases, "name"))
            for lister, into, cursor in listers:
                after = None
                while len(into) < MAX_LISTED:
                    page = lister(conn, tenant=tenant, limit=models_service.MAX_PAGE, after=after)
                    into.extend(page["data"])
                    if not page["has_more"]:
                        break
                    after = page["data"][-1][cursor]
        return documents, aliases

    documents, user_aliases = await run_in_threadpool(read)
    listed: list[dict[str, Any]] = []
    latest: list[dict[str, Any]] = []
    seen: set[str] = set()
    served: dict[str, int] = {}
    for document in documents:
        if document.get("task") not in OPENAI_TASKS:
            continue
        created = served[document["id"]] = int(_timestamp(document["created_at"]))
        listed.append({"id": document["id"], "object": "model", "created": created, "owned_by": tenant})
        name = document.get("name")
        if document.get("kind") == "student" and name and name not in seen:
            seen.add(name)
            latest.append({"id": f"{LATEST_PREFIX}{name}", "object": "model", "created": created, "owned_by": tenant})
    named = [
        {"id": alias["name"], "object": "model", "created": served[alias["model_id"]], "owned_by": tenant}
        for alias in user_aliases
        if alias["model_id"] in served
    ]
    return json_response({"object": "list", "data": listed + latest + named})


async def retrieve_model(
    model: Annotated[str, Path(min_length=1, max_length=256)], inference: InferenceDep, tenant: TenantDep
) -> Response:
    record = await inference.record(tenant, model)
    created = int(record.created_at.timestamp())
    return json_response({"id": model, "object": "model", "created": created, "owned_by": tenant})


def _timestamp(value: Any) -> float:
    import datetime as dt

    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value.timestamp())


def _add_routes(router: APIRouter, prefix: str, *, with_models: bool) -> None:
    router.add_api_route(
        f"{prefix}/completions",
        completions,
        methods=["POST"],
        response_model=CompletionResponse,
        responses=STREAM_RESPONSE,
        summary="Completions (causal LM students)",
        openapi_extra={**INFERENCE, **request_body_schema(CompletionRequest)},
    )
    router.add_api_route(
        f"{prefix}/chat/completions",
        chat_completions,
        methods=["POST"],
        response_model=ChatCompletionResponse,
        responses=STREAM_RESPONSE,
        summary="Chat completions (students whose tokenizer has a chat template)",
        openapi_extra={**INFERENCE, **request_body_schema(ChatCompletionRequest)},
    )
    router.add_api_route(
        f"{prefix}/embeddings",
        embeddings,
        methods=["POST"],
        response_model=EmbeddingResponse,
        summary="Embeddings (embedding students)",
        openapi_extra={**INFERENCE, **request_body_schema(EmbeddingRequest)},
    )
    if with_models:
        router.add_api_route(
            f"{prefix}/models",
            list_models,
            methods=["GET"],
            response_model=OpenAIModelList,
            summary="Servable models, OpenAI's list shape",
            openapi_extra=OPENAI,
        )
        router.add_api_route(
            f"{prefix}/models/{{model}}",
            retrieve_model,
            methods=["GET"],
            response_model=OpenAIModel,
            summary="One model, OpenAI's shape",
            openapi_extra=OPENAI,
        )


router = APIRouter(route_class=OpenAIRoute, tags=["inference: OpenAI-compatible"])
_add_routes(router, "/v1", with_models=False)
_add_routes(router, "/openai/v1", with_models=True)
