"""expertmesh: serve Mixture-of-Experts LLMs with one replica pool per expert group.

The engine's names load on first use (PEP 562), so importing a light module of the package
(the errors, the configs, the serve layout the operator uses) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from expertmesh.errors import CheckpointError, ExpertMeshError, InvalidRequestError

if TYPE_CHECKING:
    from expertmesh.engine.llm import LLM
    from expertmesh.engine.sampling_params import SamplingParams
    from expertmesh.engine.sequence import CompletionOutput, RequestOutput

_LAZY = {
    "LLM": "expertmesh.engine.llm",
    "SamplingParams": "expertmesh.engine.sampling_params",
    "CompletionOutput": "expertmesh.engine.sequence",
    "RequestOutput": "expertmesh.engine.sequence",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'expertmesh' has no attribute {name!r}")


__all__ = [
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "ExpertMeshError",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
]
