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

from expertmesh.model.rope_scaling import YarnScaling, yarn_attention_factor


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
