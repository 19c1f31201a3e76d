"""Which Models take part in a round, as pure functions of the listed objects.

A live Model takes part once it carries our finalizer (so its deletion is sure to wait for the
cleanup), with the spec it declares or, when that spec cannot be read, the stable revision it
last deployed. One RayService serves every watched namespace, so a Model name may be deployed
from one namespace only: the first in (namespace, name) order keeps it, the others are blocked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from expertmesh_operator.crd import FINALIZER, ModelResource, ModelResourceSpec, ModelResourceStatus


class FinalizerChange(BaseModel):
    """metadata.finalizers of one Model, replaced whole, only if it is still at resource_version."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    finalizers: list[str]
    resource_version: str


class Entry(BaseModel):
    """A live Model as this round sees it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    obj: dict[str, Any]
    status: ModelResourceStatus | None  # as stored
    model: ModelResource | None  # None: nothing to deploy from (unreadable spec, no history, name taken)
    problem: str | None = None  # why it is blocked or frozen: unreadable spec, or its name is taken
    status_problem: str | None = None  # why the stored status was dropped (ours, but unreadable)

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "default")

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def uid(self) -> str | None:
        return self.obj["metadata"].get("uid")


class Admission(BaseModel):
    model_config = ConfigDict(frozen=True)

    entries: list[Entry]  # live Models carrying our finalizer, in (namespace, name) order
    deleting: list[dict[str, Any]]  # Models with a deletionTimestamp, in the same order

    @property
    def models(self) -> list[ModelResource]:
        """What this round deploys, one per name."""
        return [e.model for e in self.entries if e.model is not None]


def is_deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def finalizers_of(obj: dict[str, Any]) -> list[str]:
    return list(obj["metadata"].get("finalizers") or [])


def in_round_order(objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))


def finalizers_to_add(objects: Sequence[dict[str, Any]]) -> list[FinalizerChange]:
    """Our finalizer onto every live Model that lacks it, before anything of it is deployed."""
    return [
        FinalizerChange(
            namespace=o["metadata"].get("namespace", "default"),
            name=o["metadata"]["name"],
            finalizers=[*finalizers_of(o), FINALIZER],
            resource_version=o["metadata"]["resourceVersion"],
        )
        for o in in_round_order(objects)
        if not is_deleting(o) and FINALIZER not in finalizers_of(o)
    ]


def admit(objects: Sequence[dict[str, Any]]) -> Admission:
    """The round's Models: a live one without our finalizer is left out (its write failed)."""
    ordered = in_round_order(objects)
    entries = [parse(o) for o in ordered if not is_deleting(o) and FINALIZER in finalizers_of(o)]
    taken: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if entry.name in taken:
            problem = f"a Model named {entry.name!r} is already deployed from namespace {taken[entry.name]}"
            entries[i] = entry.model_copy(update={"model": None, "problem": problem})
        elif entry.model is not None:
            taken[entry.name] = entry.namespace
    return Admission(entries=entries, deleting=[o for o in ordered if is_deleting(o)])


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "spec"
    return f"{where}: {first['msg']} ({exc.error_count()} problem(s) in all)"


def parse(obj: dict[str, Any]) -> Entry:
    meta = obj["metadata"]
    raw_status = obj.get("status") or {}
    try:
        status = ModelResourceStatus.model_validate(raw_status) if raw_status else None
        status_problem = None
    except ValidationError as e:
        # our own writing, unreadable after a schema change: start over rather than stop
        status, status_problem = None, _describe(e)
    try:
        spec = ModelResourceSpec.model_validate(obj.get("spec") or {})
        problem = None
    except ValidationError as e:
        problem = f"the spec cannot be read: {_describe(e)}"
        stable = status.rollout.stable if status and status.rollout else None
        if stable is None:
            return Entry(obj=obj, status=status, model=None, problem=problem, status_problem=status_problem)
        spec = stable.spec  # the stable revision keeps serving, frozen
    model = ModelResource(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        generation=meta.get("generation", 1),
        annotations=meta.get("annotations") or {},
        spec=spec,
        status=status,
    )
    return Entry(obj=obj, status=status, model=model, problem=problem, status_problem=status_problem)
