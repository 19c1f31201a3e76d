"""Engine limits: batch size, step token budget, KV cache memory."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """Speculative decoding: propose tokens cheaply, verify them all in one forward pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["ngram"] = Field(
        "ngram",
        description="ngram: prompt lookup, the tokens that followed the sequence's last n-gram before",
    )
    num_tokens: int = Field(4, ge=1, le=16, description="tokens proposed per step for each sequence, at most")
    ngram_max: int = Field(4, ge=1, le=16, description="longest trailing n-gram looked up")
    ngram_min: int = Field(1, ge=1, le=16, description="shortest trailing n-gram looked up")

    @model_validator(mode="after")
    def _ngram_range(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(64, ge=1, description="sequences in the running batch, at most")
    max_num_batched_tokens: int = Field(
        1024, ge=16, description="tokens per step; longer prompts are prefilled in chunks"
    )
    max_model_len: int | None = Field(None, ge=2, description="context length; default: the model's")
    kv_cache_memory_bytes: int = Field(2 * 1024**3, ge=1024, description="KV cache budget")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    max_queued_requests: int = Field(4096, ge=1, description="waiting requests before new ones are refused")
    seed: int = Field(0, description="seed for requests that bring none")
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the KV cache blocks of a prompt's start that an earlier request computed "
        "(on by default, as in vLLM); false: every prompt is prefilled whole",
    )
    # Ping-pong overlap of disaggregated experts (model/micro_batch.py). Off by default: on a
    # machine where the pools already fill the cores while the engine waits there is no idle
    # time to hide, and bench/overlap.py reads below 1 there (docs/benchmarks.md).
    speculative: SpeculativeConfig | None = Field(
        None,
        description="speculative decoding (off by default): greedy output stays token for token, "
        "sampled output keeps its distribution",
    )
    micro_batches: Literal[1, 2] = Field(
        1,
        description="2: with remote experts, run a large step as two micro-batches that alternate, "
        "so one's expert rows are in flight while the other computes; 1: one batch per step",
    )
    micro_batch_min_tokens: int = Field(
        64, ge=2, description="steps with fewer tokens run as one batch even when micro_batches is 2"
    )

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode each step"
            )
        return self
