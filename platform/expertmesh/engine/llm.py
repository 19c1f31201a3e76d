"""Offline batch API in vLLM's shape: `LLM(path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import RequestOutput

PromptInput = str | list[int] | dict[str, Any]
OFFLINE_BATCHED_TOKENS = 4096


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        *,
        skip_tokenizer_init: bool = False,
        show_progress: bool = True,
        **engine_args: Any,
    ):
        # Offline, a step takes up to 4096 tokens by default, as vLLM's `LLM` does on CPU: a
        # batch of prompts is read in fewer steps (the serving default stays lower, for the
        # running streams' latency).
        engine_args.setdefault(
            "max_num_batched_tokens", max(OFFLINE_BATCHED_TOKENS, engine_args.get("max_num_seqs", 0))
        )
        config = EngineConfig(**engine_args)
        if show_progress:
            with _progress() as bar:
                task = bar.add_task(f"loading {Path(model).name}", total=None)
                self.engine = LLMEngine.from_checkpoint(
                    model,
                    dtype,
                    config,
                    skip_tokenizer_init,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        else:
            self.engine = LLMEngine.from_checkpoint(model, dtype, config, skip_tokenizer_init)

    def get_tokenizer(self):
        return self.engine.detokenizer.tokenizer if self.engine.detokenizer else None

    def _submit(self, prompts, sampling_params) -> list[str]:
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        params = [p or SamplingParams() for p in params]
        prompts = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
        # Check every request before starting any, so a bad one fails the call up front.
        for prompt, p in zip(prompts, params, strict=True):
            self.engine.validate(self.engine.tokenize(prompt)[1], p)
        self.engine.check_queue_room(len(prompts))
        return [self.engine.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run the prompts as one continuously batched workload; outputs in prompt order."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        with _progress() if use_tqdm else _NoProgress() as bar:
            task = bar.add_task("generating", total=len(ids))
            for out in self._drain():
                if out.finished:
                    final[out.request_id] = out
                    bar.advance(task)
        return [final[i] for i in ids]

    def generate_stream(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Same workload as `generate`, yielding each request's new text as it is produced."""
        self._submit(prompts, sampling_params)
        yield from self._drain()

    def _drain(self) -> Iterator[RequestOutput]:
        while self.engine.has_unfinished_requests():
            yield from self.engine.step()


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args):
        pass
