"""Cluster errors in the one HTTP mapping (api/problems.py)."""

from __future__ import annotations

from iotmesh.api.problems import status_of
from iotmesh.cluster import CallFailed, ClusterError, NoInstance, StaleToken
from iotmesh.core.errors import Overloaded


def test_cluster_errors_map_to_http_statuses() -> None:
    assert status_of(NoInstance("api")) == 503
    assert status_of(CallFailed("api", [("a", "refused")])) == 502
    assert status_of(StaleToken("job", 1, 2)) == 409
    assert status_of(ClusterError("engine down")) == 503


def test_no_instance_is_an_overload_with_a_retry_after() -> None:
    exc = NoInstance("api", retry_after=0.25)
    assert isinstance(exc, Overloaded)
    assert exc.retry_after == 0.25
    assert "api" in str(exc)
