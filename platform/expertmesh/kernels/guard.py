"""The load-time guard: a native op runs only where it was measured no slower than its torch twin.

The kernels are designed per ISA level, but a CPU can still surprise them (another
microarchitecture, another cache size, a torch build that got faster). So an engine
times, at load, each native op against the torch path it replaces, on the model's own
shapes at a decode-sized and a prefill-sized row count, and keeps the faster per op
and size class. Until an op is measured it runs natively.

`choose` is the decision (timings in, choices out); `KernelChoices` holds what this
process chose and answers the call sites' `use_native(op, rows)`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NATIVE, TORCH = "native", "torch"
DECODE, PREFILL = "decode", "prefill"

# The ops the guard decides, each a native kernel with a torch twin at its call site.
OPS = ("linear", "experts", "moe_dispatch", "attention", "rotary", "rms_norm", "silu_and_mul", "argmax")


@dataclass(frozen=True)
class Timing:
    """One measurement: op `op` on `rows` rows of one of the model's shapes, each path's best time."""

    op: str
    size_class: str  # DECODE or PREFILL
    rows: int
    native_s: float
    torch_s: float
    weight: int = 1  # how many of the model's calls share this shape (its layers)


@dataclass(frozen=True)
class Choice:
    """What an op runs on: `decode` up to `decode_max_rows` rows, `prefill` above."""

    decode_max_rows: int
    decode: str
    prefill: str

    def at(self, rows: int) -> str:
        return self.decode if rows <= self.decode_max_rows else self.prefill


def _totals(timings: Iterable[Timing]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """Per (op, size class): native and torch seconds over the model's shapes, each weighted by
    how many calls share it, and the most rows timed."""
    totals: dict[tuple[str, str], tuple[float, float, int]] = {}
    for t in timings:
        native_s, torch_s, rows = totals.get((t.op, t.size_class), (0.0, 0.0, 0))
        totals[(t.op, t.size_class)] = (
            native_s + t.weight * t.native_s,
            torch_s + t.weight * t.torch_s,
            max(rows, t.rows),
        )
    return totals


def choose(timings: Iterable[Timing], decode_max_rows: dict[str, int]) -> dict[str, Choice]:
    """Per op and size class, the path with the smaller total time over the model's shapes
    (each weighted by how many calls share it); native on a tie. An op or class with no
    timing stays native."""
    totals = _totals(timings)

    def pick(op: str, size_class: str) -> str:
        native_s, torch_s, _ = totals.get((op, size_class), (0.0, 0.0, 0))
        return NATIVE if native_s <= torch_s else TORCH

    ops = {op for op, _ in totals}
    return {op: Choice(decode_max_rows[op], pick(op, DECODE), pick(op, PREFILL)) for op in sorted(ops)}


def describe(choices: dict[str, Choice], timings: Iterable[Timing]) -> list[str]:
    """One line per op and size class: the choice and the times it came from (ms, summed)."""
    return [
        f"{op} {size_class} ({rows} rows): {getattr(choices[op], size_class)} "
        f"(native {native_s * 1e3:.3f} ms, torch {torch_s * 1e3:.3f} ms)"
        for (op, size_class), (native_s, torch_s, rows) in sorted(_totals(timings).items())
    ]


class KernelChoices:
    """This process's choices. Engines in one process share them: the latest measurement of
    an op replaces the one before (one model per replica is the deployed case)."""

    def __init__(self) -> None:
        self._choices: dict[str, Choice] = {}
        self._lock = threading.Lock()

    def use_native(self, op: str, rows: int) -> bool:
        choice = self._choices.get(op)
        return choice is None or choice.at(rows) == NATIVE

    def update(self, choices: dict[str, Choice]) -> None:
        with self._lock:
            self._choices = {**self._choices, **choices}

    def snapshot(self) -> dict[str, Choice]:
        return dict(self._choices)

    def clear(self) -> None:
        with self._lock:
            self._choices = {}

    @contextlib.contextmanager
    def forced(self, op: str, path: str) -> Iterator[None]:
        """Run `op` on `path` at every size inside the block (to time it), then restore."""
        before = self._choices.get(op)
        with self._lock:
            self._choices = {**self._choices, op: Choice(0, path, path)}
        try:
            yield
        finally:
            with self._lock:
                rest = {k: v for k, v in self._choices.items() if k != op}
                self._choices = rest if before is None else {**rest, op: before}


CHOICES = KernelChoices()


def use_native(op: str, rows: int) -> bool:
    """Whether `op` on `rows` rows runs the native kernel in this process (see the module doc)."""
    return CHOICES.use_native(op, rows)
