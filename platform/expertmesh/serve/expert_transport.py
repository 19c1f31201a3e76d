"""Low-latency tensor path between an Engine and its expert-group replica pools.

A Ray DeploymentHandle round trip costs milliseconds; a MoE layer cannot pay that
per step. So each ExpertGroup replica also runs an `ExpertGroupServer`: a ZeroMQ
ROUTER socket on which requests are three frames (a JSON header, the token rows'
raw bytes, their routing weights' raw bytes) and replies two (header, output
rows). ZeroMQ does the framing and the queueing; tensors go out without a copy.
Serve still owns the replicas' lifecycle: it starts the server and publishes its
endpoint.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass

import torch
import zmq

from expertmesh.engine.malloc_retention import retain_freed_memory
from expertmesh.model.experts import ExpertBatch, ExpertWeights, apply_experts, pack_expert_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Received frames are read-only; the expert kernels only read their inputs.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def tensor_frame(t: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous tensor, without a copy (bf16 travels as its 16-bit pattern)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def frame_tensor(frame: zmq.Frame | bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    buffer = frame.buffer if isinstance(frame, zmq.Frame) else frame
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


@dataclass(frozen=True)
class ExpertRequestHeader:
    request_id: int
    layer: int
    counts: list[int]
    hidden_size: int
    dtype: str

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ExpertRequestHeader:
        return cls(**json.loads(raw))


class ExpertGroupServer:
    """Serves one expert group's weights (every MoE layer) on a ZeroMQ endpoint, from a thread."""

    def __init__(self, weights: dict[int, ExpertWeights], host: str = "127.0.0.1", port: int = 0):
        self.weights = weights
        pack_expert_weights(weights.values())
        retain_freed_memory()  # each request's rows reuse freed memory, no fresh page faults
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if port:
            self._socket.bind(f"tcp://{host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self.requests_served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"expert-server-{port}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(timeout=100):
                continue
            identity, raw_header, hidden, weights = self._socket.recv_multipart(copy=False)
            header = ExpertRequestHeader.decode(raw_header.bytes)
            try:
                out = self.handle(header, hidden, weights)
                reply = [
                    identity,
                    json.dumps({"request_id": header.request_id, "ok": True}).encode(),
                    tensor_frame(out),
                ]
            except Exception as exc:  # the client resends elsewhere; never let the loop die
                error = {
                    "request_id": header.request_id,
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                reply = [identity, json.dumps(error).encode(), b""]
            self.requests_served += 1  # before the reply: a client that has it may read the count
            self._socket.send_multipart(reply, copy=False)
        self._socket.close(linger=0)

    def handle(self, header: ExpertRequestHeader, hidden: zmq.Frame, weights: zmq.Frame) -> torch.Tensor:
        dtype = _DTYPES[header.dtype]
        rows = sum(header.counts)
        batch = ExpertBatch(
            frame_tensor(hidden, dtype, (rows, header.hidden_size)),
            frame_tensor(weights, dtype, (rows,)),
            header.counts,
        )
        if header.layer not in self.weights:
            raise KeyError(f"layer {header.layer} is not a MoE layer of this expert group")
        return apply_experts(self.weights[header.layer], batch)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop serving; in-flight requests get no reply (clients time out and fail over)."""
        self._stop.set()
        self._thread.join(timeout=5)
