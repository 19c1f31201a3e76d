"""`deploy` waits on Serve's application statuses itself (Serve's blocking deploy gives up at 60 s):
its decision, as a pure function of what serve.status() reports."""

from types import SimpleNamespace

from ray.serve.schema import ApplicationStatus

from expertmesh.serve.app import deploy_state


def app(status: ApplicationStatus, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(status=status, message=message)


def test_running_only_when_every_application_runs():
    names = {"expertmesh", "m--r1"}
    assert (
        deploy_state(
            names, {"expertmesh": app(ApplicationStatus.RUNNING), "m--r1": app(ApplicationStatus.RUNNING)}
        )
        == "running"
    )
    waiting = deploy_state(
        names, {"expertmesh": app(ApplicationStatus.RUNNING), "m--r1": app(ApplicationStatus.DEPLOYING)}
    )
    assert waiting.startswith("waiting") and "m--r1 DEPLOYING" in waiting


def test_an_application_not_listed_yet_is_waited_for():
    state = deploy_state({"expertmesh", "m--r1"}, {"expertmesh": app(ApplicationStatus.RUNNING)})
    assert state.startswith("waiting") and "m--r1 not yet listed" in state


def test_a_failed_application_ends_the_wait_with_its_message():
    state = deploy_state(
        {"expertmesh", "m--r1"},
        {
            "expertmesh": app(ApplicationStatus.DEPLOYING),
            "m--r1": app(ApplicationStatus.DEPLOY_FAILED, "Engine: no config.json in /models/x"),
        },
    )
    assert state == "failed: m--r1: Engine: no config.json in /models/x"


def test_other_applications_are_not_waited_for():
    assert (
        deploy_state(
            {"m--r1"}, {"m--r1": app(ApplicationStatus.RUNNING), "old": app(ApplicationStatus.DELETING)}
        )
        == "running"
    )
