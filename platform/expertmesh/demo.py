"""`make serve` until the serving plane lands: the offline engine on sample prompts, streamed live."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from expertmesh.engine.llm import LLM
from expertmesh.engine.sampling_params import SamplingParams

SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class HTTPServer:",
    "# Mixture of Grouped Experts balances load because",
    "for index, value in enumerate(",
    "The quick brown fox",
    "raise ValueError(",
    "async def handler(request):",
]


def _table(prompts: list[str], texts: list[str]) -> Table:
    table = Table(title="expertmesh offline engine (random-weight demo checkpoint: the text is noise)")
    table.add_column("prompt", style="cyan", max_width=30)
    table.add_column("generated", overflow="fold")
    for prompt, text in zip(prompts, texts, strict=True):
        table.add_row(repr(prompt), text[-160:])
    return table


def run_demo(model: Path, max_tokens: int = 48, dtype: str = "auto", console: Console | None = None) -> dict:
    """Generate for SAMPLE_PROMPTS as one batch, showing each row grow; return throughput numbers."""
    console = console or Console()
    llm = LLM(model, dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
    texts = [""] * len(SAMPLE_PROMPTS)
    row_of: dict[str, int] = {}
    tokens = 0
    start = time.perf_counter()
    with Live(_table(SAMPLE_PROMPTS, texts), console=console, refresh_per_second=8) as live:
        for out in llm.generate_stream(SAMPLE_PROMPTS, params):
            row = row_of.setdefault(out.request_id, len(row_of))
            texts[row] += out.outputs[0].delta_text
            tokens += len(out.outputs[0].delta_token_ids)
            live.update(_table(SAMPLE_PROMPTS, texts))
    if not console.is_terminal:  # Live leaves its last frame without a line end there
        console.line()
    elapsed = time.perf_counter() - start
    stats = {"requests": len(SAMPLE_PROMPTS), "output_tokens": tokens, "seconds": elapsed}
    console.print(
        f"{tokens} tokens for {len(SAMPLE_PROMPTS)} requests in {elapsed:.2f} s: "
        f"[bold]{tokens / elapsed:.1f} output tokens/s[/bold] (continuous batching, {dtype})"
    )
    return stats
