"""Streaming entry point for servers: the engine steps on its own thread, callers await tokens."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import (
    BackendUnavailableError,
    EngineDeadError,
    InvalidRequestError,
)

logger = logging.getLogger(__name__)

# Called on the engine thread with each of a request's outputs; must be quick and must not raise.
OutputSink = Callable[[RequestOutput], None]


def discard_outputs(output: RequestOutput) -> None:
    """The sink of a caller that wants only the finished output (it is still yielded)."""


_ABORTED = object()  # put on a stream's queue by abort(): the stream ends


class AsyncLLMEngine:
    """Steps an LLMEngine on its own thread; callers await their requests' outputs.

    Pass `engine` as a function that builds it (`lambda: LLMEngine.from_checkpoint(...)`)
    to build it on the engine thread, so that thread is the only one in the process that
    ever ran torch's parallel work. Each thread that does gets its own OpenMP team; libgomp
    counts all of them as busy, and with more teams' threads than cores it stops spinning
    between parallel regions, so each of the hundreds of regions in a step pays a wake-up:
    measured here, decode steps 20-30 % slower when the model was loaded on another thread.
    """

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        on_step: Callable[[list[RequestOutput]], None] | None = None,
    ):
        # Called on the engine thread after each step's outputs are handed out (metrics); keep it cheap.
        self._on_step = on_step
        # request id -> (caller's loop, its queue, its sink or None)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, OutputSink | None]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        built = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(engine, built), name="expertmesh-engine", daemon=True
        )
        self._thread.start()
        built.wait()
        if self._error is not None:
            raise self._error

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
        except BaseException as exc:  # a load error is the constructor's to raise
            self._error = exc
            return
        finally:
            built.set()
        self._loop()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        sink: OutputSink | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each time the request gains text, the last one `finished`.

        With a `sink`, every output goes to it instead, on the engine thread (no event-loop
        hop per token), and only the finished one is also yielded.

        Leaving the iteration early (client gone, task cancelled) aborts the request and
        frees its cache.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine loop failed: {self._error!r}")
        if self._stopping:
            raise EngineDeadError("the engine is shut down")
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request_id or self.engine.new_request_id()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (asyncio.get_running_loop(), queue, sink)
        try:
            self.engine.add_request(prompt, params, request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is _ABORTED:
                    finished = True  # already aborted: nothing left to free
                    break
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine loop failed: {item!r}") from item
                finished = item.finished
                if item.error is not None:
                    raise BackendUnavailableError(item.error)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)

    def abort(self, request_id: str) -> bool:
        aborted = self.engine.abort_request(request_id)
        self._send(request_id, _ABORTED)
        return aborted

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        dead = EngineDeadError("the engine is shut down")
        for request_id in list(self._streams):
            self._send(request_id, dead)

    def _send(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue, _ = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # report to every waiting caller, never hang them
                self._error = exc
                for request_id in list(self._streams):
                    self._send(request_id, exc)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                sink = stream[2] if stream is not None else None
                if sink is not None:
                    sink(out)
                if sink is None or out.finished:
                    self._send(out.request_id, out)
            if self._on_step is not None:
                try:
                    self._on_step(outputs)
                except Exception:  # an observer must never stop the engine
                    logger.exception("on_step callback failed")
