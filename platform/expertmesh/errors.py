"""Errors a user can act on: each message names the file, key or field at fault."""


class ExpertMeshError(Exception):
    """Base class for errors the runtime raises on purpose."""


class CheckpointError(ExpertMeshError):
    """A checkpoint directory cannot be used: missing file, bad key, wrong shape or dtype."""


class InvalidRequestError(ExpertMeshError, ValueError):
    """A request the engine will never serve as given (prompt too long, bad sampling values)."""
