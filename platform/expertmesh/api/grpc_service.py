"""The gRPC APIs as methods of the Serve ingress, which Ray Serve's gRPC proxy calls.

Ray Serve's proxy hosts the gRPC server (``serve.start(grpc_options=...)``; see
``expertmesh.serve.app.grpc_options``). It registers the services whose ``add_..._to_server``
functions are listed in ``grpc_servicer_functions``, and for each call it invokes, on the app's
ingress deployment, the method named after the RPC (``/inference.GRPCInferenceService/ModelInfer``
calls ``ModelInfer``) with the request message, plus a ``grpc_context`` keyword (a
``RayServegRPCContext``) because the methods here take one. Server-streaming RPCs are async
generators. With one application deployed, clients need no Ray-specific metadata.

``GrpcServicesMixin`` holds one method per RPC and works through ``self`` as an ``EngineClient``
(``model_names``, ``model_info``, ``generate``); the Router deployment inherits it. Services:

- ``inference.GRPCInferenceService`` (KServe Open Inference Protocol v2): ServerLive, ServerReady,
  ModelReady, ServerMetadata, ModelMetadata, ModelInfer. ModelInfer takes one BYTES ``text_input``
  element (shape [1] or [1, 1], in ``contents.bytes_contents`` or ``raw_input_contents``) and
  answers one BYTES ``text_output`` element in the same shape and the same representation.
  Sampling comes from the request ``parameters`` (see ``sampling_params_from_infer``); the response
  ``parameters`` carry ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``cached_tokens``
  (prompt tokens served from the prefix cache).
- ``expertmesh.v1.Generation``: streaming ``Generate`` and ``ListModels``.
- ``grpc.health.v1.Health``: ``Check`` and ``Watch``, for the whole server ("") and each service.

Errors follow the HTTP API's semantics (``openai_app``): NOT_FOUND for an unknown model,
INVALID_ARGUMENT naming the input or parameter at fault (and for a prompt over the context),
RESOURCE_EXHAUSTED when the engine's queue is full, UNAVAILABLE when the engine is dead,
UNAUTHENTICATED without the API key, INTERNAL (logged here with its traceback, never sent) for
anything unexpected. A method sets the code and details on ``grpc_context`` and then raises: Serve
carries the code it finds on the context through its error path (``gRPCStatusError``) to the proxy,
which answers with it.

A client that cancels a unary call (ModelInfer) has its request aborted: Serve cancels the method's
task, which closes the engine stream. For server-streaming calls (Generate, Watch) Ray Serve 2.60's
proxy passes the cancellation on only when it lands while the proxy awaits the next message; when it
lands while the proxy writes one, the replica keeps going. A Generate stream then runs until it
finishes (max_tokens or the context's end); a Watch stream until WATCH_MAX_S_ENV seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from expertmesh.api.auth import bearer_accepted
from expertmesh.api.engine_client import EngineClient
from expertmesh.api.pb import generation_pb2 as gen
from expertmesh.api.pb import grpc_predict_v2_pb2 as oip
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import ErrorKind, client_error, remote_cause

logger = logging.getLogger(__name__)

SERVER_NAME = "expertmesh"
INPUT_NAME, OUTPUT_NAME, TEXT_DATATYPE = "text_input", "text_output", "BYTES"
TEXT_SHAPES = ([1], [1, 1])
SERVICES = ("inference.GRPCInferenceService", "expertmesh.v1.Generation", "grpc.health.v1.Health")
# Request parameters that Triton clients set for Triton's own scheduler; generation ignores them.
IGNORED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})
# How often a Watch stream re-evaluates the status it reports.
WATCH_INTERVAL_S = 5.0
# How long one Watch stream lives before it ends (OK) and the client watches again. Ray Serve's proxy
# does not always pass a client's cancellation of a server-streaming call on to the replica (not
# when it lands while the proxy is writing a message), so an unbounded Watch could outlive its client.
WATCH_MAX_S_ENV = "EXPERTMESH_GRPC_WATCH_MAX_S"
WATCH_MAX_S_DEFAULT = 300.0

_FINISH_REASONS = {
    "stop": gen.FINISH_REASON_STOP,
    "length": gen.FINISH_REASON_LENGTH,
    "abort": gen.FINISH_REASON_ABORT,
}
_SERVING = health_pb2.HealthCheckResponse.SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class GrpcAbort(Exception):
    """Ends an RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)  # both in args, so the exception survives pickling
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def invalid(details: str) -> GrpcAbort:
    return GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, details)


STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for what serving a request raised."""
    cause = remote_cause(exc)
    if isinstance(cause, GrpcAbort):
        return cause.code, cause.details
    error = client_error(cause)
    return STATUS_OF_KIND[error.kind], error.message


def _fail(ctx: RayServegRPCContext | None, exc: BaseException) -> NoReturn:
    code, details = status_for(exc)
    if ctx is not None:  # None when called through a DeploymentHandle rather than the proxy
        ctx.set_code(code)
        ctx.set_details(details)
    # Serve logs the failure with its chain; the cause was logged above when it was unexpected.
    raise GrpcAbort(code, details) from None


def api_key_accepted(invocation_metadata: Iterable[tuple[str, Any]], api_key: str | None) -> bool:
    """Whether the call's metadata carries ``authorization: Bearer <api_key>`` (always, without a key)."""
    return bearer_accepted(
        next((v for k, v in invocation_metadata if k.lower() == "authorization"), None), api_key
    )


# --- ModelInfer: tensors and parameters ---------------------------------------------------------


def decode_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """Elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise invalid(f"input {name!r}: raw contents end inside an element's 4-byte length")
        n = int.from_bytes(raw[i : i + 4], "little")
        i += 4
        if i + n > len(raw):
            raise invalid(f"input {name!r}: raw contents are shorter than an element's length {n}")
        items.append(raw[i : i + n])
        i += n
    return items


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def text_input(request: oip.ModelInferRequest) -> tuple[str, list[int]]:
    """The prompt in the request's ``text_input`` tensor, and that tensor's shape."""
    names = [t.name for t in request.inputs]
    unknown = [n for n in names if n != INPUT_NAME]
    if unknown:
        raise invalid(f"unknown input {unknown[0]!r}: this model takes one input, {INPUT_NAME!r}")
    if not names:
        raise invalid(f"missing input {INPUT_NAME!r}: send the prompt as a BYTES tensor of shape [1]")
    if len(names) > 1:
        raise invalid(f"input {INPUT_NAME!r} is given {len(names)} times")
    tensor = request.inputs[0]
    if tensor.datatype != TEXT_DATATYPE:
        raise invalid(f"input {INPUT_NAME!r} must have datatype BYTES, got {tensor.datatype or 'none'!r}")
    shape = list(tensor.shape)
    if shape not in TEXT_SHAPES:
        raise invalid(f"input {INPUT_NAME!r} must have shape [1] or [1, 1] (one prompt), got {shape}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input {INPUT_NAME!r}"
            )
        if tensor.HasField("contents"):
            raise invalid(f"input {INPUT_NAME!r} has both contents and raw_input_contents: send one")
        items = decode_bytes_tensor(request.raw_input_contents[0], INPUT_NAME)
    else:
        items = list(tensor.contents.bytes_contents)
    if len(items) != 1:
        raise invalid(f"input {INPUT_NAME!r} must hold 1 element (shape {shape}), got {len(items)}")
    try:
        return items[0].decode("utf-8"), shape
    except UnicodeDecodeError as exc:
        raise invalid(
            f"input {INPUT_NAME!r} is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _parameter_value(name: str, param: oip.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise invalid(f"parameter {name!r} has no value")
    value = getattr(param, which)
    # Lists travel as JSON text (tritonclient sends only bool, int and str parameters).
    if name == "stop" and isinstance(value, str) and value.startswith("["):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value  # a stop string that merely starts with "["
        return decoded if isinstance(decoded, list) else value
    if name == "stop_token_ids":
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise invalid(
                    f"parameter 'stop_token_ids' must be a token id or a JSON list of them, got {value!r}"
                ) from None
    return value


def sampling_params_from_infer(parameters: Mapping[str, oip.InferParameter]) -> SamplingParams:
    """``SamplingParams`` from ModelInfer request parameters, named as SamplingParams' fields.

    Any of the InferParameter kinds may carry a value that converts (``temperature`` as
    ``double_param`` or as the string ``"0.7"``, as tritonclients before 2.73 must send it);
    ``stop`` is one stop string or a JSON list of them, ``stop_token_ids`` a token id or a JSON list.
    Unknown names and bad values raise InvalidRequestError naming the parameter.
    """
    values = {
        name: _parameter_value(name, param)
        for name, param in parameters.items()
        if name not in IGNORED_PARAMETERS
    }
    return SamplingParams(**values)  # pydantic: validates, and names the field at fault


def sampling_params_from_proto(sampling: gen.SamplingParams) -> SamplingParams:
    """``SamplingParams`` from the fields the client set; the others keep the engine's defaults."""
    values = {
        field.name: list(value) if field.is_repeated else value for field, value in sampling.ListFields()
    }
    return SamplingParams(**values)


def _infer_response(
    request: oip.ModelInferRequest, shape: list[int], final: RequestOutput
) -> oip.ModelInferResponse:
    completion = final.outputs[0]
    response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
    output = response.outputs.add(name=OUTPUT_NAME, datatype=TEXT_DATATYPE, shape=shape)
    text = completion.text.encode("utf-8")
    # Answer in the representation the client used, as KServe's servers do.
    if request.raw_input_contents:
        response.raw_output_contents.append(encode_bytes_tensor([text]))
    else:
        output.contents.bytes_contents.append(text)
    # A stream that ends unfinished was aborted on the server (by id), as openai_app reports it.
    reason = completion.finish_reason if final.finished else "abort"
    response.parameters["finish_reason"].string_param = reason or "abort"
    response.parameters["prompt_tokens"].int64_param = len(final.prompt_token_ids)
    response.parameters["completion_tokens"].int64_param = len(completion.token_ids)
    response.parameters["cached_tokens"].int64_param = final.num_cached_tokens
    return response


# --- the services ---------------------------------------------------------------------------------


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class GrpcServicesMixin:
    """One method per RPC, named as the RPC, for Ray Serve's gRPC proxy; ``self`` is an EngineClient.

    An ``api_key`` attribute, when the host has one that is not None, makes every RPC except the
    health ones (ServerLive, ServerReady, Check, Watch) demand ``authorization: Bearer <key>``.
    """

    # -- inference.GRPCInferenceService --

    async def ServerLive(
        self, request: oip.ServerLiveRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ServerReadyResponse:
        # Serve routes to this replica only once the app is deployed, engines included.
        return oip.ServerReadyResponse(ready=bool(self.model_names()))

    async def ModelReady(
        self, request: oip.ModelReadyRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ModelReadyResponse:
        self._grpc_authorize(grpc_context)
        try:
            self._grpc_model(request.name, request.version)
        except Exception as exc:
            _fail(grpc_context, exc)
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ServerMetadataResponse:
        self._grpc_authorize(grpc_context)
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=[])

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ModelMetadataResponse:
        self._grpc_authorize(grpc_context)
        try:
            self._grpc_model(request.name, request.version)
        except Exception as exc:
            _fail(grpc_context, exc)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name,
            platform=SERVER_NAME,
            inputs=[tensor(name=INPUT_NAME, datatype=TEXT_DATATYPE, shape=[1])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=TEXT_DATATYPE, shape=[1])],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, grpc_context: RayServegRPCContext | None = None
    ) -> oip.ModelInferResponse:
        self._grpc_authorize(grpc_context)
        try:
            self._grpc_model(request.model_name, request.model_version)
            prompt, shape = text_input(request)
            for output in request.outputs:
                if output.name != OUTPUT_NAME:
                    raise invalid(f"unknown output {output.name!r}: this model has one, {OUTPUT_NAME!r}")
            params = sampling_params_from_infer(request.parameters)
            final = None
            stream = self.generate(
                request.model_name, prompt, params, f"infer-{uuid.uuid4().hex}", stream=False
            )
            try:
                async for out in stream:
                    final = out
            finally:  # also on cancellation: closing the stream aborts the request
                await _aclose(stream)
            if final is None:
                raise GrpcAbort(grpc.StatusCode.INTERNAL, "the engine ended the request without output")
        except Exception as exc:
            _fail(grpc_context, exc)
        return _infer_response(request, shape, final)

    # -- expertmesh.v1.Generation --

    async def Generate(
        self, request: gen.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[gen.GenerateResponse]:
        started = time.monotonic()
        self._grpc_authorize(grpc_context)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        try:
            self._grpc_model(request.model, "")
            which = request.WhichOneof("prompt")
            if which is None:
                raise invalid("missing prompt: set 'text' or 'token_ids'")
            prompt = request.text if which == "text" else list(request.token_ids.ids)
            params = sampling_params_from_proto(request.sampling)
            # The engine's id is always fresh: ids that clients choose may collide.
            stream = self.generate(request.model, prompt, params, f"gen-{uuid.uuid4().hex}")
            try:
                first_token_at, last = None, None
                async for out in stream:
                    last = out
                    c = out.outputs[0]
                    if first_token_at is None and c.token_ids:
                        first_token_at = time.monotonic()
                    if c.delta_token_ids or c.delta_text:
                        delta = gen.Delta(token_ids=c.delta_token_ids, text=c.delta_text)
                        yield gen.GenerateResponse(request_id=request_id, delta=delta)
            finally:  # also when the client cancels: closing the stream aborts the request
                await _aclose(stream)
            if last is None:
                raise GrpcAbort(grpc.StatusCode.INTERNAL, "the engine ended the request without output")
            finish = _finish(last, started, first_token_at)
            yield gen.GenerateResponse(request_id=request_id, finish=finish)
        except Exception as exc:
            _fail(grpc_context, exc)

    async def ListModels(
        self, request: gen.ListModelsRequest, grpc_context: RayServegRPCContext | None = None
    ) -> gen.ListModelsResponse:
        self._grpc_authorize(grpc_context)
        client: EngineClient = self  # type: ignore[assignment]  # the host class is one
        cards = []
        for name in client.model_names():
            info = client.model_info(name)
            cards.append(
                gen.ModelCard(
                    name=name, max_model_len=info.max_model_len, created=info.created, owned_by=info.owned_by
                )
            )
        return gen.ListModelsResponse(models=cards)

    # -- grpc.health.v1.Health --

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext | None = None
    ) -> health_pb2.HealthCheckResponse:
        status = self._grpc_health(request.service)
        if status == _SERVICE_UNKNOWN:  # the health protocol's answer to Check for an unknown service
            _fail(grpc_context, GrpcAbort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        # The protocol: the status now, then each change, until the client cancels (or WATCH_MAX_S_ENV).
        ends = time.monotonic() + float(os.environ.get(WATCH_MAX_S_ENV, WATCH_MAX_S_DEFAULT))
        reported = None
        while True:
            status = self._grpc_health(request.service)
            if status != reported:
                reported = status
                yield health_pb2.HealthCheckResponse(status=status)
            left = ends - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(WATCH_INTERVAL_S, left))

    # -- helpers (prefixed: they live in the Router's namespace) --

    def _grpc_health(self, service: str) -> int:
        if service and service not in SERVICES:
            return _SERVICE_UNKNOWN
        # This replica answers only while Serve keeps the app deployed.
        return _SERVING if self.model_names() else health_pb2.HealthCheckResponse.NOT_SERVING

    def _grpc_authorize(self, ctx: RayServegRPCContext | None) -> None:
        key = getattr(self, "api_key", None)
        metadata = ctx.invocation_metadata() if ctx is not None else []
        if not api_key_accepted(metadata, key):
            _fail(
                ctx,
                GrpcAbort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong API key: send the metadata 'authorization: Bearer <key>'",
                ),
            )

    def _grpc_model(self, name: str, version: str) -> None:
        """Raise ModelNotFoundError for an unknown model, NOT_FOUND for a version we cannot pin."""
        self.model_info(name)
        if version:
            raise GrpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} version {version!r} cannot be chosen: the server picks the revision "
                "by its traffic split; leave the version empty",
            )


def _finish(last: RequestOutput, started: float, first_token_at: float | None) -> gen.Finish:
    c = last.outputs[0]
    # A stream that ends unfinished was aborted on the server (by id), as openai_app reports it.
    reason = c.finish_reason if last.finished else "abort"
    now = time.monotonic()
    finish = gen.Finish(
        finish_reason=_FINISH_REASONS.get(reason or "", gen.FINISH_REASON_UNSPECIFIED),
        stats=gen.GenerationStats(
            prompt_tokens=len(last.prompt_token_ids),
            completion_tokens=len(c.token_ids),
            cached_tokens=last.num_cached_tokens,
            time_to_first_token_s=(first_token_at - started) if first_token_at is not None else 0.0,
            total_time_s=now - started,
        ),
    )
    if isinstance(c.stop_reason, str):
        finish.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        finish.stop_token_id = c.stop_reason
    return finish


def _version() -> str:
    try:
        return version("expertmesh")
    except PackageNotFoundError:
        return "unknown"
