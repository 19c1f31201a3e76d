"""Continuous-batching engine: scheduler, KV cache, sampler, offline and async APIs."""
