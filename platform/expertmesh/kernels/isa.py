"""Which instruction-set level the native kernels are built for: the CPU's, or a lower one asked for.

Each level is its own build, with its own compiler flags and build cache, so a newer CPU
can build, test and benchmark the kernels an older one runs (as oneDNN's
`ONEDNN_MAX_CPU_ISA` does). `EXPERTMESH_CPU_ISA` names the level:

- `avx2`: AVX2 + FMA (x86-64-v3): 8 fp32 lanes, 16 vector registers;
- `avx512`: AVX-512 F/BW/CD/DQ/VL (x86-64-v4): 16 lanes, 32 registers;
- `avx512_bf16`: AVX-512 with the bf16 dot product (`vdpbf16ps`);
- `amx`: AVX512-BF16 and the AMX tile unit;
- `native` (the default): the highest of these the CPU has; on a CPU with none of them
  (ARM, or x86 before AVX2) the `portable` build;
- `portable`: plain C++ vectors of 8 lanes that the compiler maps to whatever SIMD the
  CPU has, with no x86 level asked for (on x86-64, SSE2): what an ARM CPU builds, and
  a way to run that code on any machine.

The decisions here are pure functions of the CPU's flags; reading them is `cpu_flags()`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "EXPERTMESH_CPU_ISA"
NATIVE = "native"
PORTABLE = "portable"


@dataclass(frozen=True)
class Level:
    name: str
    needs: frozenset[str]  # /proc/cpuinfo flags the CPU must have
    cflags: tuple[str, ...]  # what tells the compiler this level
    description: str


# Lowest first: each level needs everything the one before it does.
X86_LEVELS = (
    Level(
        "avx2",
        frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}),
        ("-march=x86-64-v3",),
        "AVX2 + FMA: 8 fp32 lanes, 16 vector registers",
    ),
    Level(
        "avx512",
        frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
        ("-march=x86-64-v4",),
        "AVX-512: 16 fp32 lanes, 32 vector registers",
    ),
    Level(
        "avx512_bf16",
        frozenset({"avx512_bf16"}),
        ("-march=x86-64-v4", "-mavx512bf16"),
        "AVX-512 with bf16 dot products (vdpbf16ps)",
    ),
    Level(
        "amx",
        frozenset({"amx_tile", "amx_bf16"}),
        ("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
        "AVX512-BF16 and AMX tiles",
    ),
)
LEVEL_NAMES = tuple(level.name for level in X86_LEVELS)
REQUESTABLE = (PORTABLE, *LEVEL_NAMES, NATIVE)


class UnsupportedIsa(ValueError):
    """EXPERTMESH_CPU_ISA names no level, or one this CPU lacks."""


def supported_levels(flags: frozenset[str], machine: str) -> tuple[str, ...]:
    """The x86 levels this CPU runs, lowest first (none off x86-64)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return ()
    supported: list[str] = []
    needed: set[str] = set()
    for level in X86_LEVELS:
        needed |= level.needs
        if not needed <= flags:
            break
        supported.append(level.name)
    return tuple(supported)


def resolve(requested: str | None, flags: frozenset[str], machine: str) -> str:
    """The level to build: `requested` (None or empty: native), checked against the CPU."""
    name = (requested or NATIVE).strip().lower()
    supported = supported_levels(flags, machine)
    if name == NATIVE:
        return supported[-1] if supported else PORTABLE
    if name == PORTABLE:
        return PORTABLE
    if name not in LEVEL_NAMES:
        raise UnsupportedIsa(f"{ISA_ENV}={requested!r} is not a level; use one of {', '.join(REQUESTABLE)}")
    if name not in supported:
        has = ", ".join(supported) if supported else f"none of them ({machine})"
        level = next(level for level in X86_LEVELS if level.name == name)
        raise UnsupportedIsa(
            f"{ISA_ENV}={name} needs {level.description}, which this CPU lacks; it has: {has}"
        )
    return name


def compile_flags(level: str, machine: str) -> list[str]:
    """Compiler flags for `level`: the level's own ISA flags, tuned for this CPU."""
    if level == PORTABLE:
        # The compiler's own idea of this CPU where it has one (aarch64, ppc64le); else its default.
        return ["-mcpu=native"] if machine.lower() in ("aarch64", "arm64", "ppc64le") else []
    flags = next(level_.cflags for level_ in X86_LEVELS if level_.name == level)
    return [*flags, "-mtune=native"]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (`flags` on x86, `Features` on ARM); empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it, or the machine type where it names none."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return platform.machine()
