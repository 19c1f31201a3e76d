"""The OpenAI-compatible HTTP API as a FastAPI app, independent of Ray.

``build_openai_app(engine_client, api_key=None)`` returns the app. Handlers find the models through
``request.app.state.engine_client`` (an ``EngineClient``), so whoever hosts the app may set it after
building it. Under Ray Serve, the router builds the app in its replica::

    @serve.deployment
    @serve.ingress()              # no app yet: Serve calls __serve_build_asgi_app__ after __init__
    class Router:
        def __serve_build_asgi_app__(self):
            return build_openai_app(self, api_key=...)   # the router is the EngineClient

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``GET /health`` (open even when an API key is set).

Errors always leave as OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
fields (``param`` names the field), 401 for a missing or wrong API key, 404 for an unknown model
(``code="model_not_found"``), 429 when the engine's queue is full, 503 when the engine is dead or an expert pool is down, and
500, logged with its traceback here but never sent, for anything unexpected.

A request is first submitted and its first output awaited; only then does a stream start, so that
refusals (unknown model, prompt too long, queue full) are real HTTP errors and not events in a 200
stream. While a request runs, a watcher listens for the client's disconnect; when it comes, the
request's task is cancelled and the engine stream closed, which aborts the request and frees its
KV cache at once — for streams and for non-streaming requests alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from expertmesh.api.auth import bearer_accepted
from expertmesh.api.chat_template import InvalidMessagesError
from expertmesh.api.engine_client import EngineClient, ModelInfo
from expertmesh.api.openai_schemas import (
    REQUEST_ERROR_CODES,
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    UsageInfo,
    bad_request,
    new_id,
    sse_event,
)
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import ModelNotFoundError, client_error, remote_cause

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


def build_openai_app(engine_client: EngineClient | None = None, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="expertmesh OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.engine_client = engine_client
    app.state.api_key = api_key
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(_v1)
    app.openapi = lambda: _openapi(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without the 422 it declares for every route with a body or parameters:
    this server answers a bad request with OpenAI's 400 instead (`_validation_error`)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


# --- access -------------------------------------------------------------------------------------


def _check_api_key(request: Request) -> None:
    if not bearer_accepted(request.headers.get("authorization"), request.app.state.api_key):
        raise OpenAIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            type="invalid_request_error",
            code="invalid_api_key",
        )


def _client(request: Request) -> EngineClient:
    client = request.app.state.engine_client
    if client is None:
        raise _unavailable("no engine is attached to this server yet")
    return client


def _unavailable(message: str) -> OpenAIError:
    """503: retrying after a while is safe (a replica restarts, an engine attaches)."""
    return OpenAIError(
        503, message, type="service_unavailable_error", headers={"Retry-After": str(RETRY_AFTER_S[503])}
    )


def _model_info(client: EngineClient, model: str) -> ModelInfo:
    try:
        return client.model_info(model)
    except ModelNotFoundError as exc:
        raise _as_openai_error(exc, "model") from exc


def _errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error answers a route really gives, all in OpenAI's error shape."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]}
        | (
            {"headers": {_ERROR_HEADERS[status]: {"schema": {"type": "string"}}}}
            if status in _ERROR_HEADERS
            else {}
        )
        for status in statuses
    }


_ERROR_HEADERS = {405: "Allow", 429: "Retry-After", 503: "Retry-After"}
# Seconds a client should wait: a queue drains in about a step; a replaced replica (an expert
# pool's or the engine's) takes Serve a few seconds to start.
RETRY_AFTER_S = {429: 1, 503: 5}


ERROR_MEANINGS = {
    400: "A field is invalid; `error.param` names it",
    401: "The API key is missing or wrong (`Authorization: Bearer <key>`)",
    404: "No such model is served here",
    405: "The path does not take this method; `Allow` names the ones it does",
    429: "The engine's queue is full; retry after `Retry-After` seconds",
    500: "An unexpected server error (logged with its traceback)",
    503: "The engine or an expert pool is unavailable; retrying after `Retry-After` seconds is safe",
}
# Every /v1 route may answer these: the key check runs first, and any route may fail unexpectedly.
_ALWAYS = (401, 405, 500)
_GENERATION_ERRORS = _errors(400, 404, 429, 503, *_ALWAYS)
# A generation answers JSON, or with `"stream": true` server-sent events.
_STREAMED_200: dict[int | str, dict] = {
    200: {
        "description": "The completion; with `stream: true`, `text/event-stream` chunks ending in `data: [DONE]`",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}

_v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)], responses=_errors(*_ALWAYS))


# --- routes -------------------------------------------------------------------------------------


@_v1.get("/models")
async def list_models(request: Request) -> ModelList:
    client = _client(request)
    return ModelList(data=[_card(client.model_info(name)) for name in client.model_names()])


@_v1.get("/models/{model:path}", responses=_errors(404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    return _card(_model_info(_client(request), model))


@_v1.post("/completions", response_model=None, responses=_GENERATION_ERRORS | _STREAMED_200)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    client = _client(request)
    _model_info(client, body.model)
    prompt = body.single_prompt()
    params = body.sampling_params(default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    call = _Call(new_id("cmpl"), body.model, bool(body.stream), body.include_usage, "prompt")
    return await _serve(request, client, call, prompt, params, _CompletionFormat(call))


@_v1.post("/chat/completions", response_model=None, responses=_GENERATION_ERRORS | _STREAMED_200)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    client = _client(request)
    info = _model_info(client, body.model)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        rendered = info.chat_template.render(messages)
    except InvalidMessagesError as exc:
        raise bad_request(str(exc), "messages") from exc
    prompt = await client.tokenize(body.model, rendered)  # as rendered: no BOS of the tokenizer's own
    # vLLM's default for chat: until EOS or a full context (the engine stops at max_model_len).
    params = body.sampling_params(default_max_tokens=info.max_model_len)
    call = _Call(new_id("chatcmpl"), body.model, bool(body.stream), body.include_usage, "messages")
    return await _serve(request, client, call, prompt, params, _ChatFormat(call))


def _card(info: ModelInfo) -> ModelCard:
    return ModelCard(
        id=info.name, created=info.created, owned_by=info.owned_by, max_model_len=info.max_model_len
    )


# --- one request's life -------------------------------------------------------------------------


@dataclass
class _Call:
    id: str
    model: str
    stream: bool
    include_usage: bool
    prompt_param: str  # the request field that an engine refusal of the prompt is about
    created: int = field(default_factory=lambda: int(time.time()))


async def _serve(
    request: Request,
    client: EngineClient,
    call: _Call,
    prompt: str | list[int],
    params: SamplingParams,
    fmt: _Format,
) -> Response:
    stream, first = await _until_disconnect(request.receive, lambda: _open(client, call, prompt, params))
    if call.stream:
        return EventStreamResponse(_events(call, stream, first, fmt))
    final = await _until_disconnect(request.receive, lambda: _drain(stream, first))
    return JSONResponse(fmt.response(final).model_dump(mode="json"))


async def _open(
    client: EngineClient, call: _Call, prompt: str | list[int], params: SamplingParams
) -> tuple[AsyncIterator[RequestOutput], RequestOutput]:
    """Submit the request and wait for its first output: refusals surface here, as HTTP errors."""
    try:
        stream = client.generate(call.model, prompt, params, call.id, stream=call.stream)
        try:
            first = await anext(stream)
        except BaseException:
            await _aclose(stream)
            raise
    except StopAsyncIteration:
        raise OpenAIError(500, "the engine ended the request without output", type="internal_error") from None
    except Exception as exc:
        raise _as_openai_error(exc, call.prompt_param) from exc
    return stream, first


async def _drain(stream: AsyncIterator[RequestOutput], first: RequestOutput) -> RequestOutput:
    out = first
    try:
        while not out.finished:
            out = await _next_or_aborted(stream, out)
    except Exception as exc:
        raise _as_openai_error(exc, None) from exc
    finally:
        await _aclose(stream)
    return out


async def _events(
    call: _Call, stream: AsyncIterator[RequestOutput], first: RequestOutput, fmt: _Format
) -> AsyncGenerator[str, None]:
    """SSE lines: the format's chunks for each output, the usage chunk if asked, then [DONE]."""
    try:
        for chunk in fmt.head():
            yield sse_event(chunk)
        out: RequestOutput | None = first
        last = first
        while out is not None:
            last = out
            for chunk in fmt.chunks(out):
                yield sse_event(chunk)
            out = None if out.finished else await _next_or_aborted(stream, out)
        if call.include_usage:
            yield sse_event(fmt.usage_chunk(_usage(last)))
    except Exception as exc:  # the status line has gone: report in the stream, as vLLM does
        yield sse_event(_as_openai_error(exc, None).response())
    finally:
        await _aclose(stream)
    yield SSE_DONE


async def _next_or_aborted(stream: AsyncIterator[RequestOutput], last: RequestOutput) -> RequestOutput:
    """The next output; a stream that ends unfinished (aborted by id) ends as `finish_reason="abort"`."""
    nxt = await anext(stream, None)
    if nxt is not None:
        return nxt
    ended = replace(last.outputs[0], finish_reason="abort", delta_text="", delta_token_ids=[])
    return replace(last, outputs=[ended], finished=True)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    """Close an engine stream (which aborts its request if unfinished), even inside a cancelled task."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def _usage(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens),
    )


# --- response shapes ----------------------------------------------------------------------------


class _Format:
    def __init__(self, call: _Call):
        self.call = call

    def head(self) -> Iterable[BaseModel]:
        return ()

    def response(self, out: RequestOutput) -> BaseModel:
        raise NotImplementedError

    def chunks(self, out: RequestOutput) -> Iterable[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        return {"id": self.call.id, "created": self.call.created, "model": self.call.model}


class _CompletionFormat(_Format):
    def response(self, out: RequestOutput) -> CompletionResponse:
        c = out.outputs[0]
        choice = CompletionChoice(text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        return CompletionResponse(**self._meta(), choices=[choice], usage=_usage(out))

    def chunks(self, out: RequestOutput) -> Iterable[CompletionResponse]:
        c = out.outputs[0]
        if c.delta_text or out.finished:
            choice = CompletionChoice(
                text=c.delta_text, finish_reason=c.finish_reason, stop_reason=c.stop_reason
            )
            yield CompletionResponse(**self._meta(), choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(**self._meta(), choices=[], usage=usage)


class _ChatFormat(_Format):
    def head(self) -> Iterable[ChatCompletionChunk]:
        # OpenAI's first chunk announces the role, with empty content.
        yield ChatCompletionChunk(
            **self._meta(), choices=[ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))]
        )

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        c = out.outputs[0]
        choice = ChatChoice(
            message=AssistantMessage(content=c.text), finish_reason=c.finish_reason, stop_reason=c.stop_reason
        )
        return ChatCompletionResponse(**self._meta(), choices=[choice], usage=_usage(out))

    def chunks(self, out: RequestOutput) -> Iterable[ChatCompletionChunk]:
        c = out.outputs[0]
        if c.delta_text or out.finished:
            choice = ChatChunkChoice(
                delta=DeltaMessage(content=c.delta_text),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            yield ChatCompletionChunk(**self._meta(), choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._meta(), choices=[], usage=usage)


# --- streaming and disconnects ------------------------------------------------------------------


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready; its request has been aborted."""


async def _until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ClientDisconnected.

    Cancelling the work cancels its pending ``anext`` on the engine stream, which aborts the request.
    """
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:  # re-raised below, unwrapped from the task group's ExceptionGroup
            outcome.append(exc)
        tg.cancel_scope.cancel()
    if not outcome:
        raise ClientDisconnected
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that closes its event generator as soon as the client is gone.

    Starlette alone would notice a disconnect only at the next write, and would leave the generator
    to the garbage collector; here a watcher cancels the stream at once and the generator is closed
    explicitly, so the engine aborts the request and frees its KV cache without delay.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _until_disconnect(receive, lambda: self.stream_response(send))
        except (ClientDisconnected, OSError):  # OSError: the client left between two writes
            logger.info("client disconnected mid-stream; request aborted")
        finally:
            await _aclose(self.events)


# --- errors -------------------------------------------------------------------------------------


def _as_openai_error(exc: BaseException, prompt_param: str | None) -> OpenAIError:
    """Map what the engine side raises to the status and shape a client expects."""
    cause = remote_cause(exc)
    if isinstance(cause, OpenAIError):
        return cause
    error = client_error(cause)
    if error.kind == "not_found":
        return OpenAIError(404, error.message, type="NotFoundError", param="model", code="model_not_found")
    if error.kind == "overloaded":
        return OpenAIError(
            429,
            error.message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S[429])},
        )
    if error.kind == "invalid":
        return bad_request(error.message, prompt_param)
    if error.kind == "unavailable":
        return _unavailable(error.message)
    return OpenAIError(500, error.message, type="internal_error")


def _error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.response().model_dump(mode="json"), status_code=err.status, headers=err.headers)


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return _error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        return _error_response(bad_request("the request body is not valid JSON", None))
    # One clause per top-level field: a union's branches (prompt: str | list[int] | ...) each
    # report an error, under locations that name types rather than fields.
    problems: dict[str, list[str]] = {}
    for err in errors:
        loc = [p for p in err["loc"] if p != "body"]
        field = str(loc[0]) if loc else "body"
        where = f" at {'.'.join(map(str, loc))}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        msg = f"{err['msg']}{where}"
        if msg not in problems.setdefault(field, []):
            problems[field].append(msg)
    message = "; ".join(f"invalid {field!r}: {', or '.join(msgs)}" for field, msgs in problems.items())
    param = next(iter(problems), None)
    # The request models' own refusals carry OpenAI's codes (`unsupported_value`, `invalid_value`)
    code = errors[0]["type"] if errors[0]["type"] in REQUEST_ERROR_CODES else None
    return _error_response(bad_request(message, None if param == "body" else param, code))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
    # Starlette's 405 carries the route's methods as `Allow` (RFC 9110 asks for it)
    return _error_response(OpenAIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    logger.info("client disconnected before its response; request aborted")
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return _error_response(_as_openai_error(exc, None))
