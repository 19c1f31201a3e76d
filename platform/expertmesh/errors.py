"""Errors a user can act on: each message names the file, key or field at fault."""

from __future__ import annotations

from pydantic import ValidationError


class ExpertMeshError(Exception):
    """Base class for errors the runtime raises on purpose."""


class CheckpointError(ExpertMeshError):
    """A checkpoint directory cannot be used: missing file, bad key, wrong shape or dtype."""


class BackendUnavailableError(ExpertMeshError):
    """Something the engine needs (an expert pool) did not answer: the requests of that step failed,
    the engine goes on. Servers answer UNAVAILABLE / 503; retrying is safe."""


class InvalidRequestError(ExpertMeshError, ValueError):
    """A request the engine will never serve as given (prompt too long, bad sampling values)."""


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
