"""A Model's status conditions, and the rule for announcing an invalid spec.

Both the whole-world decision (reconcile.py) and the round's own checks (round_plan.py: a spec
that cannot be read, a Model name taken in another namespace) mark a Model Degraded with reason
InvalidSpec and warn about it with an Event; one place says how, so they all say it once.
"""

from __future__ import annotations

from expertmesh_operator.crd import Condition, ModelResourceStatus, rfc3339
from expertmesh_operator.events import Event

INVALID_SPEC = "InvalidSpec"
MAX_MESSAGE = 4096  # characters of a condition's message the status keeps


def condition(
    previous: ModelResourceStatus | None, type_: str, status: str, reason: str, message: str, now: float
) -> Condition:
    """The condition `type_` as it stands now, given the Model's stored status."""
    old = previous.condition(type_) if previous else None
    # the transition time moves only when the status does, as Kubernetes conventions ask
    since = old.last_transition_time if old is not None and old.status == status else rfc3339(now)
    return Condition(
        type=type_, status=status, reason=reason, message=message[:MAX_MESSAGE], last_transition_time=since
    )


def invalid_spec_events(previous: ModelResourceStatus | None, message: str) -> list[Event]:
    """The InvalidSpec warning, unless the stored Degraded condition already says exactly this.

    The status records what was said: a round that re-decides the same problem (every tick does)
    posts nothing, and a changed problem is announced once more.
    """
    was = previous.condition("Degraded") if previous else None
    said = (
        was is not None
        and was.status == "True"
        and was.reason == INVALID_SPEC
        and was.message == message[:MAX_MESSAGE]  # as `condition` stored it
    )
    return [] if said else [Event(type="Warning", reason=INVALID_SPEC, message=message)]
