"""Ray Serve deployments: Router (ingress), Engine (one per model revision), ExpertGroup (one per group).

Replicas of an ExpertGroup deployment form that group's pool. Each replica loads
only its group's experts and serves them on a ZeroMQ endpoint; an Engine learns
the endpoints of every replica of every pool by a Serve broadcast, then sends
tensors over ZeroMQ (see expert_transport.py). Serve still starts, restarts and
scales the replicas.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from tokenizers import Tokenizer

from expertmesh.api.chat_template import ChatTemplate
from expertmesh.api.engine_client import ModelInfo
from expertmesh.api.grpc_service import GrpcServicesMixin
from expertmesh.api.openai_app import build_openai_app
from expertmesh.config import RevisionSpec, ServeConfig, default_groups, moge_groups_problem
from expertmesh.engine.async_engine import AsyncLLMEngine, discard_outputs
from expertmesh.engine.kernel_guard import guard_expert_pool
from expertmesh.engine.llm_engine import LLMEngine, context_length
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import ExpertMeshError, ModelNotFoundError
from expertmesh.kernels import native_kernels
from expertmesh.model.experts import ExpertPartition
from expertmesh.model.loader import load_config, load_expert_group
from expertmesh.model.tokenizer_files import load_tokenizer
from expertmesh.serve.expert_transport import ExpertGroupServer
from expertmesh.serve.metrics import EngineMetrics, mark_replica_up
from expertmesh.serve.remote_experts import RemoteExpertBackend
from expertmesh.serve.token_stream import DeltaReceiver, OutputAssembler, StepPublisher
from expertmesh.serve.traffic import choose_revision
from expertmesh.serve_layout import engine_deployment_name, expert_pool, revision_app_name

logger = logging.getLogger("ray.serve")
ENDPOINT_REFRESH_S = 5.0


def partition_for(spec: RevisionSpec) -> ExpertPartition:
    cfg = load_config(spec.source)
    if cfg.moe is None:
        raise ExpertMeshError(f"{spec.source}: a dense model cannot run disaggregated experts")
    problem = moge_groups_problem(cfg.moe.routing, cfg.moe.routing_groups, spec.expert_parallel.groups)
    if problem:
        raise ExpertMeshError(problem)
    groups = spec.expert_parallel.groups or default_groups(cfg.moe.num_experts, cfg.moe.routing_groups)
    return ExpertPartition(cfg.moe.num_experts, groups)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ExpertGroup:
    def __init__(self, revision: dict, group: int, model: str = "unnamed"):
        spec = RevisionSpec.model_validate(revision)
        torch.set_num_threads(spec.expert_threads)
        native_kernels()  # build (or load) them before the replica is ready, not inside a layer's deadline
        partition = partition_for(spec)
        weights = load_expert_group(spec.source, group, partition.num_groups, spec.dtype)
        # no CPU runs a kernel slower than torch's: time the fused experts against it here too
        self.kernel_choices, self.kernel_report = (
            guard_expert_pool(
                weights, load_config(spec.source).moe.num_experts_per_tok, partition.num_groups, spec.engine
            )
            if native_kernels() is not None
            else ({}, [])
        )
        self.server = ExpertGroupServer(weights, host=ray.util.get_node_ip_address())
        # metrics: replicas per pool, and the kernel paths chosen here
        self._up = mark_replica_up(model, spec.name, expert_pool(group), self.kernel_choices)

    def endpoint(self) -> str:
        return self.server.endpoint

    def info(self) -> dict:
        return {
            "endpoint": self.server.endpoint,
            "pid": os.getpid(),
            "requests_served": self.server.requests_served,
            "kernels": self.kernel_report,  # what the load-time guard chose here
        }

    def check_health(self) -> None:
        if not self.server.alive:
            raise RuntimeError(f"expert server at {self.server.endpoint} stopped")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Engine:
    def __init__(
        self, revision: dict, expert_groups: list[DeploymentHandle] | None = None, model: str = "unnamed"
    ):
        spec = RevisionSpec.model_validate(revision)
        torch.set_num_threads(spec.engine_threads)
        self.expert_groups = expert_groups
        self.partition = partition_for(spec) if expert_groups else None
        # built on the engine thread: the one thread here that runs torch's parallel work (see AsyncLLMEngine)
        self.async_engine = AsyncLLMEngine(
            functools.partial(
                LLMEngine.from_checkpoint,
                spec.source,
                spec.dtype,
                spec.engine,
                load_experts=not expert_groups,
            ),
            on_step=self._after_step,
        )
        self.engine = self.async_engine.engine
        self._backend_ready = not expert_groups
        self.publisher = StepPublisher()
        self._ready = asyncio.Lock()
        # metrics: the groups are the pools, or (colocated) the MoGE groups / default top-k split
        groups = self.partition or (partition_for(spec) if self.engine.model.config.moe else None)
        self.metrics = EngineMetrics(model, spec.name, self.engine, groups, disaggregated=bool(expert_groups))

    async def _start(self) -> AsyncLLMEngine:
        # Expert endpoints are known only once the pools' replicas are up: ask them on first use.
        async with self._ready:
            if not self._backend_ready:  # no request has reached the engine yet: safe to swap its backend
                self.backend = RemoteExpertBackend(self.partition, await self._expert_endpoints())
                self.engine.model.set_expert_backend(self.backend)
                self.metrics.watch_expert_backend(self.backend)
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_endpoints())
                self._backend_ready = True
        return self.async_engine

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        self.publisher.flush()  # first: the tokens are waiting
        self.metrics.after_step(outputs)

    async def _expert_endpoints(self) -> dict[int, list[str]]:
        return {
            group: list(await handle.broadcast("endpoint").results_async())
            for group, handle in enumerate(self.expert_groups)
        }

    async def _refresh_endpoints(self) -> None:
        # Serve replaces dead replicas and scales pools; their endpoints change. Poll, cheaply.
        while True:
            await asyncio.sleep(ENDPOINT_REFRESH_S)
            try:
                self.backend.update_endpoints(await self._expert_endpoints())
            except Exception:  # a pool mid-restart: keep the old endpoints, try again later
                logger.warning("could not refresh expert endpoints", exc_info=True)

    async def run_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | dict,
        request_id: str,
        reply_to: str | None = None,
    ) -> RequestOutput:
        """Run one request; its tokens go to the Router's token stream at `reply_to` each step
        (see token_stream.py), or nowhere. Returns the final output. Cancelling the call aborts
        the request."""
        sink = functools.partial(self.publisher.add, reply_to) if reply_to else discard_outputs
        # only the finished output comes out here. metrics: outcome, time to first token, time per output token
        outputs = [out async for out in self.metrics.track(self._generate(prompt, params, request_id, sink))]
        return outputs[-1]

    async def _generate(self, prompt, params, request_id, sink):
        engine = await self._start()
        params = params if isinstance(params, SamplingParams) else SamplingParams(**params)
        async for out in engine.generate(prompt, params, request_id, sink):
            yield out

    def info(self) -> dict:
        return {
            "max_model_len": self.engine.max_model_len,
            "pid": os.getpid(),
            "micro_batched_steps": self.engine.runner.micro_batched_steps,
            "kernels": self.engine.kernel_report,  # what the load-time guard chose here
            "kv_cache": self.engine.cache.describe(),
            "requests": self.engine.occupancy(),
            "prefix_cache": self.engine.prefix_cache_stats(),
        }


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class Router(GrpcServicesMixin):
    """Ingress: model by name, revision by traffic weight (user_config), then Serve's least-loaded replica.

    It is the OpenAI HTTP API's EngineClient, and its methods are callable through a handle.
    """

    def __init__(self):
        # Everything else arrives as user_config (reconfigure): models, revisions, traffic, key.
        self.engines: dict[str, dict[str, DeploymentHandle]] = {}
        self.traffic: dict[str, dict[str, int]] = {}
        self.api_key: str | None = None
        self._asgi = None
        self._infos: dict[str, ModelInfo] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        self._described: dict[str, dict] = {}  # model -> the revision spec its info was read from
        self._receiver: DeltaReceiver | None = None  # the Engines' token streams, bound on first use

    def __serve_build_asgi_app__(self):
        self._asgi = build_openai_app(self, api_key=self.api_key)
        return self._asgi

    def reconfigure(self, user_config: dict) -> None:
        config = ServeConfig.parse(user_config["config"], "the Router's user_config 'config'")
        self.api_key = config.api_key
        if self._asgi is not None:
            self._asgi.state.api_key = config.api_key
        engines = {
            m.name: {
                r.name: serve.get_deployment_handle(
                    engine_deployment_name(m.name, r.name), revision_app_name(m.name, r.name)
                )
                for r in m.revisions
            }
            for m in config.models
        }
        # the first revision of each model describes it to the API (context length, chat template)
        described = {m.name: m.revisions[0].model_dump(mode="json") for m in config.models}
        for model, revision in described.items():
            if self._described.get(model) != revision:
                spec = RevisionSpec.model_validate(revision)
                self._infos[model] = ModelInfo(
                    name=model,
                    max_model_len=context_length(spec.engine, load_config(spec.source)),
                    created=int(time.time()),
                    chat_template=ChatTemplate.from_checkpoint(spec.source),
                )
                self._tokenizers[model] = load_tokenizer(Path(spec.source))
        for gone in set(self._infos) - set(described):
            del self._infos[gone], self._tokenizers[gone]
        self._described = described
        self.engines = engines
        self.traffic = {m: dict(w) for m, w in user_config["traffic"].items()}

    def model_names(self) -> list[str]:
        return sorted(self.engines)

    def model_info(self, name: str) -> ModelInfo:
        if name not in self._infos:
            raise ModelNotFoundError.for_model(name, self.model_names())
        return self._infos[name]

    async def tokenize(self, model: str, text: str) -> list[int]:
        self.model_info(model)
        return self._tokenizers[model].encode(text, add_special_tokens=False).ids

    def revision_for(self, model: str, draw: float | None = None) -> str:
        self.model_info(model)
        return choose_revision(self.traffic[model], random.random() if draw is None else draw)

    async def generate(
        self,
        model: str,
        prompt: str | list[int],
        params: SamplingParams | dict,
        request_id: str | None = None,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        revision = self.revision_for(model)  # raises ModelNotFoundError for an unknown model
        engine = self.engines[model][revision]
        request_id = request_id or uuid.uuid4().hex
        if not stream:  # one call, one answer: no token stream to open
            call = engine.run_request.remote(prompt, params, request_id)
            try:
                final = await call
            except asyncio.CancelledError:
                call.cancel()  # Serve cancels the Engine's task, which aborts the request
                raise
            yield final
            return
        if self._receiver is None:
            self._receiver = DeltaReceiver(ray.util.get_node_ip_address())
        deltas = self._receiver.open(request_id)
        call = engine.run_request.remote(prompt, params, request_id, self._receiver.endpoint)
        result = asyncio.ensure_future(call)  # a DeploymentResponse is awaitable
        assembler = OutputAssembler(request_id)
        next_delta = None
        try:
            while True:
                next_delta = next_delta or asyncio.ensure_future(deltas.get())
                await asyncio.wait((next_delta, result), return_when=asyncio.FIRST_COMPLETED)
                if next_delta.done():
                    out = assembler.add(next_delta.result())
                    next_delta = None
                    yield out
                    if out.finished:
                        await result  # the call is ending too; cancelling it would cost the Engine more
                        return
                else:  # the call ended first: raise its error, or end with its final output
                    final = result.result()
                    while not deltas.empty():
                        yield assembler.add(deltas.get_nowait())
                    yield assembler.finish(final)
                    return
        finally:
            self._receiver.close(request_id)
            if next_delta is not None:
                next_delta.cancel()
            if not result.done():
                call.cancel()  # Serve cancels the Engine's task, which aborts the request
                result.cancel()

    async def engine_info(self, model: str, revision: str) -> dict:
        return await self.engines[model][revision].info.remote()
