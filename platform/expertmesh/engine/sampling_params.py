"""Per-request sampling settings, in vLLM's shape, validated at the boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from expertmesh.errors import InvalidRequestError, describe_validation_error

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class SamplingParams(BaseModel):
    """`temperature=0` is greedy. `top_k` of 0 or -1 and `top_p=1` switch those filters off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1, description="new tokens to generate, at most")
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __init__(self, **data):
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidRequestError(describe_validation_error(exc, "sampling parameter")) from None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str]) -> list[str]:
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        for s in stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
        return stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
