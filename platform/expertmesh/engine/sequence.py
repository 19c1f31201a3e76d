"""A request's life inside the engine, and what the engine reports about it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from expertmesh.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    blocks: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when the request joined
    block_hashes: list[bytes] = field(default_factory=list)  # addresses of its full blocks so far
    num_cached_blocks: int = 0  # leading blocks addressed in the prefix cache
    text: str = ""  # detokenized output so far (stop strings already cut)
    emitted_chars: int = 0  # how much of `text` the caller has been given
    emitted_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why it failed, when finish_reason is "error"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    first_token_time: float | None = None
    # incremental detokenization offsets (see Detokenizer)
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    delta_text: str = ""  # what is new since the previous report of this request
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None  # set when the request failed (finish_reason "error")
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (vLLM's name)

    @property
    def num_output_tokens(self) -> int:
        return len(self.outputs[0].token_ids)
