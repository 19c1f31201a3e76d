"""Errors a user can act on: each message names the file, key or field at fault."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

logger = logging.getLogger(__name__)


class ExpertMeshError(Exception):
    """Base class for errors the runtime raises on purpose."""


class CheckpointError(ExpertMeshError):
    """A checkpoint directory cannot be used: missing file, bad key, wrong shape or dtype."""


class BackendUnavailableError(ExpertMeshError):
    """Something the engine needs (an expert pool) did not answer: the requests of that step failed,
    the engine goes on. Servers answer UNAVAILABLE / 503; retrying is safe."""


class InvalidRequestError(ExpertMeshError, ValueError):
    """A request the engine will never serve as given (prompt too long, bad sampling values)."""


class QueueFullError(InvalidRequestError):
    """The waiting queue is at `max_queued_requests`: try again later."""


class EngineDeadError(ExpertMeshError, RuntimeError):
    """The engine loop stopped on an error; no request can make progress."""


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One clause per bad field: `invalid sampling parameter 'top_p': Input should be ... (got 2.0)`."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "value"
        msg = err["msg"].removeprefix("Value error, ")
        shown = err["type"] != "missing" and not isinstance(err["input"], dict)
        parts.append(f"invalid {what} {field!r}: {msg}" + (f" (got {err['input']!r})" if shown else ""))
    return "; ".join(parts)


class ModelNotFoundError(ExpertMeshError, LookupError):
    """A request named a model this server does not serve.

    One-argument, like a plain exception, so Ray can re-raise it across processes.
    """

    @classmethod
    def for_model(cls, name: str, available: list[str]) -> ModelNotFoundError:
        served = ", ".join(repr(n) for n in available) or "none"
        return cls(f"model {name!r} is not served here; available models: {served}")


def remote_cause(exc: BaseException) -> BaseException:
    """The original error behind a Ray RayTaskError (raised in another replica).

    Ray re-raises it as a subclass of the original class whose str() is the remote traceback;
    clients get the cause's message, never that traceback.
    """
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # no Ray in this process: nothing to unwrap
        return exc
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc


# What a client is told about a request that failed, whatever the protocol: the OpenAI API maps
# these to HTTP statuses, the gRPC services to status codes.
ErrorKind = Literal["not_found", "overloaded", "invalid", "unavailable", "internal"]


def classify(exc: BaseException) -> ErrorKind:
    """Pure: the kind of a failure (after `remote_cause`). QueueFullError is an InvalidRequestError
    too, so it is asked first."""
    if isinstance(exc, ModelNotFoundError):
        return "not_found"
    if isinstance(exc, QueueFullError):
        return "overloaded"
    if isinstance(exc, InvalidRequestError):
        return "invalid"
    if isinstance(exc, EngineDeadError | BackendUnavailableError):
        return "unavailable"
    return "internal"


@dataclass(frozen=True)
class ClientError:
    kind: ErrorKind
    message: str


def client_error(exc: BaseException) -> ClientError:
    """The kind and client-facing message of what serving a request raised (a Ray error unwrapped
    to its cause). The server's own failures are logged here: an unavailable engine or pool as
    an error, anything unexpected with its traceback, and the client never sees a traceback."""
    exc = remote_cause(exc)
    kind = classify(exc)
    if kind == "unavailable":
        logger.error("engine unavailable: %s", exc)
    if kind == "internal":
        logger.error("unexpected error serving a request", exc_info=exc)
        return ClientError(kind, f"internal server error ({type(exc).__name__}); see the server log")
    return ClientError(kind, str(exc))
