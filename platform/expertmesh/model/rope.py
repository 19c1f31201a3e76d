"""RoPE's inverse frequencies: the default, and YaRN's context extension (arXiv 2309.00071).

YaRN keeps the fast-rotating dimensions as trained (extrapolation), slows the slow ones by
`factor` (interpolation), ramps linearly between the two over the dimensions whose rotation
count at the original context lies between `beta_slow` and `beta_fast`, and scales cos and sin
by an attention factor that grows with log(factor). Qwen's long-context configs and the
DeepSeek-V3 family use it (`rope_scaling` / `rope_parameters` with type `yarn`).
"""

from __future__ import annotations

import math

import torch
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


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: YarnScaling) -> float:
    """What cos and sin are multiplied by: given, or 0.1 ln(factor) + 1 (with DeepSeek's
    mscale / mscale_all_dim, the ratio of two such terms)."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return _mscale(scaling.factor, scaling.mscale) / _mscale(scaling.factor, scaling.mscale_all_dim)
    return _mscale(scaling.factor)


def inverse_frequencies(
    dim: int, theta: float, scaling: YarnScaling | None = None
) -> tuple[torch.Tensor, float]:
    """([dim / 2] inverse frequencies, the factor on cos and sin) for a head of `dim` rotated dimensions."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    extrapolated = 1.0 / theta**exponents
    if scaling is None:
        return extrapolated, 1.0
    interpolated = extrapolated / scaling.factor

    def dimension_of(rotations: float) -> float:
        # the dimension that turns `rotations` times over the original context
        wavelengths = scaling.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(wavelengths) / (2 * math.log(theta))

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: as trained (fast dimensions), 0: slowed by `factor`
    return interpolated * (1 - keep) + extrapolated * keep, yarn_attention_factor(scaling)
