"""Waiting on a condition instead of sleeping: two shared cores make fixed sleeps flaky."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(
    condition: Callable[[], object],
    what: str | Callable[[], str],
    timeout_s: float = 60.0,
    every_s: float = 0.2,
):
    """Poll `condition` until it is truthy (its value is returned); past the deadline, fail naming
    `what` (a callable is asked then, to describe the state at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every_s)
    pytest.fail(f"{what() if callable(what) else what}: not within {timeout_s:.0f} s")
