"""Errors a user can act on: each message names the file, key or field at fault."""

from pydantic import ValidationError


class ExpertMeshError(Exception):
    """Base class for errors the runtime raises on purpose."""


class CheckpointError(ExpertMeshError):
    """A checkpoint directory cannot be used: missing file, bad key, wrong shape or dtype."""


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
    """A request named a model this server does not serve."""

    def __init__(self, name: str, available: list[str]):
        self.name, self.available = name, list(available)
        served = ", ".join(repr(n) for n in self.available) or "none"
        super().__init__(f"model {name!r} is not served here; available models: {served}")

    def __reduce__(self):  # picklable across processes (Ray), despite the two-argument constructor
        return type(self), (self.name, self.available)
