"""The operator's own dependencies (the `[operator]` extra): checked once at start, so a missing
one is a one-line instruction, not a traceback from deep inside a Kubernetes call."""

from __future__ import annotations

import importlib

# pydantic and pyyaml are the package's own dependencies too, imported before this check can run
OPERATOR_EXTRA = ("kopf", "kubernetes", "requests")
INSTALL = "pip install 'expertmesh[operator]'"


def missing_modules(modules: tuple[str, ...] = OPERATOR_EXTRA) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def missing_extra_message(program: str, modules: tuple[str, ...] = OPERATOR_EXTRA) -> str | None:
    """One line naming what is missing and how to install it; None when all is there."""
    missing = missing_modules(modules)
    if not missing:
        return None
    return f"{program}: missing {', '.join(missing)}; install the operator's dependencies: {INSTALL}"
