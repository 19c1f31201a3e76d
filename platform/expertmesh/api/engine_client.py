"""What the HTTP layer needs from whatever runs the models, and the in-process implementation.

``EngineClient`` is the seam between the OpenAI API and the engines. ``LocalEngineClient`` wraps
``AsyncLLMEngine``s in this process (``expertmesh serve`` without Ray, tests); the Ray Serve router
implements the same protocol by forwarding to Engine replicas.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.api.chat_template import ChatTemplate
from expertmesh.engine.async_engine import AsyncLLMEngine, discard_outputs
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import ModelNotFoundError


class ModelInfo(BaseModel):
    """What the API layer shows and needs about one served model."""

    model_config = ConfigDict(frozen=True)

    name: str
    max_model_len: int = Field(ge=2)
    created: int = Field(description="Unix time the model was loaded, as OpenAI's `created`")
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate)
    owned_by: str = "expertmesh"


@runtime_checkable
class EngineClient(Protocol):
    def model_names(self) -> list[str]:
        """Names of the served models, in a stable order."""
        ...

    def model_info(self, name: str) -> ModelInfo:
        """Raises ModelNotFoundError for a name not in ``model_names()``."""
        ...

    def generate(
        self,
        model: str,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (each carries its delta), the last one ``finished``.

        With ``stream=False`` only the finished output comes, so the implementation can skip
        the per-token path.

        Refusals (ModelNotFoundError, InvalidRequestError, QueueFullError) may be raised by this call
        or by the first ``__anext__``. Closing the iterator early with ``aclose()``, or cancelling the
        task that iterates it, must abort the request and free its KV cache.
        """
        ...

    async def tokenize(self, model: str, text: str) -> list[int]:
        """Token ids of a rendered chat prompt: the text exactly, no special tokens added (the
        template writes its own), as transformers' apply_chat_template and vLLM's chat endpoint
        encode it."""
        ...


@dataclass
class _Served:
    engine: AsyncLLMEngine
    info: ModelInfo


class LocalEngineClient:
    """One in-process ``AsyncLLMEngine`` per model name."""

    def __init__(self) -> None:
        self._models: dict[str, _Served] = {}

    def add(
        self,
        name: str,
        engine: AsyncLLMEngine,
        checkpoint: str | Path | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> LocalEngineClient:
        """Serve ``engine`` as ``name``; the chat template comes from ``checkpoint`` unless given."""
        if name in self._models:
            raise ValueError(f"a model named {name!r} is already served")
        if chat_template is None:
            chat_template = ChatTemplate.from_checkpoint(checkpoint) if checkpoint else ChatTemplate()
        info = ModelInfo(
            name=name,
            max_model_len=engine.engine.max_model_len,
            created=int(time.time()),
            chat_template=chat_template,
        )
        self._models[name] = _Served(engine, info)
        return self

    @classmethod
    def from_checkpoints(
        cls, checkpoints: dict[str, str | Path], dtype: str = "auto", **engine_config: Any
    ) -> LocalEngineClient:
        """Load each checkpoint into its own engine: ``{"name": path}``."""
        client = cls()
        config = EngineConfig(**engine_config)
        for name, path in checkpoints.items():
            engine = AsyncLLMEngine(functools.partial(LLMEngine.from_checkpoint, path, dtype, config))
            client.add(name, engine, checkpoint=path)
        return client

    def engine(self, name: str) -> AsyncLLMEngine:
        served = self._models.get(name)
        if served is None:
            raise ModelNotFoundError.for_model(name, self.model_names())
        return served.engine

    def model_names(self) -> list[str]:
        return list(self._models)

    def model_info(self, name: str) -> ModelInfo:
        self.engine(name)  # raises for an unknown name
        return self._models[name].info

    def generate(
        self,
        model: str,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        # Not itself a generator, so an unknown model fails at the call, before any iteration.
        return self.engine(model).generate(
            prompt, params, request_id, sink=None if stream else discard_outputs
        )

    async def tokenize(self, model: str, text: str) -> list[int]:
        return self.engine(model).engine.tokenize(text, add_special_tokens=False)[1]

    def shutdown(self) -> None:
        for served in self._models.values():
            served.engine.shutdown()
