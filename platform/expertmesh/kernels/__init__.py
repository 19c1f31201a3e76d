"""Native CPU kernels, compiled on first use for the CPU they run on.

Compiling here rather than shipping binaries lets `-march=native` pick the machine's
widest SIMD. Where no compiler is available the callers keep to torch's own kernels,
so a missing toolchain costs speed, never correctness.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (
    "bindings.cpp",
    "moe_cpu.cpp",
    "dispatch_cpu.cpp",
    "attention_cpu.cpp",
    "linear_cpu.cpp",
    "pointwise_cpu.cpp",
    "amx_cpu.cpp",
    "amx_bf16_cpu.cpp",
)
DISABLE_ENV = "EXPERTMESH_NATIVE_KERNELS"  # set to 0 to run torch's kernels only


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled extension (`fused_experts`, `decode_attention`, `small_linear`), or None if it cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        import ninja  # torch's extension builder runs the `ninja` executable
        from torch.utils import cpp_extension

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        return cpp_extension.load(
            name="expertmesh_kernels",
            sources=[str(HERE / name) for name in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported CPU: fall back, loudly once
        log.warning("native CPU kernels unavailable, using torch kernels instead: %s", exc)
        return None
