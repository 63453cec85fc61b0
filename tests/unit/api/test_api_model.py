"""TrainingJob model: the documents' YAML verbatim, both groups, defaults, preserved fields."""

from __future__ import annotations

import pytest

from lattice.api import API_VERSIONS, TrainingJob, load_documents, parse_job
from lattice.common.http import valid_job_id

DOC = """
apiVersion: "exabits.ai/v1"
kind: TrainingJob
metadata: {name: example-job, namespace: lattice}
spec:
  minSize: 1
  maxSize: 3
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            command: ["python", "-u", "main.py"]
"""


@pytest.mark.parametrize("api_version", ["exabits.ai/v1", "breezeml.ai/v1"])
def test_documented_yaml_loads_verbatim_under_both_groups(api_version: str) -> None:
    (job,) = load_documents(DOC.replace("exabits.ai/v1", api_version))
    assert job.api_version == api_version
    assert job.group == api_version.split("/")[0]
    assert (job.spec.min_size, job.spec.max_size) == (1, 3)
    assert job.key == "lattice/example-job"
    assert job.job_id == "lattice.example-job"
    assert job.training_container.command == ["python", "-u", "main.py"]
    assert job.training_container.image == "exabits/lattice-resnet"


def test_optional_fields_default_like_earlier_releases() -> None:
    (job,) = load_documents(DOC)
    spec = job.spec
    assert spec.priority == 0
    assert spec.framework == "pytorch"
    assert spec.inject_lattice is True
    assert spec.run_policy.backoff_limit == 6
    assert spec.run_policy.clean_pod_policy == "Running"
    assert spec.run_policy.active_deadline_seconds is None
    assert spec.nproc_per_node is None
    assert spec.checkpoint.enabled is True
    assert spec.resource_unit == "pods"
    assert spec.slots_per_worker == 1
    assert job.metadata.namespace == "lattice"
    assert job.status is None
    assert job.current_status().phase == "Pending"


def test_namespace_defaults_to_default() -> None:
    (job,) = load_documents(DOC.replace(", namespace: lattice", ""))
    assert job.namespace == "default"
    assert job.job_id == "default.example-job"


FULL = """
apiVersion: breezeml.ai/v1
kind: TrainingJob
metadata:
  name: full
  labels: {team: vision}
spec:
  minSize: 2
  maxSize: 8
  priority: 5
  framework: generic
  injectLattice: false
  nprocPerNode: gpu
  resourceUnit: nvidia.com/gpu
  runPolicy: {backoffLimit: 2, activeDeadlineSeconds: 3600, ttlSecondsAfterFinished: 60,
              cleanPodPolicy: All}
  checkpoint: {every: 300s, keep: 3}
  replicaSpecs:
    template:
      metadata: {annotations: {sidecar.istio.io/inject: "false"}}
      spec:
        nodeSelector: {pool: gpu}
        tolerations: [{key: gpu, operator: Exists}]
        volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
        containers:
          - name: sidecar
            image: busybox
          - name: trainingjob
            image: repo/train:1
            command: [torchrun-free, train.py]
            args: ["--epochs", "3"]
            workingDir: /work
            env:
              - {name: EPOCHS, value: 3}
              - name: KEY
                valueFrom: {secretKeyRef: {name: s3, key: key}}
            resources: {limits: {nvidia.com/gpu: 2, cpu: "8"}, requests: {memory: 16Gi}}
            volumeMounts: [{name: data, mountPath: /data}]
            securityContext: {runAsUser: 1000}
"""


def test_every_optional_field_and_unknown_pod_fields_are_kept() -> None:
    (job,) = load_documents(FULL)
    spec = job.spec
    assert (spec.priority, spec.framework, spec.inject_lattice) == (5, "generic", False)
    assert spec.nproc_per_node == "gpu"
    assert spec.run_policy.model_dump() == {
        "backoff_limit": 2,
        "active_deadline_seconds": 3600,
        "ttl_seconds_after_finished": 60,
        "clean_pod_policy": "All",
    }
    assert spec.checkpoint.every_seconds == 300 and spec.checkpoint.every_steps is None
    assert spec.checkpoint.keep == 3
    # The container named "trainingjob" is the training one, wherever it is in the list.
    assert job.training_container.name == "trainingjob"
    assert spec.slots_per_worker == 2  # nvidia.com/gpu: 2 per worker
    env = job.training_container.env
    assert env[0].value == "3"  # YAML int turned into the string Kubernetes wants
    assert env[1].value_from == {"secretKeyRef": {"name": "s3", "key": "key"}}

    template = job.to_dict()["spec"]["replicaSpecs"]["template"]
    assert template["metadata"] == {"annotations": {"sidecar.istio.io/inject": "false"}}
    pod = template["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "data"}
    trainer = pod["containers"][1]
    assert trainer["securityContext"] == {"runAsUser": 1000}
    assert trainer["workingDir"] == "/work"
    assert trainer["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # Nothing the user did not write is added to the template.
    assert pod["containers"][0] == {"name": "sidecar", "image": "busybox"}


def test_round_trip_through_the_wire_form_is_lossless() -> None:
    (job,) = load_documents(FULL)
    again = parse_job(job.to_dict())
    assert again == job
    assert again.to_dict() == job.to_dict()


def test_nproc_per_node_numbers_and_words() -> None:
    for raw, want in [("4", 4), (2, 2), ("AUTO", "auto"), ("cpu", "cpu")]:
        obj = load_documents(DOC)[0].to_dict()
        obj["spec"]["nprocPerNode"] = raw
        assert parse_job(obj).spec.nproc_per_node == want


def test_checkpoint_every_steps() -> None:
    obj = load_documents(DOC)[0].to_dict()
    obj["spec"]["checkpoint"] = {"every": 100}
    policy = parse_job(obj).spec.checkpoint
    assert policy.every == "100" and policy.every_steps == 100 and policy.every_seconds is None


def test_cpu_resource_unit_rounds_fractional_requests_up() -> None:
    obj = load_documents(DOC)[0].to_dict()
    obj["spec"]["resourceUnit"] = "cpu"
    obj["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["resources"] = {
        "requests": {"cpu": "1500m"}
    }
    assert parse_job(obj).spec.slots_per_worker == 2


def test_api_versions_constant() -> None:
    assert API_VERSIONS == ("exabits.ai/v1", "breezeml.ai/v1")
    assert TrainingJob.model_fields["api_version"].alias == "apiVersion"


def test_job_id_is_unambiguous_and_names_the_instance() -> None:
    def job(ns: str, name: str, uid: str | None = None):  # type: ignore[no-untyped-def]
        (j,) = load_documents(DOC.replace("example-job", name).replace("lattice\n", ns + "\n"))
        obj = j.to_dict()
        obj["metadata"].update(namespace=ns, **({"uid": uid} if uid else {}))
        return parse_job(obj)

    # namespace-name would give "a-b-c" for both; a namespace has no dots, so these differ.
    assert job("a-b", "c").job_id != job("a", "b-c").job_id
    first = job("team", "bert", "6F1C2D3E-aaaa-bbbb-cccc-000000000000")
    again = job("team", "bert", "0b5e9a11-aaaa-bbbb-cccc-000000000000")
    assert first.job_id == "team.bert.6f1c2d3e"
    assert first.job_id != again.job_id  # re-created under the same name: not the same data
    assert valid_job_id(first.job_id)
