"""Shared fixtures for the test suite: tiny checkpoints and engines, made once per session.

Importing this module sets torch to ONE intra-op thread. The build machines have 2 cores, but
the tiny models' ops are far too small to split: with 2 threads, and other processes on the box,
OpenMP workers spin against each other and a 10-token batch took 0.2-7.6 s instead of ~0.02 s.

Checkpoints (random weights, real Hugging Face layout, fixed seed, ~1 s each):

- ``tiny_checkpoint(arch, seed=0) -> Path``: factory; one directory per (arch, seed), cached for
  the session. ``arch`` is one of ``expertmesh.model.checkpoint_maker.ARCHITECTURES``.
- ``pangu_tiny``, ``qwen2_moe_tiny``, ``qwen3_moe_tiny``, ``mixtral_tiny``, ``llama_tiny``: the seed-0
  checkpoint of that architecture.

Engines (all on ``pangu_tiny``; the model and tokenizer are loaded once and shared):

- ``pangu_llm``: ``LLM(pangu_tiny, show_progress=False, max_num_seqs=16, max_num_batched_tokens=512)``.
  Shared by many tests: leave it idle (every request finished or aborted) when a test ends.
- ``make_engine(eos_token_ids=None, **engine_config) -> LLMEngine``: a fresh engine (own scheduler,
  KV cache and request table) around the shared pangu model, for tests that need their own limits
  (``max_num_batched_tokens``, ``kv_cache_memory_bytes``, ``max_model_len``, ...) or their own EOS ids.
  Building one costs milliseconds, so make as many as needed.
- ``greedy_reference(prompt, max_tokens) -> CompletionOutput``: what the prompt produces when it runs
  alone, greedily (``temperature=0, ignore_eos=True``), on an engine with default limits (so its
  prompt is prefilled in one step). Memoized. Compare batched or chunked runs against it.

Servers:

- ``free_port() -> int``: an unused TCP port on 127.0.0.1.
- ``start_prometheus(config: dict) -> PrometheusProcess``: Debian's ``prometheus`` on 127.0.0.1 with
  ``config`` (a prometheus.yml as a dict), returned once ready; ``.url``, ``.stop()`` (idempotent).
  Skips with one line when the binary is missing (fails under CI). Any left running stop at session end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm import LLM
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import CompletionOutput
from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import CHOICES
from expertmesh.model.checkpoint_maker import make_checkpoint

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def native_kernels_unguarded():
    """Each test starts with every native op on (the load-time guard's choices are per process:
    an engine a test loads must not move a later test's ops onto torch)."""
    CHOICES.clear()
    yield
    CHOICES.clear()


@pytest.fixture(scope="session", autouse=True)
def built_native_kernels():
    """Compile the native kernels once up front (about 40 s on a fresh machine), so no
    Ray replica pays for it inside a test's deadline; later loads come from the cache."""
    return native_kernels()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in made:
            made[key] = make_checkpoint(arch, "tiny", root / f"{arch}-tiny-{seed}", seed=seed, progress=False)
        return made[key]

    return get


@pytest.fixture(scope="session")
def pangu_tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("pangu_pro_moe")


@pytest.fixture(scope="session")
def qwen2_moe_tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2_moe")


@pytest.fixture(scope="session")
def qwen3_moe_tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3_moe")


@pytest.fixture(scope="session")
def mixtral_tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="session")
def llama_tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def pangu_llm(pangu_tiny) -> LLM:
    return LLM(pangu_tiny, show_progress=False, max_num_seqs=16, max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def make_engine(pangu_llm) -> Callable[..., LLMEngine]:
    shared = pangu_llm.engine

    def make(eos_token_ids: set[int] | None = None, **engine_config) -> LLMEngine:
        eos = set(shared.eos_token_ids) if eos_token_ids is None else set(eos_token_ids)
        return LLMEngine(shared.model, pangu_llm.get_tokenizer(), eos, EngineConfig(**engine_config))

    return make


@pytest.fixture(scope="session")
def greedy_reference(make_engine) -> Callable[[str | list[int], int], CompletionOutput]:
    engine = make_engine()
    cache: dict[tuple, CompletionOutput] = {}

    def run(prompt: str | list[int], max_tokens: int) -> CompletionOutput:
        key = (prompt if isinstance(prompt, str) else tuple(prompt), max_tokens)
        if key not in cache:
            assert not engine.has_unfinished_requests()
            engine.add_request(prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens))
            final = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        final = out
            assert final is not None and len(final.outputs[0].token_ids) == max_tokens
            cache[key] = final.outputs[0]
        return cache[key]

    return run


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port() -> int``: an unused TCP port on 127.0.0.1, for servers the tests start."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


def require_binary(name: str) -> str:
    """The path of an executable the test needs; skip (fail under CI) with one line when missing."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed: `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus; `make test` does it as root)")
    return path


class PrometheusProcess:
    """A Prometheus server this test session started on 127.0.0.1."""

    def __init__(self, binary: str, config: dict, workdir: Path, port: int, ready_timeout_s: float = 30):
        self.workdir, self.url = workdir, f"http://127.0.0.1:{port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (workdir / "prometheus.log").open("w")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self._proc.poll() is not None:
                self.stop()
                pytest.fail(f"prometheus exited with {self._proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"prometheus was not ready within {ready_timeout_s:.0f} s: {self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_prometheus(tmp_path_factory, free_port) -> Callable[[dict], PrometheusProcess]:
    started: list[PrometheusProcess] = []

    def start(config: dict) -> PrometheusProcess:
        binary = require_binary("prometheus")
        proc = PrometheusProcess(binary, config, tmp_path_factory.mktemp("prometheus"), free_port())
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
