"""Engine -> Router token path: one ZeroMQ message per engine step per Router.

Streaming every token of every request as its own item of a Ray Serve streaming call
costs the Engine replica milliseconds of CPU (and GIL) per token, next to the model
on the same cores; with 16 requests that is 16 items a step. Instead the Router
makes one unary call per request (Serve still picks the least-loaded Engine replica,
counts it as ongoing and cancels it when the client leaves), and the Engine sends
the tokens of all the requests a Router has on it, one message per step, to a
ZeroMQ PULL socket the Router binds. The call's return value is the final output,
so a message lost on the way (a full queue) never loses the end of a request: the
Router fills any gap from it.

- `StepPublisher` (Engine side, on the engine thread): collects each step's deltas
  per Router endpoint, sends them when the step is done.
- `DeltaReceiver` (Router side, on its event loop): receives and hands each delta to
  its request's queue.
- `OutputAssembler` (Router side): turns a request's deltas back into the
  cumulative `RequestOutput`s the APIs consume.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from expertmesh.engine.sequence import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

SEND_HIGH_WATER_MARK = (
    10_000  # messages queued per Router before sends are dropped (the final output covers them)
)
IDLE_SOCKET_S = 600.0  # a Router endpoint unused this long (a Router replica gone) has its socket closed


@dataclass(slots=True)
class Delta:
    """What one engine step added to one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # on the last delta only
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # on the last delta only, with the prompt

    @classmethod
    def of(cls, out: RequestOutput) -> Delta:
        c = out.outputs[0]
        return cls(
            out.request_id,
            c.delta_token_ids,
            c.delta_text,
            out.finished,
            c.finish_reason,
            c.stop_reason,
            out.error,
            out.prompt_token_ids if out.finished else [],
            out.arrival_time,
            out.first_token_time,
            out.finished_time,
            out.num_cached_tokens if out.finished else 0,
        )


class StepPublisher:
    """Engine side. `add` and `flush` run on the engine thread only (ZeroMQ sockets are not thread-safe)."""

    def __init__(self):
        self._context = zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}
        self._last_used: dict[str, float] = {}
        self._pending: dict[str, list[Delta]] = {}

    def add(self, endpoint: str, out: RequestOutput) -> None:
        self._pending.setdefault(endpoint, []).append(Delta.of(out))

    def flush(self) -> None:
        now = time.monotonic()
        pending, self._pending = self._pending, {}
        for endpoint, deltas in pending.items():
            try:
                self._socket(endpoint).send(pickle.dumps(deltas, protocol=5), flags=zmq.NOBLOCK)
            except zmq.Again:  # the Router is not reading: it gets the final output from the call's result
                logger.warning(
                    "token stream to %s is full; dropped a step of %d deltas", endpoint, len(deltas)
                )
            self._last_used[endpoint] = now
        for endpoint in [e for e, t in self._last_used.items() if now - t > IDLE_SOCKET_S]:
            self._sockets.pop(endpoint).close(linger=0)
            del self._last_used[endpoint]

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()


class DeltaReceiver:
    """Router side: a PULL socket on `host`, read by a task on the running event loop."""

    def __init__(self, host: str):
        self._context = zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://{host}:{self._socket.bind_to_random_port(f'tcp://{host}')}"
        self._queues: dict[str, asyncio.Queue[Delta]] = {}
        self._task = asyncio.get_running_loop().create_task(self._read())

    def open(self, request_id: str) -> asyncio.Queue[Delta]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self) -> None:
        while True:
            try:
                deltas: list[Delta] = pickle.loads(await self._socket.recv())
            except Exception:  # one bad message must not stop every stream (cancellation still ends it)
                logger.exception("could not read a token-stream message")
                continue
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if (
                    queue is not None
                ):  # else: the request is over here (finished from its result, or cancelled)
                    queue.put_nowait(delta)

    def shutdown(self) -> None:
        self._task.cancel()
        self._socket.close(linger=0)


@dataclass
class OutputAssembler:
    """Rebuilds one request's cumulative RequestOutputs from its deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    def add(self, delta: Delta) -> RequestOutput:
        self.token_ids += delta.token_ids
        self.text += delta.text
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
            delta_text=delta.text,
            delta_token_ids=delta.token_ids,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=None,
            prompt_token_ids=delta.prompt_token_ids,  # on the last output only: the APIs count them at the end
            outputs=[completion],
            finished=delta.finished,
            arrival_time=delta.arrival_time,
            first_token_time=delta.first_token_time,
            finished_time=delta.finished_time,
            error=delta.error,
            num_cached_tokens=delta.num_cached_tokens,
        )

    def finish(self, final: RequestOutput) -> RequestOutput:
        """The last output, from the call's result: whatever deltas did not arrive become its delta."""
        c = final.outputs[0]
        missing = Delta.of(final)
        missing.token_ids = c.token_ids[len(self.token_ids) :]
        missing.text = c.text[len(self.text) :]
        return self.add(missing)
