"""YaRN's settings and magnitude terms, as plain data: read by the config (which imports no torch)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict


class YarnScaling(BaseModel):
    model_config = ConfigDict(frozen=True)

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: YarnScaling) -> float:
    """What cos and sin are multiplied by: given, or 0.1 ln(factor) + 1 (with DeepSeek's
    mscale / mscale_all_dim, the ratio of two such terms)."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return yarn_mscale(scaling.factor)
