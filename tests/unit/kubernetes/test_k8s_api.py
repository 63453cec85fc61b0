"""Resource paths, the permission guard of every call, and API error decoding."""

from __future__ import annotations

import httpx2
import pytest

from lattice.common.errors import UserError
from lattice.operator.kubernetes.api import ApiError, KubeApi, UndeclaredVerb, load_config
from lattice.operator.kubernetes.resources import (
    LEASES,
    NODES,
    PODS,
    SECRETS,
    TRAININGJOB_STATUS,
    TRAININGJOBS,
)


def test_paths() -> None:
    assert PODS.path() == "/api/v1/pods"
    assert PODS.path("ns") == "/api/v1/namespaces/ns/pods"
    assert PODS.path("ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert NODES.path("ignored", "n") == "/api/v1/nodes/n"
    assert LEASES.path("x", "l") == "/apis/coordination.k8s.io/v1/namespaces/x/leases/l"
    status = TRAININGJOB_STATUS[1]
    assert status.path("ns", "j") == "/apis/breezeml.ai/v1/namespaces/ns/trainingjobs/j/status"
    assert status.rbac_name == "trainingjobs/status"
    assert [r.api_version for r in TRAININGJOBS] == ["exabits.ai/v1", "breezeml.ai/v1"]


async def test_undeclared_verbs_are_refused_before_any_request() -> None:
    def unreachable(request: httpx2.Request) -> httpx2.Response:
        raise AssertionError(f"no request may be sent: {request.url}")

    seen: list[tuple[str, str]] = []
    api = KubeApi(
        httpx2.AsyncClient(
            base_url="http://127.0.0.1:9", transport=httpx2.MockTransport(unreachable)
        ),
        on_request=lambda verb, res: seen.append((verb, res.rbac_name)),
    )
    with pytest.raises(UndeclaredVerb, match="get secrets"):
        await api.get(SECRETS, "any", "ns")  # the operator may write Secrets, never read them
    with pytest.raises(UndeclaredVerb, match="delete nodes"):
        await api.delete(NODES, "n")
    with pytest.raises(UndeclaredVerb, match="update pods"):
        await api.replace(PODS, {"metadata": {"name": "p", "namespace": "ns"}})
    assert seen == []
    await api.close()


async def test_status_answers_become_api_errors() -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if request.method == "PUT":
            return httpx2.Response(
                409,
                json={"kind": "Status", "code": 409, "reason": "Conflict", "message": "modified"},
            )
        if request.method == "POST":
            return httpx2.Response(409, json={"code": 409, "reason": "AlreadyExists"})
        return httpx2.Response(502, text="bad gateway")

    api = KubeApi(
        httpx2.AsyncClient(base_url="http://127.0.0.1:9", transport=httpx2.MockTransport(answer))
    )
    with pytest.raises(ApiError) as conflict:
        await api.replace(TRAININGJOBS[0], {"metadata": {"name": "j", "namespace": "n"}})
    assert conflict.value.conflict and not conflict.value.already_exists
    with pytest.raises(ApiError) as exists:
        await api.create(PODS, {"metadata": {"name": "p", "namespace": "n"}})
    assert exists.value.already_exists and not exists.value.conflict
    with pytest.raises(ApiError) as other:
        await api.list(PODS)
    assert other.value.code == 502 and "bad gateway" in other.value.message
    await api.close()


def test_missing_kubeconfig_is_a_user_error(tmp_path: object) -> None:
    with pytest.raises(UserError, match="no Kubernetes cluster configured"):
        load_config("/nonexistent/kubeconfig")
