"""A Model's `resources` become Ray reservations and torch threads for each replica."""

from __future__ import annotations

from decimal import Decimal

import pytest

from expertmesh.config import ReplicaResources
from expertmesh_operator.crd import PoolResources
from expertmesh_operator.resources import quantity, replica_resources


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2), ("500m", 0.5), ("1.5", 1.5), (".25", 0.25), ("100u", 0.0001),
        ("16Gi", 16 * 1024**3), ("512Mi", 512 * 1024**2), ("8Ki", 8192),
        ("129M", 129_000_000), ("2G", 2_000_000_000), ("1k", 1000),
        ("1e3", 1000), ("1.5E9", 1_500_000_000), ("2e-3", 0.002), ("-1", -1),
    ],
)  # fmt: skip
def test_quantity_reads_every_kubernetes_suffix(text, value):
    assert quantity(text) == Decimal(str(value))


@pytest.mark.parametrize("text", ["lots", "12 GB", "1.5Mm", "", "Gi"])
def test_quantity_refuses_what_kubernetes_refuses(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity(text)


def pool(requests: dict | None = None, limits: dict | None = None) -> PoolResources:
    return PoolResources.model_validate({"requests": requests or {}, "limits": limits or {}})


def test_nothing_set_reserves_nothing_and_runs_one_thread():
    assert replica_resources(pool()) == (ReplicaResources(num_cpus=0, memory_bytes=None), 1)


def test_requests_are_reserved_and_whole_cpus_are_threads():
    reserved, threads = replica_resources(pool({"cpu": "4", "memory": "16Gi"}, {"memory": "16Gi"}))
    assert (reserved.num_cpus, reserved.memory_bytes, threads) == (4.0, 16 * 1024**3, 4)
    assert reserved.ray_actor_options() == {"num_cpus": 4.0, "memory": 16 * 1024**3}


def test_a_request_left_out_defaults_to_its_limit_as_in_kubernetes():
    reserved, threads = replica_resources(pool(limits={"cpu": "2", "memory": "1G"}))
    assert (reserved.num_cpus, reserved.memory_bytes, threads) == (2.0, 10**9, 2)


def test_threads_follow_the_limit_the_replica_may_use():
    reserved, threads = replica_resources(pool({"cpu": "1500m"}, {"cpu": "3"}))
    assert (reserved.num_cpus, threads) == (1.5, 3)


def test_a_fraction_of_a_cpu_still_runs_one_thread():
    reserved, threads = replica_resources(pool({"cpu": "250m"}))
    assert (reserved.num_cpus, threads) == (0.25, 1)
    assert reserved.ray_actor_options() == {"num_cpus": 0.25}


def test_fractional_bytes_round_up():
    assert replica_resources(pool({"memory": "1.5"}))[0].memory_bytes == 2
