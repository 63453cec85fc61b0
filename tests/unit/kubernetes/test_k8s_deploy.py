"""The deployment artefacts: kustomize bases that render, objects that validate, RBAC that is
exactly what the operator's code declares, and commands the CLI accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from lattice.cli import _register_all, cli
from lattice.operator.kubernetes.resources import LEASES, PERMISSIONS

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}
RUN_AS = 10001


def _base_objects(base: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (recursively), read without kustomize."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (base / entry).resolve()
        if path.is_dir():
            out += _base_objects(path)
        else:
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _kinds(objects, "Deployment") + _kinds(objects, "StatefulSet")


def _granted(objects: list[dict[str, Any]], kind: str) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for role in _kinds(objects, kind)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _declared(*, leases: bool) -> set[tuple[str, str, str]]:
    return {
        (verb, res.group, res.rbac_name)
        for res, verbs in PERMISSIONS.items()
        if (res == LEASES) == leases
        for verb in verbs
    }


def _resolve(args: list[str]) -> click.Context:
    """Parse ``lattice ARGS`` the way the CLI would, without running the command."""
    _register_all()
    command: click.Command = cli
    rest = list(args)
    name = "lattice"
    while isinstance(command, click.Group):
        name, rest = rest[0], rest[1:]
        assert name in command.commands, f"no command {name!r} in `lattice`"
        command = command.commands[name]
    return command.make_context(name, rest)


def check_objects(objects: list[dict[str, Any]]) -> None:
    """Everything the bases hold is well formed and as tight as the operator allows."""
    for obj in objects:
        assert (obj.get("apiVersion"), obj.get("kind")) in KNOWN_KINDS, obj.get("kind")
        assert obj["metadata"].get("name"), obj

    # RBAC: exactly the declared verbs (cluster-wide), leases only in the operator's namespace
    assert _granted(objects, "ClusterRole") == _declared(leases=False)
    assert _granted(objects, "Role") == _declared(leases=True)
    accounts = {o["metadata"]["name"]: o for o in _kinds(objects, "ServiceAccount")}
    bound = set()
    for binding in _kinds(objects, "ClusterRoleBinding") + _kinds(objects, "RoleBinding"):
        roles = _kinds(objects, binding["roleRef"]["kind"])
        assert binding["roleRef"]["name"] in {r["metadata"]["name"] for r in roles}
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            bound.add(subject["name"])
    assert bound == {"lattice-operator"}  # workers and services get no API rights
    assert accounts["lattice-worker"]["automountServiceAccountToken"] is False

    workloads = {o["metadata"]["name"]: o for o in _workloads(objects)}
    assert set(workloads) == {"lattice-operator", "lattice-rendezvous", "lattice-checkpoint"}
    for name, workload in workloads.items():
        template = workload["spec"]["template"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == RUN_AS
        if name != "lattice-operator":
            assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["image"].startswith("exabits/lattice:")
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
            ports = {p["name"] for p in c["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] in ports, (name, probe)
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            token = {e["name"]: e for e in c["env"]}["LATTICE_TOKEN"]
            assert token["valueFrom"]["secretKeyRef"] == {"name": "lattice-token", "key": "token"}
            _resolve(c["args"])  # every flag exists in the CLI

    operator = workloads["lattice-operator"]
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "lattice-operator"
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    ctx = _resolve(args)
    assert ctx.params["leader_elect"] is True and ctx.params["metrics_port"] == 8080
    services = {o["metadata"]["name"]: o for o in _kinds(objects, "Service")}
    for arg, service in (
        ("--rendezvous-endpoint", "lattice-rendezvous"),
        ("--checkpoint-endpoint", "lattice-checkpoint"),
    ):
        endpoint = next(a.split("=", 1)[1] for a in args if a.startswith(arg))
        host, port = endpoint.rsplit(":", 1)
        assert host.split(".")[0] == service and int(port) in {
            p["port"] for p in services[service]["spec"]["ports"]
        }
    for service in services.values():  # each Service selects a workload, on a named port
        matches = [
            w
            for w in workloads.values()
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, service["metadata"]["name"]
        names = {
            p["name"]
            for c in matches[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    checkpoint = workloads["lattice-checkpoint"]["spec"]
    assert checkpoint["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert checkpoint["serviceName"] in services
    assert {c["metadata"]["name"] for c in _kinds(objects, "CustomResourceDefinition")} == {
        "trainingjobs.exabits.ai",
        "trainingjobs.breezeml.ai",
    }


def test_bases_validate_without_kustomize() -> None:
    objects = _base_objects(DEPLOY / "default")
    check_objects(objects)
    assert [o["metadata"]["name"] for o in _kinds(objects, "Namespace")] == ["lattice-system"]


def test_default_renders_with_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize deploy/default` not checked")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "default")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    check_objects(objects)
    for obj in objects:
        namespaced = obj["kind"] not in {
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        }
        if namespaced:
            assert obj["metadata"]["namespace"] == "lattice-system", obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lattice"
    for binding in [o for o in objects if o["kind"].endswith("Binding")]:
        assert binding["subjects"][0]["namespace"] == "lattice-system"


def test_dockerfile_is_non_root_with_the_pinned_torch() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject)
    assert torch_pin is not None
    assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in text
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users == [f"{RUN_AS}:{RUN_AS}"]  # numeric: runAsNonRoot can verify it
    assert re.search(r'^ENTRYPOINT \["lattice"\]$', text, re.MULTILINE)
    ignore = [
        line
        for line in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*" and "!src/" in ignore
    # every file the image copies is let into the build context, and installed as CI's is
    for copied in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE):
        for name in copied.split():
            assert f"!{name}" in ignore or f"!{name}/" in ignore, name
    assert re.search(r"pip install -c constraints\.txt \.", text)
