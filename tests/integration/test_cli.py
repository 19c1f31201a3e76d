"""The `expertmesh` commands the README and docs/serving.md document, run as a user runs them.

Each test starts the installed console script (`.venv/bin/expertmesh`) as a real subprocess with no
TTY and no stdin, as CI does, and reads only its stdout as data. One `expertmesh serve` runs for the
whole module (starting Ray and Serve is the slow part); the stock `openai` client and
`expertmesh generate --url` talk to it over real HTTP. Every text the commands generate greedily
is compared with the offline engine's (`greedy_reference` in conftest.py).

`expertmesh serve` starts a Ray of its own (`address="local"`); the test also gives it its own
RAY_TMPDIR, so its session is the only one there and is removed after. Its processes share one
session (start_new_session), which is how the tests find anything of it left running, and how
teardown kills a server that hung.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from polling import wait_until

from expertmesh.demo import SAMPLE_PROMPTS
from expertmesh.kernels import isa_level, native_kernels

SERVED_NAME = "pangu-cli"
API_KEY = "cli-test-key-0123"  # the server refuses keys shorter than 8 characters
PROMPT = "def main():"
MAX_TOKENS = 8
SERVE_READY_TIMEOUT_S = 180  # about 15 s on an idle 2-core machine; Ray's start varies a lot under load
SERVE_STOP_TIMEOUT_S = 60  # about 10 s: Serve's graceful shutdown, then Ray's
COMMAND_TIMEOUT_S = 120  # one offline command: load the tiny checkpoint, a few ms of tokens
READY_LINE = "Ctrl-C stops it."  # the last line `serve` prints, once every deployment is up


def expertmesh_script() -> str:
    """The console script pip installed next to this interpreter: what the README runs."""
    path = shutil.which("expertmesh", path=sysconfig.get_path("scripts"))
    if path is None:
        pytest.fail(f"no `expertmesh` script in {sysconfig.get_path('scripts')}: `pip install -e .` makes it")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without what would point a command at another server, key or Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EXPERTMESH_API_KEY")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [expertmesh_script(), *args],
        stdin=subprocess.DEVNULL,  # CI has no stdin and no TTY
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=COMMAND_TIMEOUT_S,
    )


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def failure_report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{tail(result.stdout)}\nstderr:\n{tail(result.stderr)}"


def live_session_members(session_id: int) -> list[int]:
    """Pids of the processes in a session, zombies left out (they hold nothing but a pid)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == session_id and state != "Z":
            members.append(int(entry.name))
    return members


@dataclass
class ServeProcess:
    """`expertmesh serve` running in its own session, its output going to files."""

    proc: subprocess.Popen
    port: int
    ray_tmpdir: Path
    stdout_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        return f"stdout:\n{tail(self.stdout())}\nstderr:\n{tail(self.stderr())}"

    def health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(
                f"expertmesh serve exited with {self.proc.returncode} before it was ready\n{self.logs()}"
            )
        return READY_LINE in self.stdout() and self.health_ok()

    def kill_everything_left(self) -> None:
        """SIGKILL whatever of the server's session still runs (Ray's workers have their own groups)."""
        for pid in live_session_members(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(pangu_tiny, free_port, tmp_path_factory):
    logs = tmp_path_factory.mktemp("expertmesh-serve")
    # Short, under /tmp: Ray puts Unix sockets in <RAY_TMPDIR>/ray/session_<date>_<pid>/sockets/,
    # and a socket path longer than 107 bytes cannot be bound.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="em-cli-", dir="/tmp"))
    port, metrics_port = free_port(), free_port()
    with (logs / "stdout.log").open("w") as out, (logs / "stderr.log").open("w") as err:
        proc = subprocess.Popen(
            [
                expertmesh_script(),
                "serve",
                "--model",
                str(pangu_tiny),
                "--name",
                SERVED_NAME,
                "--api-key",
                API_KEY,
                "--http-port",
                str(port),
                # free ports, not 9000 and 8080: nothing else on this machine is disturbed
                "--grpc-port",
                str(free_port()),
                "--metrics-port",
                str(metrics_port),
                "--host",
                "127.0.0.1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=cli_env(RAY_TMPDIR=str(ray_tmpdir)),
            start_new_session=True,
        )
    served = ServeProcess(proc, port, ray_tmpdir, logs / "stdout.log", logs / "stderr.log")
    try:
        wait_until(served.ready, f"expertmesh serve on port {port} ready", SERVE_READY_TIMEOUT_S)
        yield served
    finally:
        if proc.poll() is None:  # a test failed before the stop test: stop it as an operator would
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=SERVE_STOP_TIMEOUT_S)
        served.kill_everything_left()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture
def running_server(server) -> ServeProcess:
    assert server.proc.poll() is None, (
        "the module's server has stopped: test_ctrl_c_stops_serve_and_the_ray_it_started must run last\n"
        + server.logs()
    )
    return server


@pytest.fixture(scope="module")
def greedy_text(greedy_reference, pangu_llm) -> str:
    """The offline engine's greedy text for PROMPT, checked to stop at MAX_TOKENS and not at EOS:
    `expertmesh generate` sends no ignore_eos, so only then must it give the same text."""
    reference = greedy_reference(PROMPT, MAX_TOKENS)
    eos_positions = [i for i, t in enumerate(reference.token_ids) if t in pangu_llm.engine.eos_token_ids]
    assert not eos_positions, f"pick another PROMPT: its greedy tokens hit EOS at {eos_positions}"
    assert reference.text.strip(), "an empty reference text would match anything"
    return reference.text


def test_serve_starts_its_own_ray_and_prints_how_to_call_it(running_server):
    stdout = running_server.stdout()
    assert f"expertmesh is serving {SERVED_NAME}" in stdout, running_server.logs()
    assert f"OpenAI HTTP   {running_server.url}/v1" in stdout, running_server.logs()
    assert re.search(r"metrics +http://127\.0\.0\.1:\d+/metrics", stdout) and ":8080/" not in stdout
    # with a key set, the curl examples send it
    assert 'Authorization: Bearer $EXPERTMESH_API_KEY"' in stdout, running_server.logs()
    # a new local Ray under this server's RAY_TMPDIR, not a connection to a running cluster
    assert "Started a local Ray instance" in running_server.stderr(), running_server.logs()
    sessions = list((running_server.ray_tmpdir / "ray").glob("session_2*"))
    assert len(sessions) == 1, f"Ray sessions under {running_server.ray_tmpdir}: {sessions}"


def test_openai_client_without_the_key_is_refused_naming_the_header(running_server):
    client = openai.OpenAI(base_url=f"{running_server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match=r"Authorization: Bearer <key>") as refused:
        client.models.list()
    assert refused.value.status_code == 401


def test_openai_client_with_the_key_lists_the_model_and_completes_greedily(running_server, greedy_text):
    client = openai.OpenAI(
        base_url=f"{running_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=COMMAND_TIMEOUT_S
    )
    assert [model.id for model in client.models.list().data] == [SERVED_NAME]
    reply = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == greedy_text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_TOKENS


def test_generate_url_streams_the_greedy_text_with_the_key_from_the_environment(running_server, greedy_text):
    args = ("generate", "--url", running_server.url, "--model", SERVED_NAME)
    args += ("--max-tokens", str(MAX_TOKENS), "--temperature", "0", PROMPT)
    result = run_cli(*args, env=cli_env(EXPERTMESH_API_KEY=API_KEY))
    assert result.returncode == 0, failure_report(result)
    assert result.stdout == f"{greedy_text}\n[finish_reason=length]\n", failure_report(result)


def test_generate_url_without_a_key_exits_2_with_the_servers_401(running_server):
    result = run_cli(
        "generate", "--url", running_server.url, "--model", SERVED_NAME, "--max-tokens", "2", PROMPT
    )
    assert result.returncode == 2, failure_report(result)
    assert "HTTP 401" in result.stderr and "Authorization: Bearer <key>" in result.stderr, failure_report(
        result
    )
    assert result.stdout == "", failure_report(result)


def test_generate_offline_prints_the_greedy_text_then_a_summary(pangu_tiny, greedy_text):
    result = run_cli(
        "generate", "--model", str(pangu_tiny), "--max-tokens", str(MAX_TOKENS), "--temperature", "0", PROMPT
    )
    assert result.returncode == 0, failure_report(result)
    # stdout is the text alone (no progress bar in it), so a script can read it
    assert result.stdout == f"{greedy_text}\n[finish_reason=length, tokens={MAX_TOKENS}]\n", failure_report(
        result
    )


def test_demo_streams_every_sample_prompt_and_reports_throughput(pangu_tiny):
    result = run_cli("demo", "--model", str(pangu_tiny), "--max-tokens", str(MAX_TOKENS))
    assert result.returncode == 0, failure_report(result)
    assert "building" not in result.stdout, "the demo rebuilt a checkpoint it was given"
    # rich fits the table to 80 columns without a TTY and wraps long prompts inside their cells
    for prompt in SAMPLE_PROMPTS:
        if len(repr(prompt)) <= 29:
            assert repr(prompt) in result.stdout, failure_report(result)
    # the demo samples with ignore_eos, so every request makes exactly MAX_TOKENS tokens; rich may
    # wrap the summary line, so it is matched with the whitespace collapsed
    summary = re.search(
        r"(\d+) tokens for (\d+) requests in [\d.]+ s: ([\d.]+) output tokens/s \(continuous batching, auto\)",
        " ".join(result.stdout.split()),
    )
    assert summary, failure_report(result)
    tokens, requests, rate = int(summary[1]), int(summary[2]), float(summary[3])
    assert (tokens, requests) == (len(SAMPLE_PROMPTS) * MAX_TOKENS, len(SAMPLE_PROMPTS))
    assert rate > 0


def test_info_reports_the_kernels_and_the_kv_cache_layout(pangu_tiny, pangu_llm):
    result = run_cli("info", "--model", str(pangu_tiny))
    assert result.returncode == 0, failure_report(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "kernel levels it runs: " in lines[0], failure_report(result)
    cache = pangu_llm.engine.cache.describe()  # the same checkpoint, loaded in this process
    assert f"KV cache: {cache['layout']} per layer, {cache['bytes_per_token']} bytes a token, " in (
        result.stdout
    ), failure_report(result)
    report_at = next(
        i for i, line in enumerate(lines) if line.startswith("kernels the load-time guard chose")
    )
    report = lines[report_at + 1 :]
    if native_kernels() is None:  # the child sees the same environment, so the same kernels
        assert report == ["  (none measured: torch's kernels only)"], failure_report(result)
        return
    assert f"native kernels: built for {isa_level()}" in result.stdout, failure_report(result)
    choice = re.compile(
        r"  \w+ (decode|prefill) \(\d+ rows\): (native|torch) \(native [\d.]+ ms, torch [\d.]+ ms\)"
    )
    assert report and all(choice.fullmatch(line) for line in report), failure_report(result)


def test_ctrl_c_stops_serve_and_the_ray_it_started(running_server):
    """Runs last: it stops the module's server. Ctrl-C signals the terminal's whole foreground
    process group, so the group is signalled, Ray's own processes (gcs, raylet) included."""
    stopping_at = time.monotonic()
    os.killpg(running_server.proc.pid, signal.SIGINT)
    try:
        code = running_server.proc.wait(timeout=SERVE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"expertmesh serve still ran {SERVE_STOP_TIMEOUT_S} s after Ctrl-C\n{running_server.logs()}"
        )
    stopped_in = time.monotonic() - stopping_at
    assert code == 0, f"exit {code} after Ctrl-C ({stopped_in:.1f} s)\n{running_server.logs()}"
    assert "shutting down" in running_server.stdout(), running_server.logs()
    # Ray's workers are not the CLI's children, so they may outlive it by a moment; none may stay
    wait_until(
        lambda: not live_session_members(running_server.proc.pid),
        lambda: f"the server's Ray gone (still running: {live_session_members(running_server.proc.pid)})",
        timeout_s=30,
    )
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", running_server.port), 5),
    ):
        pass


@pytest.mark.parametrize("source", ["--model", "--config"])
def test_a_short_api_key_is_refused_naming_the_field(source, pangu_tiny, tmp_path, capsys):
    from expertmesh import cli

    config = tmp_path / "serve.yaml"
    config.write_text(f"models:\n  - name: tiny\n    revisions:\n      - source: {pangu_tiny}\n")
    path = pangu_tiny if source == "--model" else config
    assert cli.main(["serve", source, str(path), "--api-key", "short"]) == 2
    assert capsys.readouterr().err.strip() == "error: api_key: String should have at least 8 characters"
