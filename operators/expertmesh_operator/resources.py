"""A Model's `resources` as Ray sees them (pure): Kubernetes quantities to Ray reservations and threads.

A pool's CPU request becomes what Ray reserves for each of its replicas (`num_cpus`), so Ray
places replicas where they fit and the Ray autoscaler adds worker pods for those that do not;
its memory request likewise (`memory`). As in Kubernetes, a request that is not set defaults to
the limit. Each replica runs as many torch threads as whole CPUs it may use (the limit, else the
request; at least one).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from expertmesh.config import MAX_THREADS, ReplicaResources
from expertmesh_operator.crd import PoolResources

_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("500m", "2", "16Gi", "1.5e9") as an exact number."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = Decimal(match[1]), match[2] or ""
    if suffix[:1] in ("e", "E"):
        return number.scaleb(int(suffix[1:]))
    return number * _SUFFIXES[suffix]


def replica_resources(pool: PoolResources) -> tuple[ReplicaResources, int]:
    """What Ray reserves for each replica of a pool, and the torch threads each one runs."""
    cpu_request = pool.requests.cpu or pool.limits.cpu
    memory_request = pool.requests.memory or pool.limits.memory
    reserved = ReplicaResources(
        num_cpus=float(quantity(cpu_request)) if cpu_request else 0,
        memory_bytes=math.ceil(quantity(memory_request)) if memory_request else None,
    )
    usable = pool.limits.cpu or pool.requests.cpu
    threads = min(MAX_THREADS, max(1, math.floor(quantity(usable)))) if usable else 1
    return reserved, threads
