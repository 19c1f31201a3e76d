"""The ISA levels the kernels build for, and the load-time guard that keeps torch where it is faster."""

import logging
import time

import pytest
import torch

import expertmesh.model.layers as layers
from expertmesh.engine.kernel_guard import guard_kernels
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import (
    CHOICES,
    DECODE,
    NATIVE,
    OPS,
    PREFILL,
    TORCH,
    Choice,
    KernelChoices,
    Timing,
    choose,
    describe,
)
from expertmesh.kernels.isa import PORTABLE, UnsupportedIsa, compile_flags, resolve, supported_levels

AVX2 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}


# --- ISA levels (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,levels",
    [
        (AVX2, ("avx2",)),
        (AVX512, ("avx2", "avx512")),
        (AVX512_BF16, ("avx2", "avx512", "avx512_bf16")),
        (AMX, ("avx2", "avx512", "avx512_bf16", "amx")),
        (AVX2 - {"fma"}, ()),
        # AMX without AVX512-BF16 is no level above avx512: each level needs every one below it
        (AVX512 | {"amx_tile", "amx_bf16"}, ("avx2", "avx512")),
    ],
)
def test_supported_levels_are_cumulative(flags, levels):
    assert supported_levels(flags, "x86_64") == levels


def test_native_is_the_cpus_highest_level_or_the_portable_build_off_x86():
    assert resolve(None, AVX2, "x86_64") == "avx2"
    assert resolve("native", AMX, "x86_64") == "amx"
    assert resolve("", AVX512_BF16, "x86_64") == "avx512_bf16"
    assert resolve("native", frozenset({"fp", "asimd", "sve"}), "aarch64") == PORTABLE


def test_a_lower_level_is_allowed_and_a_missing_one_names_what_the_cpu_has():
    assert resolve("avx2", AMX, "x86_64") == "avx2"
    assert resolve("AVX512", AVX512_BF16, "x86_64") == "avx512"
    with pytest.raises(UnsupportedIsa, match=r"EXPERTMESH_CPU_ISA=amx needs .*AMX.*it has: avx2, avx512$"):
        resolve("amx", AVX512, "x86_64")
    with pytest.raises(UnsupportedIsa, match=r"it has: none of them \(aarch64\)"):
        resolve("avx2", frozenset({"asimd"}), "aarch64")


def test_an_unknown_level_lists_the_levels():
    with pytest.raises(
        UnsupportedIsa,
        match="'sse4' is not a level; use one of portable, avx2, avx512, avx512_bf16, amx, native",
    ):
        resolve("sse4", AMX, "x86_64")


def test_the_portable_build_runs_anywhere_and_asks_for_no_x86_level():
    assert resolve("portable", AVX2, "x86_64") == PORTABLE
    assert compile_flags(PORTABLE, "x86_64") == []


def test_each_level_tells_the_compiler_its_isa():
    assert compile_flags("avx2", "x86_64")[0] == "-march=x86-64-v3"
    assert "-mavx512bf16" in compile_flags("avx512_bf16", "x86_64")
    assert {"-mamx-tile", "-mamx-bf16"} <= set(compile_flags("amx", "x86_64"))
    assert compile_flags(PORTABLE, "aarch64") == ["-mcpu=native"]


def test_a_level_the_cpu_lacks_is_an_error_not_a_quiet_fallback(monkeypatch):
    import expertmesh.kernels as kernels

    monkeypatch.setenv("EXPERTMESH_CPU_ISA", "amx")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX512)
    monkeypatch.setattr(kernels, "machine", lambda: "x86_64")
    kernels.native_kernels.cache_clear()
    try:
        with pytest.raises(UnsupportedIsa, match="EXPERTMESH_CPU_ISA=amx"):
            kernels.native_kernels()
    finally:
        kernels.native_kernels.cache_clear()


# --- the decision (pure) -----------------------------------------------------------------

LIMITS = dict.fromkeys(OPS, 32)


def test_the_faster_path_wins_per_op_and_size_class_and_native_wins_ties():
    timings = [
        Timing("linear", DECODE, 32, native_s=1.0, torch_s=2.0),
        Timing("linear", PREFILL, 1024, native_s=3.0, torch_s=2.0),
        Timing("rms_norm", DECODE, 32, native_s=1.0, torch_s=1.0),
    ]
    choices = choose(timings, LIMITS)
    assert choices["linear"] == Choice(32, NATIVE, TORCH)
    # a class that was not measured stays native
    assert choices["rms_norm"] == Choice(32, NATIVE, NATIVE)
    assert "experts" not in choices


def test_shapes_count_as_often_as_a_step_calls_them():
    # one shape 8 layers use, slower natively by a little, outweighs one the LM head uses once
    timings = [
        Timing("linear", DECODE, 32, native_s=1.1, torch_s=1.0, weight=8),
        Timing("linear", DECODE, 32, native_s=1.0, torch_s=1.5, weight=1),
    ]
    assert choose(timings, LIMITS)["linear"].decode == TORCH
    assert choose([*timings[:1], Timing("linear", DECODE, 32, 1.0, 3.0)], LIMITS)["linear"].decode == NATIVE


def test_a_choice_splits_at_the_decode_step_rows():
    choice = Choice(decode_max_rows=64, decode=NATIVE, prefill=TORCH)
    assert (choice.at(1), choice.at(64), choice.at(65)) == (NATIVE, NATIVE, TORCH)


def test_choices_answer_the_call_sites_and_forcing_restores_them():
    choices = KernelChoices()
    assert choices.use_native("linear", 10_000)  # unmeasured: native
    choices.update({"linear": Choice(16, NATIVE, TORCH)})
    assert choices.use_native("linear", 16) and not choices.use_native("linear", 17)
    with choices.forced("linear", TORCH):
        assert not choices.use_native("linear", 1)
    with choices.forced("experts", TORCH):
        assert not choices.use_native("experts", 1)
    assert choices.use_native("linear", 16) and not choices.use_native("linear", 17)
    assert choices.use_native("experts", 1) and "experts" not in choices.snapshot()


def test_the_report_names_each_choice_and_its_times():
    timings = [
        Timing("linear", DECODE, 32, 0.001, 0.002, weight=2),
        Timing("linear", PREFILL, 512, 0.004, 0.003),
    ]
    lines = describe(choose(timings, LIMITS), timings)
    assert lines == [
        "linear decode (32 rows): native (native 2.000 ms, torch 4.000 ms)",
        "linear prefill (512 rows): torch (native 4.000 ms, torch 3.000 ms)",
    ]


# --- the guard on a real model ------------------------------------------------------------


class _SlowSiluAndMul:
    """The native module with a deliberately slow silu_and_mul, counting its calls."""

    def __init__(self, module):
        self._module = module
        self.calls = 0

    def silu_and_mul(self, gate_up):
        self.calls += 1
        time.sleep(0.005)
        return self._module.silu_and_mul(gate_up)

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_a_deliberately_slow_native_op_loses_to_torch_and_is_not_used(pangu_llm, monkeypatch):
    module = native_kernels()
    if module is None:
        pytest.skip("the native kernels did not build here")
    slow = _SlowSiluAndMul(module)
    monkeypatch.setattr(layers, "native_kernels", lambda: slow)
    choices, timings = guard_kernels(pangu_llm.engine.model, decode_rows=8, prefill_rows=64)
    assert slow.calls > 0, "the guard never timed the native op"
    assert choices["silu_and_mul"] == Choice(8, TORCH, TORCH)
    assert {t.op for t in timings} >= {
        "linear",
        "rms_norm",
        "silu_and_mul",
        "argmax",
        "experts",
        "moe_dispatch",
    }

    calls = slow.calls
    gate_up = torch.randn(4, 2 * 64)
    want = torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:]
    torch.testing.assert_close(layers.silu_and_mul(gate_up), want)
    assert slow.calls == calls, "the slow native op ran after the guard chose torch"


def test_an_engine_guards_its_kernels_at_load_and_logs_each_choice(pangu_tiny, caplog):
    if native_kernels() is None:
        pytest.skip("the native kernels did not build here")
    with caplog.at_level(logging.INFO, logger="expertmesh.engine.llm_engine"):
        engine = LLMEngine.from_checkpoint(pangu_tiny)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernel guard: ")]
    assert logged == [f"kernel guard: {line}" for line in engine.kernel_report]
    assert {line.split()[0] for line in engine.kernel_report} == set(OPS)
    assert engine.kernel_choices == CHOICES.snapshot()


def test_info_names_the_cpu_the_level_and_the_guards_choices_for_a_model(pangu_tiny, capsys):
    from expertmesh.cli import main

    if native_kernels() is None:
        pytest.skip("the native kernels did not build here")
    assert main(["info", "--model", str(pangu_tiny)]) == 0
    out = capsys.readouterr().out
    assert "kernel levels it runs: portable" in out
    assert "native kernels: built for " in out
    chosen = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert {line.split()[0] for line in chosen} == set(OPS)
    assert all(": native (" in line or ": torch (" in line for line in chosen)


def test_info_reports_a_level_the_cpu_lacks_as_an_error(monkeypatch, capsys):
    import expertmesh.kernels as kernels
    from expertmesh.cli import main

    monkeypatch.setenv("EXPERTMESH_CPU_ISA", "amx")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX512)
    monkeypatch.setattr(kernels, "machine", lambda: "x86_64")
    assert main(["info"]) == 2
    assert "EXPERTMESH_CPU_ISA=amx needs AVX512-BF16 and AMX tiles" in capsys.readouterr().err
