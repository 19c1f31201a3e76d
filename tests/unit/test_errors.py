"""One classification of serving errors, which both protocols map to their codes."""

import logging

import grpc
import pytest

from expertmesh.api.grpc_service import STATUS_OF_KIND, status_for
from expertmesh.config import moge_groups_problem
from expertmesh.errors import (
    BackendUnavailableError,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    classify,
    client_error,
)


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (ModelNotFoundError("model 'x' is not served here"), "not_found", grpc.StatusCode.NOT_FOUND),
        (QueueFullError("queue full"), "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),  # before invalid
        (InvalidRequestError("top_p must be in (0, 1]"), "invalid", grpc.StatusCode.INVALID_ARGUMENT),
        (EngineDeadError("engine loop stopped"), "unavailable", grpc.StatusCode.UNAVAILABLE),
        (BackendUnavailableError("pool 3 did not answer"), "unavailable", grpc.StatusCode.UNAVAILABLE),
        (KeyError("oops"), "internal", grpc.StatusCode.INTERNAL),
    ],
)
def test_each_failure_has_one_kind_and_the_grpc_code_of_that_kind(exc, kind, code):
    assert classify(exc) == kind
    assert STATUS_OF_KIND[kind] == code and status_for(exc)[0] == code


def test_an_unexpected_error_is_logged_with_its_traceback_and_never_shown(caplog):
    with caplog.at_level(logging.ERROR, logger="expertmesh.errors"):
        error = client_error(KeyError("secret internals"))
    assert error.message == "internal server error (KeyError); see the server log"
    assert caplog.records[0].exc_info is not None


def test_moge_pools_are_its_routing_groups():
    assert moge_groups_problem("moge", 8, None) is None and moge_groups_problem("moge", 8, 8) is None
    assert "its 8 routing groups, got groups=4" in moge_groups_problem("moge", 8, 4)
    assert moge_groups_problem("noaux_tc", 8, 4) is None  # DeepSeek's groups are a default, not a rule
