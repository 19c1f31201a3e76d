"""The benchmarks' weights: the project's own `small` checkpoints, in the releases' layout, made
the first time a benchmark needs one."""

from __future__ import annotations

import json
from pathlib import Path

from expertmesh.model.checkpoint_maker import make_checkpoint

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def small_checkpoint(arch: str) -> tuple[Path, int]:
    """(its directory, its vocabulary size), made when missing."""
    path = CHECKPOINTS / f"{arch}-small"
    if not (path / "config.json").is_file():
        make_checkpoint(arch, "small", path)
    return path, json.loads((path / "config.json").read_text())["vocab_size"]
