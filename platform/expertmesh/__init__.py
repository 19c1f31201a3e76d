"""expertmesh: serve Mixture-of-Experts LLMs with one replica pool per expert group."""

from expertmesh.engine.llm import LLM
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import CompletionOutput, RequestOutput
from expertmesh.errors import CheckpointError, ExpertMeshError, InvalidRequestError

__all__ = [
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "ExpertMeshError",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
]
