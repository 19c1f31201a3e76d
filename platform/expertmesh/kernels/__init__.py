"""Native CPU kernels, compiled on first use for the CPU they run on.

Compiling here rather than shipping binaries lets each build target one instruction-set
level (isa.py): the CPU's own by default, or a lower one named by `EXPERTMESH_CPU_ISA`
to build, test and benchmark what an older CPU runs. Each level has its own build cache.
Where no compiler is available the callers keep to torch's own kernels, so a missing
toolchain costs speed, never correctness; `EXPERTMESH_NATIVE_KERNELS=0` asks for that.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

from expertmesh.kernels.isa import (
    ISA_ENV,
    NATIVE,
    PORTABLE,
    compile_flags,
    cpu_flags,
    machine,
    resolve,
    supported_levels,
)

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


def isa_level() -> str:
    """The level this process builds its kernels for (`EXPERTMESH_CPU_ISA`, default the CPU's
    highest). A level the CPU lacks, or no level at all, raises UnsupportedIsa: asking for it
    is a mistake to report, not a reason to run something else quietly."""
    return resolve(os.environ.get(ISA_ENV), cpu_flags(), machine())


def buildable_levels() -> tuple[str, ...]:
    """Every level this CPU runs, lowest first: the portable build, then the x86 levels it has."""
    return (PORTABLE, *supported_levels(cpu_flags(), machine()))


@functools.cache
def kernels_for(level: str) -> ModuleType:
    """The extension built for one ISA level (from its cache after the first build, about 40 s
    on 2 cores). Raises where it cannot be built."""
    import ninja  # torch's extension builder runs the `ninja` executable
    from torch.utils import cpp_extension

    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return cpp_extension.load(
        name=f"expertmesh_kernels_{level}",
        sources=[str(HERE / name) for name in SOURCES],
        extra_cflags=["-O3", *compile_flags(level, machine()), "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled extension for this process's ISA level (`fused_experts`, `packed_linear`,
    ...), or None where it is turned off or cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    level = isa_level()
    if level == PORTABLE and os.environ.get(ISA_ENV, NATIVE).strip().lower() in ("", NATIVE):
        log.warning(
            "no x86 SIMD level the kernels know on this %s CPU: building their portable C++ "
            "(the load-time guard keeps torch's kernel wherever it is faster)",
            machine(),
        )
    try:
        return kernels_for(level)
    except Exception as exc:  # no compiler, no ninja, a compiler without this level: fall back, loudly once
        log.warning("native CPU kernels unavailable, using torch kernels instead: %s", exc)
        return None
