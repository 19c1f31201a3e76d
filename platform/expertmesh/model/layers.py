"""Dense building blocks: RMSNorm, rotary embedding, SwiGLU MLP; native kernels where they are faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import use_native
from expertmesh.model.config import ModelConfig
from expertmesh.model.rope import inverse_frequencies
from expertmesh.model.rope_scaling import YarnScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def _native(self, x: torch.Tensor) -> bool:
        return (
            rows_ready(x, self.weight.shape[0], 16)
            and x.dtype == self.weight.dtype
            and use_native("rms_norm", x.shape[0])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            return native_kernels().rms_norm(x, self.weight, self.eps)[0]
        # Normalise in fp32 then cast back, as the HF families do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm): the residual add and the norm after it, in one pass when native."""
        if self._native(x) and delta.dtype == x.dtype and delta.shape == x.shape and delta.is_contiguous():
            summed, normed = native_kernels().rms_norm(x, self.weight, self.eps, delta)
            return summed, normed
        x = x + delta
        return x, self(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up by position id (default RoPE, or YaRN)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: YarnScaling | None = None):
        super().__init__()
        inv_freq, attention_factor = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)

    @classmethod
    def of(cls, cfg: ModelConfig) -> RotaryEmbedding:
        return cls(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, 1, head_dim], ready to broadcast over heads."""
        return self.cos[positions, None, :].to(dtype), self.sin[positions, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Linears run on the native kernels, which read each weight once, packed at load into
# column blocks, instead of repacking it per call as MKL and oneDNN do: fp32, and bf16 on the
# CPU's bf16 dot-product instruction where it has one (the load-time guard keeps torch's path
# wherever it measures faster; docs/cpu-kernels.md has the numbers). A weight whose
# out-features are not a multiple of 16 runs, up to this many rows, on the dot-product
# kernel, which beats MKL at a few rows; beyond it on MKL/oneDNN.
_SMALL_LINEAR_MAX_ROWS = 32


# fp32 linears of at least this many rows run on AMX where the CPU has it (kernels/amx_cpu.cpp:
# fp32's accuracy from bf16 tile products); fewer rows stay on the packed fp32 kernel, which
# reads 4 bytes a weight where the split tiles take 6.
_TILE_MIN_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the native kernels where they are faster."""
    if (
        x.dim() == 2
        and x.dtype == weight.dtype
        and _kernel_ready(weight)
        and use_native("linear", x.shape[0])
    ):
        kernels = native_kernels()
        if x.shape[0] >= _TILE_MIN_ROWS and _tileable(weight):
            return kernels.tile_linear(x.contiguous(), _tile_packed(kernels, weight), bias)
        if _packable(weight):
            return kernels.packed_linear(x.contiguous(), _packed(kernels, weight), bias)
        if x.shape[0] <= _SMALL_LINEAR_MAX_ROWS:
            return kernels.small_linear(x.contiguous(), weight, bias)
    return F.linear(x, weight, bias)


def rows_ready(x: torch.Tensor, width: int, multiple: int) -> bool:
    """The native row-wise kernels (and MoE dispatch/combine) take contiguous 2-D fp32 or bf16
    rows, `multiple` | width."""
    return (
        x.dim() == 2
        and x.shape[1] == width
        and width % multiple == 0
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous()
        and native_kernels() is not None
    )


def _kernel_ready(weight: torch.Tensor) -> bool:
    """The native linear kernels take a contiguous fp32 or bf16 [N, K] weight, K a multiple of 16."""
    return (
        weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] % 16 == 0
        and native_kernels() is not None
    )


def _packable(weight: torch.Tensor) -> bool:
    """The packed kernel also needs N a multiple of 16 (its column blocks). bf16 weights are
    pair-packed for a CPU's bf16 dot product, or widened as they are read where it has none."""
    return _kernel_ready(weight) and weight.shape[0] % 16 == 0


def _tileable(weight: torch.Tensor) -> bool:
    """The tile kernel takes fp32 weights with N a multiple of 16 and K of 32, on a CPU (and OS)
    with AMX."""
    return (
        weight.dtype == torch.float32
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 32 == 0
        and native_kernels().has_tile_linear()
    )


def pack_linear_weights(model: nn.Module) -> None:
    """Pack every linear weight the native kernels will read now, at load, not in the first step."""
    kernels = native_kernels()
    if kernels is not None:
        fused = [m for m in model.modules() if isinstance(m, GatedMLP) and m.fused_layout() is not None]
        skip = {id(linear.weight) for mlp in fused for linear in (mlp.gate_up_proj, mlp.down_proj)}
        for module in model.modules():
            if (
                isinstance(module, nn.Linear)
                and _kernel_ready(module.weight)
                and id(module.weight) not in skip
            ):
                if _packable(module.weight):
                    _packed(kernels, module.weight)
                if _tileable(module.weight):
                    _tile_packed(kernels, module.weight)


def _packed(kernels, weight: torch.Tensor) -> torch.Tensor:
    """`weight` in packed_linear's layout (a second copy of it), kept on the weight."""
    return _cached_on(weight, "_expertmesh_packed", kernels.pack_linear)


def _tile_packed(kernels, weight: torch.Tensor) -> torch.Tensor:
    """`weight` split into tile_linear's bf16 hi/mid/lo tiles (1.5x its size), kept on the weight."""
    return _cached_on(weight, "_expertmesh_tiles", kernels.pack_tile_linear)


def _cached_on(weight: torch.Tensor, attribute: str, pack) -> torch.Tensor:
    """pack(weight), made on first use and kept on the weight, made again if the weight is
    written to (its version counter moves)."""
    cached = getattr(weight, attribute, None)
    if cached is None or cached[0] != weight._version:
        cached = (weight._version, pack(weight.detach()))
        setattr(weight, attribute, cached)
    return cached[1]


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose calls use the native kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul.

    In bf16 on the tile unit it runs as one expert of the fused expert kernel, which takes
    silu(gate) * up from the up products' tiles and scales the rows by `row_weights` as it
    stores them, instead of writing gate and up out and reading them back.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of each row of x [T, H], times row_weights [T, 1] when given."""
        layout = self.fused_layout() if x.dim() == 2 and x.dtype == torch.bfloat16 else None
        if layout is None:
            out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
            return out if row_weights is None else out * row_weights
        rows = x.shape[0]
        weights = torch.ones(rows) if row_weights is None else row_weights.reshape(rows).float().contiguous()
        # in x's dtype already
        return native_kernels().fused_experts(x.contiguous(), torch.tensor([0, rows]), *layout, weights)

    def fused_layout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights as one expert in pack_experts' layout, where the fused kernel runs bf16
        on the tile unit (made once, again if a weight is written to); else None."""
        gate_up, down = self.gate_up_proj.weight, self.down_proj.weight
        kernels = native_kernels()
        if not (
            kernels is not None
            and gate_up.dtype == down.dtype == torch.bfloat16
            and kernels.has_tile_linear()
            and gate_up.shape[1] % 32 == 0
            and self.intermediate_size % 32 == 0
        ):
            return None
        versions = (gate_up._version, down._version)
        cached = getattr(self, "_fused", None)
        if cached is None or cached[0] != versions:
            packed = kernels.pack_experts(
                gate_up.detach().t().unsqueeze(0).contiguous(), down.detach().t().unsqueeze(0).contiguous()
            )
            cached = self._fused = (versions, tuple(packed))
        return cached[1]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] holding (gate, up) -> silu(gate) * up: natively in one pass to a contiguous
    result; with torch, in place on the gate half (a strided view the next linear copies)."""
    half = gate_up.shape[-1] // 2
    if rows_ready(gate_up, 2 * half, 32) and use_native("silu_and_mul", gate_up.shape[0]):
        return native_kernels().silu_and_mul(gate_up)
    gate = gate_up[..., :half]
    return F.silu(gate, inplace=True).mul_(gate_up[..., half:])
