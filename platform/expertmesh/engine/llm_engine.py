"""The engine loop: admit requests, run a step, sample, detokenize, report."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.detokenizer import Detokenizer, find_stop, stop_holdback
from expertmesh.engine.kernel_guard import MAX_PREFILL_ROWS, guard_kernels
from expertmesh.engine.kv_cache import BlockAllocator, KVCache
from expertmesh.engine.malloc_retention import retain_freed_memory
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.prefix_cache import PrefixCache, root_hash
from expertmesh.engine.sampler import greedy_tokens, sample
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scheduler import Scheduler, StepPlan
from expertmesh.engine.sequence import CompletionOutput, RequestOutput, Sequence
from expertmesh.engine.speculative import accept_greedy, accept_sampled, propose_ngram
from expertmesh.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    QueueFullError,
)
from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import Choice, describe
from expertmesh.model.config import ModelConfig
from expertmesh.model.loader import load_config, load_model, resolve_dtype
from expertmesh.model.tokenizer_files import load_tokenizer, stop_token_ids
from expertmesh.model.transformer import CausalLM

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What the latest step did: for metrics and benchmarks."""

    decode_seqs: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    decode_context_tokens: int = 0  # cached positions the decoding sequences attended over, summed


def context_length(config: EngineConfig, model: ModelConfig) -> int:
    """The engine's max_model_len: its own limit when set, never beyond the model's positions."""
    return min(config.max_model_len or model.max_position_embeddings, model.max_position_embeddings)


def warm_up_lengths(config: EngineConfig, max_model_len: int, cache_tokens: int) -> list[int]:
    """Prompt lengths of the warm-up step (pure): the token budget spread over the most
    sequences a step takes, as vLLM's profile run spreads it; each prompt leaves room for
    one new token in the context and in the whole KV cache."""
    seqs = min(config.max_num_seqs, config.max_queued_requests)
    per, extra = divmod(config.max_num_batched_tokens, seqs)
    longest = min(max_model_len, cache_tokens) - 1
    return [n for i in range(seqs) if (n := min(per + (i < extra), longest)) > 0]


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        eos_token_ids: set[int],
        config: EngineConfig | None = None,
    ):
        self.config = config or EngineConfig()
        self.model = model
        retain_freed_memory()  # steps reuse freed activations instead of faulting in fresh pages
        cfg = model.config
        self.max_model_len = context_length(self.config, cfg)
        dtype = model.embed_tokens.weight.dtype
        num_blocks = KVCache.blocks_in_budget(
            cfg,
            dtype,
            self.config.kv_cache_memory_bytes,
            self.config.block_size,
            self.config.max_num_seqs * self.max_model_len,
        )
        self.cache = KVCache(cfg, num_blocks, self.config.block_size, dtype)
        caching = self.config.enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks, PrefixCache() if caching else None)
        # one engine, one model revision: what else shapes a block's K/V is the cache's dtype
        root = root_hash(f"kv-cache-dtype={dtype}") if caching else None
        self.scheduler = Scheduler(self.config, self.allocator, self.max_model_len, root)
        self.runner = ModelRunner(
            model, self.cache, self.config.micro_batches, self.config.micro_batch_min_tokens
        )
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_token_ids = eos_token_ids
        self._requests: dict[str, Sequence] = {}  # every unfinished request, by id
        self.aborted_requests = 0  # stopped by abort_request (their clients left), since start
        self.spec_proposed_tokens = self.spec_accepted_tokens = 0  # speculative decoding, since start
        self._ids = itertools.count()
        self._seed_source = torch.Generator().manual_seed(self.config.seed)
        # step() holds `lock` for the whole step; abort_request waits for it, so the blocks are
        # free when it returns. add_request must not wait a step (a server's event loop calls
        # it): it takes only `_admit_lock`, which guards `_requests` and the waiting queue and
        # is held only for moments. Order: `lock`, then `_admit_lock`.
        self.lock = threading.RLock()
        self._admit_lock = threading.Lock()
        self.last_step = StepStats()
        self.kernel_choices: dict[str, Choice] = {}  # what the load-time guard chose (guard_native_kernels)
        self.kernel_report: list[str] = []  # ... and the timings it chose from, a line per op and size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        dtype: str = "auto",
        config: EngineConfig | None = None,
        skip_tokenizer_init: bool = False,
        progress=None,
        load_experts: bool = True,
    ) -> LLMEngine:
        """Load a checkpoint. Without `load_experts` the caller must set an expert backend."""
        path = Path(path)
        cfg = load_config(path)
        resolve_dtype(dtype, cfg)  # fail on a bad dtype before reading any weights
        tokenizer = None if skip_tokenizer_init else load_tokenizer(path)
        model = load_model(path, dtype, progress=progress, load_experts=load_experts)
        engine = cls(model, tokenizer, stop_token_ids(path, cfg.eos_token_ids), config)
        engine.guard_native_kernels()
        if load_experts:  # remote experts are reached only once their pools are up
            engine.warm_up()
        return engine

    def guard_native_kernels(self) -> None:
        """Time each native op against its torch twin on this model's shapes, at a decode step's
        rows and a prefill step's, and keep the faster per op and size (kernels/guard.py), so no
        CPU runs a kernel slower than torch's. Each choice is logged once."""
        if native_kernels() is None:
            return
        prefill_rows = min(self.config.max_num_batched_tokens, MAX_PREFILL_ROWS)
        self.kernel_choices, timings = guard_kernels(self.model, self.config.max_num_seqs, prefill_rows)
        self.kernel_report = describe(self.kernel_choices, timings)
        for line in self.kernel_report:
            log.info("kernel guard: %s", line)

    def warm_up(self) -> None:
        """Run one step of the largest size before any request, as vLLM's profile run does.

        The allocator grows to a full step's activations now, and keeps them (see
        `retain_freed_memory`), so no user request pays the page faults of a first step that
        size (a cold 4096-token prefill takes about half as long again; docs/benchmark-log.md).
        """
        vocab = self.model.config.vocab_size
        ids = torch.randint(
            0, vocab, (self.config.max_num_batched_tokens,), generator=torch.Generator().manual_seed(0)
        )
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        start = 0
        cache_tokens = self.allocator.num_blocks * self.config.block_size
        for i, n in enumerate(warm_up_lengths(self.config, self.max_model_len, cache_tokens)):
            self.add_request(ids[start : start + n].tolist(), params, request_id=f"warm-up-{i}")
            start += n
        while self.has_unfinished_requests():
            self.step()
        self.allocator.forget_idle()  # random prompts: nothing a request will share
        self.scheduler.prefix_cache_queries = self.scheduler.prefix_cache_hits = 0
        self.last_step = StepStats()

    # ---- requests -------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def tokenize(
        self, prompt: str | list[int], add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(text, ids) of a prompt: a text is encoded with the tokenizer's special tokens, as vLLM
        encodes completion prompts; a rendered chat template passes `add_special_tokens=False`."""
        if isinstance(prompt, str):
            if self.detokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass prompts as token ids")
            if not prompt:  # a BOS alone is no prompt either
                raise InvalidRequestError("prompt is empty: it must have at least one character")
            return prompt, self.detokenizer.encode(prompt, add_special_tokens)
        return None, list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty: it must have at least one token")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens but max_model_len is {self.max_model_len}; "
                "shorten the prompt (room must remain for at least one new token)"
            )
        if params.stop and self.detokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        probe = Sequence("", None, prompt_token_ids, params, None)
        need = self.scheduler.blocks_needed(probe)
        if need > self.allocator.num_blocks:
            raise InvalidRequestError(
                f"request needs {need} KV cache blocks ({n} prompt tokens + max_tokens={params.max_tokens}) "
                f"but the whole cache has {self.allocator.num_blocks}; lower max_tokens or raise "
                "kv_cache_memory_bytes"
            )

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self.validate(ids, params)
        request_id = request_id or self.new_request_id()
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            generator = torch.Generator().manual_seed(seed)
        with self._admit_lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self.check_queue_room(1)
            seq = Sequence(request_id, text, ids, params, generator)
            self._requests[request_id] = seq
            self.scheduler.add(seq)
        return request_id

    def check_queue_room(self, n: int) -> None:
        waiting = len(self.scheduler.waiting)
        if waiting + n > self.config.max_queued_requests:
            raise QueueFullError(
                f"{waiting} requests are already waiting and {n} more would exceed "
                f"max_queued_requests={self.config.max_queued_requests}; retry later"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV cache blocks. False if it was not running."""
        with self.lock, self._admit_lock:
            seq = self._requests.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.finish(seq, "abort")
            self.aborted_requests += 1
            return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    def occupancy(self) -> dict:
        """Requests and cache blocks in use now, for a replica's `info` (read without the step lock:
        a snapshot that may be one step old)."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "aborted": self.aborted_requests,
            "free_blocks": self.allocator.num_free,
        }

    def prefix_cache_stats(self) -> dict:
        """Prompt tokens looked up and found in the prefix cache since start, and cached blocks now."""
        cache = self.allocator.prefix_cache
        return {
            "enabled": cache is not None,
            "queries": self.scheduler.prefix_cache_queries,
            "hits": self.scheduler.prefix_cache_hits,
            "cached_blocks": cache.num_cached if cache is not None else 0,
        }

    # ---- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; report every request that gained text or finished."""
        with self.lock:
            with self._admit_lock:
                plan = self.scheduler.schedule()
            if plan.empty:
                return []
            if self.config.speculative is not None:
                self._propose(plan)
            decode_context = sum(s.num_computed_tokens + 1 for s in plan.decodes)
            started = time.perf_counter()
            try:
                result = self.runner.execute(plan)
            except BackendUnavailableError as exc:
                return self._fail_step(plan, exc)
            for seq in [*plan.decodes, *(seq for seq, _ in plan.prefills)]:
                self.scheduler.cache_computed_blocks(seq)  # before a finish frees them
            outputs = []
            if result.sampled:
                tokens = sample(
                    result.logits, [s.params for s in result.sampled], [s.generator for s in result.sampled]
                )
                now = time.monotonic()
                for seq, token in zip(result.sampled, tokens, strict=True):
                    if isinstance(token, Exception):
                        self._fail_sampling(seq, token)
                    else:
                        self._append(seq, token, now)
                    outputs.append(self._report(seq))
            if result.verified:
                now = time.monotonic()
                for seq, proposals, logits in result.verified:
                    try:
                        if seq.params.greedy:
                            tokens = accept_greedy(proposals, greedy_tokens(logits).tolist())
                        else:
                            tokens = accept_sampled(logits, proposals, seq.params, seq.generator)
                    except (RuntimeError, ValueError) as exc:  # as sample(): this request's alone
                        self._fail_sampling(seq, exc)
                    else:
                        self._keep_verified(seq, tokens, now)
                    outputs.append(self._report(seq))
            self.last_step = StepStats(
                len(plan.decodes),
                plan.prefill_tokens,
                time.perf_counter() - started,
                decode_context,
            )
            return outputs

    def _propose(self, plan: StepPlan) -> None:
        """Move the decodes that n-gram lookup finds proposals for into `plan.verifies`, within
        the step's token budget and each request's reserved cache blocks."""
        spec = self.config.speculative
        assert spec is not None
        budget = self.config.max_num_batched_tokens - plan.num_tokens
        plain = []
        for seq in plan.decodes:
            # positions up to num_tokens - 1 + k are written: inside the blocks reserved for
            # max_tokens and the context
            room = min(
                spec.num_tokens,
                budget,
                seq.params.max_tokens - len(seq.output_token_ids) - 1,
                self.max_model_len - seq.num_tokens - 1,
            )
            proposals = []
            if room > 0:
                history = seq.prompt_token_ids + seq.output_token_ids
                proposals = propose_ngram(history, room, spec.ngram_max, spec.ngram_min)
            if proposals:
                plan.verifies.append((seq, proposals))
                budget -= len(proposals)
                self.spec_proposed_tokens += len(proposals)
            else:
                plain.append(seq)
        plan.decodes = plain

    def _keep_verified(self, seq: Sequence, tokens: list[int], now: float) -> None:
        """Append what a verified span yields (the proposals kept, then one more); the cache
        keeps the K/V of the tokens kept."""
        self.spec_accepted_tokens += len(tokens) - 1
        start = seq.num_computed_tokens
        seq.num_computed_tokens = start + 1  # the last token's K/V, whatever is kept
        self.scheduler.cache_computed_blocks(seq)  # before a finish frees the blocks
        for token in tokens:
            self._append(seq, token, now)
            if seq.finished:
                return
        seq.num_computed_tokens = start + len(tokens)  # and the kept proposals'
        self.scheduler.cache_computed_blocks(seq)

    def speculative_stats(self) -> dict:
        """Tokens proposed and accepted since start (the acceptance rate is their ratio)."""
        return {
            "enabled": self.config.speculative is not None,
            "proposed": self.spec_proposed_tokens,
            "accepted": self.spec_accepted_tokens,
        }

    def _fail_step(self, plan, exc: BackendUnavailableError) -> list[RequestOutput]:
        """The step's forward pass could not finish: fail exactly its requests, free their cache."""
        outputs = []
        for seq in [*plan.decodes, *(s for s, _ in plan.prefills), *(s for s, _ in plan.verifies)]:
            self._fail(seq, str(exc))
            outputs.append(self._report(seq))
        return outputs

    def _fail(self, seq: Sequence, why: str) -> None:
        """End one request with an error (its cache freed); the engine goes on."""
        seq.error = why
        self.scheduler.finish(seq, "error")

    def _fail_sampling(self, seq: Sequence, exc: Exception) -> None:
        log.error("sampling failed for request %s", seq.request_id, exc_info=exc)
        self._fail(seq, f"sampling failed for this request: {exc}")

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        if self.detokenizer is not None:
            new = self.detokenizer.append_token(seq)
            hit = find_stop(seq.text, len(new), params.stop) if params.stop and new else None
            if hit is not None:
                index, stop = hit
                seq.text = (
                    seq.text[: index + len(stop)] if params.include_stop_str_in_output else seq.text[:index]
                )
                seq.stop_reason = stop
                self.scheduler.finish(seq, "stop")
                return
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.stop_reason = None if token in self.eos_token_ids else token
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _report(self, seq: Sequence) -> RequestOutput:
        finished = seq.finished
        if finished:
            with self._admit_lock:
                self._requests.pop(seq.request_id, None)
        # While a stop string could still be forming, hold back its possible prefix.
        hold = 0 if finished or not seq.params.stop else stop_holdback(seq.params.stop)
        visible = max(seq.emitted_chars, len(seq.text) - hold)
        delta_text = seq.text[seq.emitted_chars : visible]
        delta_ids = seq.output_token_ids[seq.emitted_tokens :]
        seq.emitted_chars, seq.emitted_tokens = visible, len(seq.output_token_ids)
        completion = CompletionOutput(
            index=0,
            text=seq.text[:visible],
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finished_time=time.monotonic() if finished else None,
            error=seq.error,
            num_cached_tokens=seq.num_cached_tokens,
        )
