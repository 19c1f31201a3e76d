"""Revision choice by traffic weight: a pure function of the table and one uniform draw."""

from __future__ import annotations


def choose_revision(weights: dict[str, int], draw: float) -> str:
    """`draw` in [0, 1): walk the revisions in name order, each covering weight/total of the line."""
    live = sorted((name, w) for name, w in weights.items() if w > 0)
    if not live:
        raise ValueError("no revision has traffic weight above 0")
    total = sum(w for _, w in live)
    point = draw * total
    for name, w in live:
        if point < w:
            return name
        point -= w
    return live[-1][0]
