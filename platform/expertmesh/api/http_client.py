"""Stream a completion from a running server's OpenAI HTTP API (for `expertmesh generate --url`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import requests


def stream_completion(
    url: str, model: str, prompt: str, params: dict, api_key: str | None = None, timeout: float = 600
) -> Iterator[dict]:
    """Yield each SSE chunk of `POST {url}/v1/completions` with stream=true."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": prompt, "stream": True, **params}
    with requests.post(
        f"{url.rstrip('/')}/v1/completions", json=body, headers=headers, stream=True, timeout=timeout
    ) as r:
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise RuntimeError(f"HTTP {r.status_code}: {message}")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)
