"""The committed CRDs are exactly what the model generates, and they are structural."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lattice.api import GROUPS
from lattice.api.crd import PACKAGE_DIR, crd, file_name, render

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("directory", [PACKAGE_DIR, REPO / "deploy" / "crds"])
def test_committed_crd_matches_the_model(group: str, directory: Path) -> None:
    path = directory / file_name(group)
    assert path.read_text() == render(group), (
        f"{path} is stale: run `python -m lattice.api.crd` and commit the result"
    )


def test_generator_command_writes_both_groups(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lattice.api.crd", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(file_name(g) for g in GROUPS)
    assert str(tmp_path) in out.stdout
    for group in GROUPS:
        doc = yaml.safe_load((tmp_path / file_name(group)).read_text())
        assert doc == crd(group)


def _walk(node: dict[str, Any], path: str = "") -> list[str]:
    """Violations of Kubernetes' structural-schema rules under ``node``."""
    bad: list[str] = []
    for key in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "additionalProperties"):
        if key in node and not (key == "additionalProperties" and isinstance(node[key], dict)):
            bad.append(f"{path}: {key}")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        bad.append(f"{path}: no type")
    if node.get("default", 0) is None:
        bad.append(f"{path}: null default")
    for name, sub in node.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if "items" in node:
        bad += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}")
    return bad


@pytest.mark.parametrize("group", GROUPS)
def test_crd_is_structural_with_status_columns_and_cel(group: str) -> None:
    doc = crd(group)
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["metadata"]["name"] == f"trainingjobs.{group}"
    spec = doc["spec"]
    assert spec["group"] == group and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "trainingjobs"
    assert spec["names"]["kind"] == "TrainingJob"
    assert spec["names"]["shortNames"] == ["tj"]
    (version,) = spec["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Size", "Min", "Max", "Restarts", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    job_spec = schema["properties"]["spec"]
    assert {"rule": "self.minSize <= self.maxSize"}.items() <= job_spec["x-kubernetes-validations"][
        0
    ].items()
    assert job_spec["required"] == ["minSize", "maxSize", "replicaSpecs"]
    assert job_spec["properties"]["minSize"]["minimum"] == 1
    template = job_spec["properties"]["replicaSpecs"]["properties"]["template"]
    assert template["x-kubernetes-preserve-unknown-fields"] is True
    pod = template["properties"]["spec"]
    assert pod["x-kubernetes-preserve-unknown-fields"] is True
    container = pod["properties"]["containers"]["items"]
    assert container["x-kubernetes-preserve-unknown-fields"] is True
    assert container["properties"]["command"] == {"type": "array", "items": {"type": "string"}}
    env_from = container["properties"]["env"]["items"]["properties"]["valueFrom"]
    assert env_from["x-kubernetes-preserve-unknown-fields"] is True
    assert job_spec["properties"]["nprocPerNode"]["x-kubernetes-int-or-string"] is True
    status = schema["properties"]["status"]["properties"]
    for field in ("phase", "size", "targetSize", "round", "restarts", "lastCheckpoint"):
        assert field in status
    assert status["phase"]["enum"] == [
        "Pending",
        "Running",
        "Resizing",
        "Restarting",
        "Succeeded",
        "Failed",
    ]
    assert status["conditions"]["type"] == "array"
