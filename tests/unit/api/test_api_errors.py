"""Bad TrainingJobs: one line that names the field and the fix; nothing accepted silently."""

from __future__ import annotations

import json

import pytest

from lattice.api import load_documents
from lattice.common.errors import UserError

DOC = """
apiVersion: exabits.ai/v1
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


def error_of(text: str) -> str:
    with pytest.raises(UserError) as info:
        load_documents(text)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("old", "new", "field", "fix"),
    [
        ("minSize: 1", "minSize: 4", "spec.minSize: 4 is larger than maxSize (3)", "lower minSize"),
        ("minSize: 1", "minSize: -1", "spec.minSize: -1 is below 1", "at least 1"),
        ("maxSize: 3", "maxSize: 0", "spec.maxSize: 0 is below 1", "at least 1"),
        ("maxSize: 3", "maxSize: three", "spec.maxSize: must be a whole number", "write a number"),
        ("  minSize: 1\n", "", "spec.minSize: is required", "add it"),
        (
            'command: ["python", "-u", "main.py"]',
            "command: []",
            "spec.replicaSpecs.template.spec.containers[0].command: is empty",
            "set the training command",
        ),
        (
            '            command: ["python", "-u", "main.py"]\n',
            "",
            "spec.replicaSpecs.template.spec.containers[0].command: is empty",
            "set the training command",
        ),
        (
            "            image: exabits/lattice-resnet\n",
            "",
            "spec.replicaSpecs.template.spec.containers[0].image: is required",
            "add it",
        ),
        (
            "containers:",
            "containers: []\n        unused:",
            "spec.replicaSpecs.template.spec.containers: is empty",
            "add the training container",
        ),
        (
            "exabits.ai/v1",
            "exabits.ai/v2",
            "apiVersion: 'exabits.ai/v2' is not a TrainingJob apiVersion",
            "use exabits.ai/v1",
        ),
        ("kind: TrainingJob", "kind: PyTorchJob", "kind: 'PyTorchJob'", "use kind: TrainingJob"),
        ("name: example-job", "name: Example_Job", "metadata.name: 'Example_Job'", "lowercase"),
        ("namespace: lattice", "namespace: LAT", "metadata.namespace: 'LAT'", "lowercase"),
        (
            "maxSize: 3",
            "maxSize: 3\n  priorty: 1",
            "spec.priorty: is not a known field",
            "spelling",
        ),
        ("maxSize: 3", "maxSize: 3\n  nprocPerNode: 0", "spec.nprocPerNode: 0 is below 1", "auto"),
        ("maxSize: 3", "maxSize: 3\n  framework: jax", "spec.framework: 'jax'", "generic"),
        (
            "maxSize: 3",
            "maxSize: 3\n  checkpoint: {every: 5m}",
            "spec.checkpoint.every: '5m' is not a checkpoint interval",
            '"Ns" for every N seconds',
        ),
        (
            "maxSize: 3",
            "maxSize: 3\n  runPolicy: {cleanPodPolicy: Some}",
            "spec.runPolicy.cleanPodPolicy: 'Some' is not allowed",
            "'All'",
        ),
        (
            "maxSize: 3",
            "maxSize: 3\n  runPolicy: {backoffLimit: -1}",
            "spec.runPolicy.backoffLimit",
            "0",
        ),
        (
            "maxSize: 3",
            "maxSize: 3\n  resourceUnit: nvidia.com/gpu",
            "spec.resourceUnit: is 'nvidia.com/gpu' but no container asks for nvidia.com/gpu",
            "resources.limits",
        ),
        ("maxSize: 3", "maxSize: 3\n  resourceUnit: memory", "spec.resourceUnit", "pods, cpu"),
    ],
)
def test_error_names_field_and_fix(old: str, new: str, field: str, fix: str) -> None:
    assert old in DOC
    message = error_of(DOC.replace(old, new, 1))
    assert message.startswith("trainingjob ")
    assert field in message
    assert "(fix: " in message and fix in message.split("(fix: ", 1)[1]


def test_worker_names_must_fit_a_dns_label() -> None:
    message = error_of(DOC.replace("example-job", "a" * 60).replace("maxSize: 3", "maxSize: 100"))
    assert "metadata.name: is too long for worker pod names" in message
    assert "at most 53 characters" in message  # 63 - len("-worker-") - len("99")


def test_several_problems_are_reported_on_one_line() -> None:
    message = error_of(
        DOC.replace("minSize: 1", "minSize: x").replace("kind: TrainingJob", "kind: X")
    )
    assert "spec.minSize" in message and "kind:" in message and ";" in message


def test_invalid_yaml_says_where() -> None:
    message = error_of("apiVersion: exabits.ai/v1\nspec: [unclosed\n")
    assert message.startswith("invalid YAML at line ")
    assert "(fix: " in message


def test_non_mapping_and_empty_documents() -> None:
    assert "expected a TrainingJob mapping" in error_of("- just\n- a list\n")
    assert "no TrainingJob found" in error_of("---\n")


def test_multi_document_yaml_json_and_list_kinds() -> None:
    second = DOC.replace("example-job", "second-job")
    jobs = load_documents(DOC + "---\n" + second)
    assert [j.name for j in jobs] == ["example-job", "second-job"]
    as_json = json.dumps([jobs[0].to_dict(), jobs[1].to_dict()], indent="\t")
    assert [j.name for j in load_documents(as_json)] == ["example-job", "second-job"]
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": [jobs[1].to_dict()]})
    assert [j.name for j in load_documents(listed)] == ["second-job"]


def test_errors_in_a_later_document_name_it() -> None:
    bad = DOC.replace("minSize: 1", "minSize: 9")
    message = error_of(DOC + "---\n" + bad)
    assert message.startswith("trainingjob example-job: spec.minSize: 9 is larger")


def test_user_error_exit_code_is_the_cli_one() -> None:
    with pytest.raises(UserError) as info:
        load_documents("kind: TrainingJob\n")
    assert info.value.exit_code == 2
