"""Hostile input: specs, `lattice run` flags and HTTP requests that try to break Lattice.

Whatever arrives, the answer is a clear refusal (a one-line `UserError`, exit code 2, an HTTP
4xx), produced in bounded time, and the services keep serving: after every batch they answer
`/healthz` and a normal authorized request. Nothing is ever written outside the checkpoint
service's data directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import socket
import string
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.api import TrainingJob, load_documents
from lattice.checkpoint.server import create_app as checkpoint_app
from lattice.common.auth import new_admin_token
from lattice.common.errors import UserError
from lattice.common.http import BackgroundService
from lattice.operator.local.api import create_app as local_api_app
from lattice.operator.local.plane import ControlPlane, PlaneConfig
from lattice.rendezvous.server import create_app as rendezvous_app

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_TEXT = (REPO / "examples" / "example-job.yaml").read_text()
EXAMPLE = yaml.safe_load(EXAMPLE_TEXT)
MAX_MESSAGE = 4000  # characters in one error message
PER_INPUT_S = 10.0  # seconds one input may take to be accepted or refused (2 busy cores)
WAIT_S = 10.0  # the longest any single wait here may take
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CASES: Counter[str] = Counter()  # cases run, by group (printed at the end of the module)


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    print(f"\nhostile input cases: {total} {dict(sorted(CASES.items()))}")


# ======================================================================= TrainingJob specs


def check_spec(text: str, group: str) -> list[TrainingJob] | str:
    """Jobs, or the `UserError` message: one line, bounded, quickly; nothing else escapes."""
    CASES[group] += 1
    start = time.monotonic()
    try:
        jobs = load_documents(text)
    except UserError as exc:
        message = str(exc)
        assert message, "an empty error message"
        assert len(message) < MAX_MESSAGE, f"a {len(message)}-character message: {message[:300]}"
        assert "\n" not in message and "\r" not in message, f"not one line: {message[:300]!r}"
        assert exc.exit_code == 2
        result: list[TrainingJob] | str = message
    else:
        assert isinstance(jobs, list) and jobs
        assert all(isinstance(j, TrainingJob) for j in jobs)
        CASES[f"{group} (accepted)"] += 1
        result = jobs
    took = time.monotonic() - start
    assert took < PER_INPUT_S, f"took {took:.1f} s"
    return result


SPICY = [
    "",
    "0",
    "-1",
    "1e999999",
    "-1e999999",
    "9" * 5000,
    "1" * 5000 + "Ki",
    "NaN",
    ".inf",
    "~",
    "null",
    "auto",
    "gpu",
    "2024-13-45",
    "*alias",
    "&anchor",
    "!!binary",
    "!!python/object/apply:os.system",
    "---",
    "...",
    "{{",
    "- -",
    ": :",
    "#",
    "\x00",
    "\u202e",
    "a\nb",
    "x" * 10_000,
    "../../etc/passwd",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(SPICY)
)
KEYS = ["apiVersion", "kind", "metadata", "name", "namespace", "spec", "minSize", "maxSize"]
trees = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=30,
)


def as_json(tree: Any) -> str:
    return json.dumps(tree)


def as_yaml(tree: Any) -> str:
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)


@FUZZ
@given(st.text(max_size=2000))
def test_any_text_is_jobs_or_one_clear_error(text: str) -> None:
    check_spec(text, "spec: any text")


@FUZZ
@given(trees, st.booleans())
def test_any_json_or_yaml_tree_is_jobs_or_one_clear_error(tree: Any, yaml_form: bool) -> None:
    check_spec(as_yaml(tree) if yaml_form else as_json(tree), "spec: any tree")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(doc: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "drop":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif isinstance(parent, dict):  # add a sibling field with a random name
        parent[str(value)[:40] or "x"] = value
    else:
        parent.append(value)
    return doc


@FUZZ
@given(st.data(), st.booleans())
def test_mutated_example_job_is_a_job_or_one_clear_error(data: Any, yaml_form: bool) -> None:
    doc = copy.deepcopy(EXAMPLE)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
        op = data.draw(st.sampled_from(["drop", "replace", "add"]), label="op")
        doc = _mutate(doc, path, op, data.draw(trees, label="value"))
    check_spec(as_yaml(doc) if yaml_form else as_json(doc), "spec: mutated example")


def _billion_laughs(levels: int = 9) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        text += f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
    return text


def _in_container(line: str) -> str:
    return EXAMPLE_TEXT.replace("            command:", f"            {line}\n            command:")


HOSTILE_SPECS = {
    "billion laughs": (_billion_laughs(), "more than 100000 values"),
    "billion laughs inside a job": (
        EXAMPLE_TEXT.replace("kind: TrainingJob", _billion_laughs() + "kind: TrainingJob"),
        "more than 100000 values",
    ),
    "recursive alias (list)": ("a: &a [*a]\n", "nests deeper"),
    "recursive alias (mapping)": ("&a {x: *a}\n", "nests deeper"),
    "10k-deep JSON list": ("[" * 10_000 + "]" * 10_000, "nests deeper"),
    "10k-deep JSON object": ('{"a":' * 10_000 + "1" + "}" * 10_000, "nests deeper"),
    "10k-deep YAML flow": ("a: " + "[" * 10_000 + "]" * 10_000, "nests deeper"),
    "3k-deep YAML block": ("".join("  " * i + "- \n" for i in range(3000)), "nests deeper"),
    "5000-digit number (YAML)": (
        EXAMPLE_TEXT.replace("maxSize: 3", "maxSize: " + "9" * 5000),
        "invalid value",
    ),
    "5000-digit number (JSON)": ('{"spec": {"minSize": ' + "9" * 5000 + "}}", "invalid value"),
    "1e999999 as size": (EXAMPLE_TEXT.replace("maxSize: 3", "maxSize: 1e999999"), "maxSize"),
    "1e999999 quantity": (_in_container("resources: {limits: {cpu: 1e999999}}"), "cpu"),
    "1E999999999999999999 quantity": (
        _in_container('resources: {limits: {memory: "1E999999999999999999"}}'),
        "memory",
    ),
    "5000-digit quantity": (
        _in_container('resources: {limits: {cpu: "' + "9" * 5000 + 'Ki"}}'),
        "cpu",
    ),
    "1 MB name": (EXAMPLE_TEXT.replace("name: example-job", "name: " + "a" * 1_000_000), "name"),
    "name with a newline": (EXAMPLE_TEXT.replace("name: example-job", 'name: "a\\nb"'), "name"),
    "100 kB kind": (EXAMPLE_TEXT.replace("kind: TrainingJob", "kind: " + "K" * 100_000), "kind"),
    "100 kB apiVersion": (
        EXAMPLE_TEXT.replace('"exabits.ai/v1"', "v" * 100_000),
        "apiVersion",
    ),
    "100 kB namespace": (
        EXAMPLE_TEXT.replace("namespace: lattice", "namespace: " + "n" * 100_000),
        "namespace",
    ),
    "100 kB nprocPerNode": (
        EXAMPLE_TEXT.replace("maxSize: 3", "maxSize: 3\n  nprocPerNode: " + "q" * 100_000),
        "nprocPerNode",
    ),
    "100 kB field name": (
        EXAMPLE_TEXT.replace("maxSize: 3", "maxSize: 3\n  " + "k" * 100_000 + ": 1"),
        "",
    ),
    "100 kB JSON field name": ('{"' + "k" * 100_000 + '": 1}', "required"),
    "100 kB YAML tag": ("!" + "x" * 100_000 + " a\n", "invalid YAML"),
    "100 kB duplicate container name": (
        EXAMPLE_TEXT.replace(
            "          - name: trainingjob",
            f"          - name: {'c' * 100_000}\n            image: a\n            command: [a]\n"
            f"          - name: {'c' * 100_000}",
        ),
        "container",
    ),
    "every field wrong": (
        "\n".join(f"{k}: [1]" for k in ("apiVersion", "kind", "metadata", "spec"))
        + "\nextra: "
        + "z" * 50_000,
        "",
    ),
    "python object tag": ("!!python/object/apply:os.system ['echo hi']\n", "invalid YAML"),
    "invalid date": (EXAMPLE_TEXT.replace("minSize: 1", "minSize: 2024-13-45"), "invalid value"),
    "NUL byte": (EXAMPLE_TEXT + "\x00", "invalid YAML"),
    "unhashable key": ("? [a, b]\n: c\n", "invalid YAML"),
    "List whose items is not a list": ('{"kind": "List", "items": 5}', "items"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SPECS))
def test_hostile_spec_is_refused_clearly(case: str) -> None:
    text, says = HOSTILE_SPECS[case]
    result = check_spec(text, "spec: targeted")
    assert isinstance(result, str), f"{case} was accepted"
    assert says in result, result[:300]


def test_many_documents_and_huge_strings_stay_bounded() -> None:
    jobs = check_spec("---\n".join([EXAMPLE_TEXT] * 500), "spec: targeted")
    assert isinstance(jobs, list) and len(jobs) == 500
    check_spec(EXAMPLE_TEXT.replace("lattice-resnet", "x" * 1_000_000), "spec: targeted")


# ======================================================================= `lattice run` flags

RUN_FLAGS = [
    "--nnodes",
    "--nproc-per-node",
    "--nproc_per_node",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
    "--rdzv-conf",
    "--standalone",
    "--max-restarts",
    "--monitor-interval",
    "--role",
    "-m",
    "--module",
    "--no-python",
    "--run-path",
    "--local-ranks-filter",
    "--master-addr",
    "--master-port",
    "--shutdown-timeout",
    "--token",
    "--node-id",
    "--checkpoint-endpoint",
    "--bogus",
    "-x",
    "--",
    "-",
]
FLAG_VALUES = [
    "3:2",
    "0:2",
    "1:",
    ":",
    "a:b",
    "1:2:3",
    "-1",
    "0",
    "1",
    "99999999999999999999",
    "host:99999",
    "host:0",
    "[::1",
    "[zz::1]:80",
    "http://",
    "a b",
    "h:1",
    "settle",
    "settle=-1",
    "settle=nan",
    "=",
    "prewarm=maybe",
    "BAD ID!",
    "\x00",
    "",
]
flag_tokens = (
    st.sampled_from(RUN_FLAGS)
    | st.sampled_from(FLAG_VALUES)
    | st.builds(lambda f, v: f"{f}={v}", st.sampled_from(RUN_FLAGS), st.sampled_from(FLAG_VALUES))
    | st.text(string.printable, max_size=12)
)


@pytest.fixture
def lattice_cli(monkeypatch: pytest.MonkeyPatch, clean_env: dict[str, str], tmp_path: Path) -> Any:
    """``lattice ARGS`` in-process (click's CliRunner isolation), training never started: a
    command line that parses runs a dry agent that only checks the script exists."""
    import os

    import lattice.agent.entry as entry
    from lattice.cli import main

    for key in list(os.environ):
        if key.startswith("PET_"):
            monkeypatch.delenv(key)

    class DryAgent(entry.Agent):
        async def run(self) -> int:
            self._check_program()
            return 0

    monkeypatch.setattr(entry, "Agent", DryAgent)
    monkeypatch.setattr(entry, "configure_logging", lambda: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    runner = CliRunner()

    def invoke(args: list[str]) -> tuple[int, str]:
        start = time.monotonic()
        with runner.isolation() as (out, err, _):
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            else:
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
        assert time.monotonic() - start < PER_INPUT_S
        return code, out.getvalue().decode() + err.getvalue().decode()

    return invoke


def _assert_clean_refusal(code: int, output: str, args: list[str]) -> None:
    assert "Traceback" not in output, f"{args}: {output}"
    assert code in (0, 2), f"{args} exited {code}: {output}"
    if code == 2:
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lattice: error: "), f"{args}: {output}"
        assert len(lines[0]) < MAX_MESSAGE


@FUZZ
@given(st.lists(flag_tokens, max_size=8), st.sampled_from([[], ["train.py"], ["missing.py"]]))
def test_lattice_run_with_garbage_flags_exits_2_with_one_line(
    lattice_cli: Any, flags: list[str], script: list[str]
) -> None:
    CASES["cli: garbage flags"] += 1
    args = ["run", *flags, *script]
    code, output = lattice_cli(args)
    _assert_clean_refusal(code, output, args)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nnodes", "3:2", "train.py"], "MIN (3) is larger than MAX (2)"),
        (["--nnodes", "0:2", "train.py"], "at least 1"),
        (["--nnodes", "a:b", "train.py"], "invalid --nnodes"),
        (["--nproc-per-node", "0", "train.py"], "at least 1"),
        (["--max-restarts", "-1", "train.py"], "--max-restarts"),
        (["--rdzv-conf", "settle", "train.py"], "--rdzv-conf"),
        (["--rdzv-backend", "zookeeper", "train.py"], "--rdzv-backend"),
        (
            ["--nnodes", "1:2", "--rdzv-endpoint", "host:99999", "--rdzv-id", "j", "train.py"],
            "port",
        ),
        (["--nnodes", "1:2", "--rdzv-endpoint", "[::1", "--rdzv-id", "j", "train.py"], "HOST:PORT"),
        (["--nnodes", "1:2", "--rdzv-endpoint", "a b:1", "--rdzv-id", "j", "train.py"], "HOST"),
        (["--nnodes", "1:2", "--rdzv-endpoint", "h:1", "train.py"], "--rdzv-id is required"),
        (["--nnodes", "1:2", "train.py"], "--rdzv-endpoint"),
        (["--rdzv-id", "BAD ID!", "train.py"], "invalid --rdzv-id"),
        (["--checkpoint-endpoint", "nohost", "train.py"], "--checkpoint-endpoint"),
        (["--module", "--no-python", "x"], "cannot be combined"),
        ([], "missing the training script"),
        (["--nproc-per-node", "2"], "missing the training script"),
        (["missing.py"], "not found"),
        (["/nonexistent/dir/train.py", "--lr", "1"], "not found"),
    ],
)
def test_lattice_run_bad_command_lines(lattice_cli: Any, args: list[str], says: str) -> None:
    CASES["cli: targeted"] += 1
    code, output = lattice_cli(["run", *args])
    _assert_clean_refusal(code, output, args)
    assert code == 2 and says in output, output


def test_lattice_unknown_command_is_a_usage_error(lattice_cli: Any) -> None:
    CASES["cli: targeted"] += 1
    code, output = lattice_cli(["no-such-command", "--x"])
    assert code == 2 and "Traceback" not in output
    assert "Usage:" in output and "No such command" in output


# ======================================================================= HTTP services


@dataclass
class World:
    token: str
    rdzv: str  # base URLs
    ckpt: str
    local: str
    sandbox: Path  # parent of the checkpoint data directory
    data: Path
    client: httpx.Client
    routes: dict[str, list[tuple[str, str]]]  # "rdzv"/"ckpt" → (method, route) of the served app
    step: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def outside_files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.sandbox))
            for p in self.sandbox.rglob("*")
            if p.is_file() and self.data not in p.parents
        )

    def assert_healthy(self) -> None:
        """Every service answers health and a normal authorized request, quickly."""
        c, h = self.client, self.auth
        for base in (self.rdzv, self.ckpt, self.local):
            assert c.get(f"{base}/healthz").json()["status"] == "ok"
        assert c.get(f"{self.rdzv}/v1/jobs/health-job", headers=h).status_code == 200
        assert c.put(f"{self.rdzv}/v1/jobs/health-job/kv/k", content=b"v", headers=h).is_success
        self.step += 1
        url = f"{self.ckpt}/v1/jobs/health-job/checkpoints/{self.step}"
        info = c.put(f"{url}/shards/model", content=b"weights", headers=h)
        assert info.status_code == 201, info.text
        commit = c.post(f"{url}/commit", json={"shards": {"model": info.json()}}, headers=h)
        assert commit.status_code == 201, commit.text
        assert c.get(f"{url}/shards/model", headers=h).content == b"weights"
        assert c.get(f"{self.local}/v1/slots", headers=h).json() == {"slots": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    token = new_admin_token()
    sandbox = tmp_path_factory.mktemp("hostile")
    (sandbox / "sentinel.txt").write_text("outside the data dir")
    data = sandbox / "data"
    plane = ControlPlane(PlaneConfig(home=tmp_path_factory.mktemp("home"), slots=2))
    plane.token = token
    apps = {
        "rdzv": rendezvous_app(token, settle_s=0.0, lease_s=2.0),
        "ckpt": checkpoint_app(token, str(data), keep=2),
        "local": local_api_app(plane),
    }
    services = [BackgroundService(lambda app=app: app) for app in apps.values()]
    for svc in services:
        svc.start()
    urls = [f"http://{svc.endpoint}" for svc in services]
    routes = {
        name: sorted({(r.method, r.resource.canonical) for r in app.router.routes() if r.resource})
        for name, app in apps.items()
    }
    try:
        with httpx.Client(timeout=httpx.Timeout(WAIT_S)) as client:
            w = World(token, *urls, sandbox=sandbox, data=data, client=client, routes=routes)
            w.assert_healthy()
            yield w
            assert w.outside_files() == ["sentinel.txt"]
            assert _odd_names(data) == []
    finally:
        for svc in services:
            svc.stop()
        plane.store.close()


def _fill(route: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: values.get(m.group(1), "x"), route)


def _raw(
    world: World, base: str, data: bytes, *, shut: bool = False, until_eof: bool = False
) -> tuple[int | None, bytes]:
    """Send exactly ``data``; return the first response's status (None: closed without one).

    Reads until that response is complete (the service may linger to drain a body it did not
    want), or until the connection closes with ``until_eof``."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while not (not until_eof and _complete(out)) and (chunk := s.recv(65536)):
                out += chunk
        except ConnectionResetError:
            pass
    if not out:
        return None, out
    status_line = out.split(b"\r\n", 1)[0].split()
    return int(status_line[1]), out


def _complete(out: bytes) -> bool:
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def _request(method: str, path: str, token: str, extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    return (head + extra + "Connection: close\r\n\r\n").encode() + body


json_bodies = (
    trees.map(lambda t: json.dumps(t).encode())
    | st.binary(max_size=300)
    | st.fixed_dictionaries(
        {},
        optional={
            k: scalars | trees
            for k in (
                "node_id",
                "join_id",
                "nproc",
                "addr",
                "port",
                "min_nodes",
                "max_nodes",
                "generation",
                "members",
                "size",
                "detail",
                "wait_s",
                "shards",
                "meta",
                "keep",
            )
        },
    ).map(lambda d: json.dumps(d).encode())
)


def _harmless_wait(text: str) -> bool:
    """A wait_s that cannot park a long-poll for long (so each case stays fast)."""
    try:
        value = float(text)
    except ValueError:
        return True
    return not 0.01 < value <= 60


@FUZZ
@given(data=st.data())
def test_malformed_bodies_and_queries_never_break_a_service(world: World, data: Any) -> None:
    CASES["http: random body/query"] += 1
    which = data.draw(st.sampled_from(["rdzv", "ckpt"]), label="service")
    method, route = data.draw(st.sampled_from(world.routes[which]), label="route")
    fill = {"job": "fuzz-job", "generation": "1", "key": "k", "step": "3", "name": "model"}
    path = _fill(route, fill)
    body = data.draw(json_bodies, label="body")
    params = {}
    if method == "GET":
        params = {
            "wait_s": data.draw(st.text(max_size=10).filter(_harmless_wait), label="wait_s"),
            "node_id": data.draw(st.text(max_size=20), label="node_id"),
        }
    headers = {**world.auth, "Content-Type": "application/json"}
    if data.draw(st.booleans(), label="sha header"):
        headers["X-Lattice-SHA256"] = data.draw(st.text(string.hexdigits, max_size=64))
    base = world.rdzv if which == "rdzv" else world.ckpt
    r = world.client.request(method, base + path, content=body, params=params, headers=headers)
    assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400 and method != "HEAD":
        assert "error" in r.json()


# What each path name may be (docs/checkpoint.md, docs/rendezvous.md), as whole-string rules.
RULES = {
    "job": re.compile(r"[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?"),
    "name": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"),
    "step": re.compile(r"[0-9]{1,12}"),
    "key": re.compile(r"[A-Za-z0-9._:/-]{1,256}"),
}


def _odd_names(root: Path) -> list[str]:
    """Entries under ``root`` whose names are not plain [A-Za-z0-9._-] (newlines, NULs …)."""
    plain = re.compile(r"[A-Za-z0-9._-]+")
    return [str(p) for p in root.rglob("*") if not plain.fullmatch(p.name)]


names = st.text(st.characters(exclude_categories=["Cs"]), max_size=300) | st.sampled_from(
    ["..", ".", "...", "/", "//", "~", "a/../b", "..\\..\\x", "\x00", "a\x00b", "CON", "-", ""]
)


@FUZZ
@given(data=st.data())
def test_random_path_names_are_4xx_and_stay_inside_the_data_dir(world: World, data: Any) -> None:
    CASES["http: random path names"] += 1
    which = data.draw(st.sampled_from(["rdzv", "ckpt"]), label="service")
    method, route = data.draw(st.sampled_from(world.routes[which]), label="route")
    if route in ("/healthz", "/readyz", "/metrics"):
        return
    raw: dict[str, str] = {}
    values: dict[str, str] = {}
    exact = True  # every name reaches the service as drawn (no '/' or dot segment rewritten)
    for var in re.findall(r"\{(\w+)", route):
        raw[var] = data.draw(names, label=var)
        if data.draw(st.booleans(), label=f"{var} percent-encoded"):
            values[var] = quote(raw[var], safe="").replace(".", "%2E")
        else:
            values[var] = quote(raw[var], safe="/")
            exact = exact and "/" not in raw[var] and raw[var] not in (".", "..")
    path = _fill(route, values)
    base = world.rdzv if which == "rdzv" else world.ckpt
    params = {"wait_s": "0"} if method == "GET" else {}
    r = world.client.request(method, base + path, content=b"{}", params=params, headers=world.auth)
    assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:300]}"
    if r.is_success and exact:  # accepted: every name obeys its documented rule
        for var, value in raw.items():
            if var in RULES:
                assert RULES[var].fullmatch(value), f"{var} {value!r} accepted"
                dots = ".." in value.split("/") if var == "key" else ".." in value
                assert not dots, f"{var} {value!r} accepted"
    assert world.outside_files() == ["sentinel.txt"]
    assert _odd_names(world.data) == []


def test_services_healthy_after_the_random_batches(world: World) -> None:
    world.assert_healthy()


TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".",
    "%2F",
    "..%2F..%2F{m}",
    "%2e%2e%2f%2e%2e%2f{m}",
    "%2Ftmp%2F{m}",
    "%2F{m}",
    "a%00b",
    "%00",
    "..%5C..%5C{m}",
    "~",
    "%C2%B2",
    "a" * 300,
    "a" * 5000,
]


def test_path_traversal_in_job_step_and_shard_names(world: World) -> None:
    marker = f"lattice-escape-{uuid.uuid4().hex[:8]}"
    before = world.outside_files()
    statuses = Counter()
    for raw in TRAVERSALS:
        bad = raw.replace("{m}", marker)
        for template in (
            "/v1/jobs/{x}/checkpoints/1/shards/model",
            "/v1/jobs/job-t/checkpoints/{x}/shards/model",
            "/v1/jobs/job-t/checkpoints/1/shards/{x}",
            "/v1/jobs/job-t/checkpoints/{x}/commit",
            "/v1/jobs/{x}/checkpoints",
            "/v1/jobs/job-t/checkpoints/1/shards/../../{x}",
        ):
            path = template.replace("{x}", bad)
            for method, body in (("PUT", b"escaped!"), ("GET", b""), ("POST", b"{}")):
                extra = f"Content-Length: {len(body)}\r\n"
                status, out = _raw(
                    world, world.ckpt, _request(method, path, world.token, extra, body)
                )
                CASES["http: traversal"] += 1
                assert status is not None and 400 <= status < 500, f"{method} {path}: {out[:300]!r}"
                statuses[status] += 1
        for template in ("/v1/jobs/{x}/kv/k", "/v1/jobs/job-t/kv/{x}", "/v1/jobs/{x}/join"):
            path = template.replace("{x}", bad)
            status, out = _raw(
                world, world.rdzv, _request("PUT", path, world.token, "Content-Length: 1\r\n", b"v")
            )
            CASES["http: traversal"] += 1
            key = unquote(bad)
            if "/kv/{x}" in template and status == 200:  # KV keys live in memory, not on disk
                assert RULES["key"].fullmatch(key) and ".." not in key.split("/"), key
                continue
            assert status is not None and 400 <= status < 500, f"PUT {path}: {out[:300]!r}"
    assert world.outside_files() == before
    for where in (world.sandbox.parent, Path(tempfile.gettempdir()), REPO, Path.cwd()):
        assert not list(where.glob(f"*{marker}*")), f"{marker} escaped into {where}"
    assert not [p for p in world.data.rglob("*") if marker in p.name]
    world.assert_healthy()


@pytest.mark.parametrize("char", ["%0A", "%0D", "%0D%0A", "%09", "%00", "%E2%80%A8"])
def test_names_with_control_characters_are_refused(world: World, char: str) -> None:
    """A trailing newline is the classic escape of a ``^...$`` pattern; nothing like it is
    accepted as a job id, shard name, step, KV key or node id, nor stored on disk."""
    tok = world.token
    cases = [
        (world.ckpt, "PUT", f"/v1/jobs/job-n{char}/checkpoints/1/shards/model"),
        (world.ckpt, "PUT", f"/v1/jobs/job-n/checkpoints/1/shards/model{char}"),
        (world.ckpt, "PUT", f"/v1/jobs/job-n/checkpoints/1{char}/shards/model"),
        (world.ckpt, "GET", f"/v1/jobs/job-n{char}/checkpoints"),
        (world.rdzv, "PUT", f"/v1/jobs/job-n{char}/kv/k"),
        (world.rdzv, "PUT", f"/v1/jobs/job-n/kv/k{char}"),
        (world.rdzv, "GET", f"/v1/jobs/job-n/rounds/1/end?node_id=n{char}"),
        (world.rdzv, "GET", f"/v1/jobs/job-n/rounds/1{char}/end"),
    ]
    for base, method, path in cases:
        status, out = _raw(world, base, _request(method, path, tok, "Content-Length: 1\r\n", b"v"))
        CASES["http: control characters in names"] += 1
        assert status in (400, 404), f"{method} {path}: {out[:300]!r}"
    assert _odd_names(world.data) == []
    world.assert_healthy()


def test_huge_bodies_are_413(world: World) -> None:
    c, h = world.client, world.auth
    join = f"{world.rdzv}/v1/jobs/big-job/join"
    one_mib = 1 << 20
    # beyond the rendezvous service's 1 MiB limit: with a length, and chunked without one
    assert c.post(join, content=b" " * (one_mib + 1024), headers=h).status_code == 413
    assert c.post(join, content=iter([b" " * (one_mib + 1024)]), headers=h).status_code == 413
    kv = f"{world.rdzv}/v1/jobs/big-job/kv/k"
    assert c.put(kv, content=iter([b"v" * (64 * 1024 + 1)]), headers=h).status_code == 413
    # declared sizes over a limit are refused before the body is read
    for base, path, size in (
        (world.rdzv, "/v1/jobs/big-job/kv/k", 10**6),
        (world.ckpt, "/v1/jobs/big-job/checkpoints/1/commit", 2 * one_mib + 1),
        (world.ckpt, "/v1/jobs/big-job/checkpoints/1/shards/m", (1 << 40) + 1),
    ):
        method = "POST" if path.endswith("commit") else "PUT"
        status, out = _raw(
            world, base, _request(method, path, world.token, f"Content-Length: {size}\r\n")
        )
        assert status == 413, out[:300]
    # beyond the checkpoint service's 4 MiB JSON limit, chunked
    commit = f"{world.ckpt}/v1/jobs/big-job/checkpoints/1/commit"
    assert c.post(commit, content=iter([b" " * (4 * one_mib + 1024)]), headers=h).status_code == 413
    apply = f"{world.local}/v1/apply"
    assert c.post(apply, content=b"#" * (4 * one_mib + 1024), headers=h).status_code == 413
    assert world.client.get(f"{world.rdzv}/v1/jobs/big-job", headers=h).json()["waiting"] == []
    assert c.get(f"{world.ckpt}/v1/jobs/big-job/checkpoints", headers=h).json()["checkpoints"] == []
    CASES["http: huge bodies"] += 9
    world.assert_healthy()


def test_deep_nesting_and_alias_bombs_over_http(world: World) -> None:
    c, h = world.client, world.auth
    deep = b"[" * 100_000 + b"]" * 100_000
    for url in (
        f"{world.rdzv}/v1/jobs/deep-job/join",
        f"{world.rdzv}/v1/jobs/deep-job/register",
        f"{world.ckpt}/v1/jobs/deep-job/checkpoints/1/commit",
        f"{world.local}/v1/slots",
    ):
        method = "PUT" if url.endswith("slots") else "POST"
        r = c.request(method, url, content=deep, headers=h)
        assert r.status_code == 400, f"{url}: {r.status_code} {r.text[:200]}"
    for text in (_billion_laughs(), "a: &a [*a]\n", deep.decode()):
        r = c.post(f"{world.local}/v1/apply", content=text, headers=h)
        assert r.status_code == 400 and len(r.text) < MAX_MESSAGE, r.text[:200]
    assert c.get(f"{world.local}/v1/trainingjobs", headers=h).json()["items"] == []
    CASES["http: nesting and bombs"] += 7
    world.assert_healthy()


def test_wrong_content_length(world: World) -> None:
    tok = world.token
    join = json.dumps(
        {
            "node_id": "n",
            "join_id": "j",
            "nproc": 1,
            "addr": "h",
            "port": 1,
            "min_nodes": 2,
            "max_nodes": 2,
        }
    ).encode()
    cases = [
        # body shorter than declared, then the client stops sending: nothing may happen
        (world.rdzv, "POST", "/v1/jobs/cl-job/join", "Content-Length: 1000\r\n", join, True),
        (
            world.ckpt,
            "PUT",
            "/v1/jobs/cl-job/checkpoints/1/shards/m",
            "Content-Length: 1000\r\n",
            b"x" * 10,
            True,
        ),
        (
            world.ckpt,
            "POST",
            "/v1/jobs/cl-job/checkpoints/1/commit",
            "Content-Length: 1000\r\n",
            b"{}",
            True,
        ),
        # body longer than declared: the rest is a malformed second request
        (world.rdzv, "POST", "/v1/jobs/cl-job/join", "Content-Length: 5\r\n", join, False),
        (
            world.ckpt,
            "POST",
            "/v1/jobs/cl-job/checkpoints/1/commit",
            "Content-Length: 3\r\n",
            b'{"shards": {}}',
            False,
        ),
        # lengths that are not lengths, and request smuggling shapes
        (world.rdzv, "POST", "/v1/jobs/cl-job/join", "Content-Length: -1\r\n", join, False),
        (world.rdzv, "POST", "/v1/jobs/cl-job/join", "Content-Length: abc\r\n", join, False),
        (
            world.rdzv,
            "POST",
            "/v1/jobs/cl-job/join",
            "Content-Length: 5\r\nContent-Length: 7\r\n",
            join,
            False,
        ),
        (
            world.ckpt,
            "PUT",
            "/v1/jobs/cl-job/checkpoints/1/shards/m",
            "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
            b"1\r\nx\r\n0\r\n\r\n",
            False,
        ),
        (
            world.ckpt,
            "PUT",
            "/v1/jobs/cl-job/checkpoints/1/shards/m",
            "Transfer-Encoding: chunked\r\n",
            b"zz\r\nx\r\n0\r\n\r\n",
            False,
        ),
    ]
    for base, method, path, extra, body, shut in cases:
        status, out = _raw(world, base, _request(method, path, tok, extra, body), shut=shut)
        CASES["http: wrong content-length"] += 1
        if shut:
            assert status is None or 400 <= status < 500, out[:300]
        else:
            assert status is not None and 400 <= status < 500, f"{path} {extra!r}: {out[:300]!r}"
    h = world.auth
    assert world.client.get(f"{world.rdzv}/v1/jobs/cl-job", headers=h).json()["waiting"] == []
    assert world.client.get(f"{world.ckpt}/v1/jobs/cl-job/checkpoints", headers=h).json() == {
        "checkpoints": []
    }
    _until_no_torn_uploads(world, "cl-job")
    world.assert_healthy()


def _until_no_torn_uploads(world: World, job: str) -> None:
    """Torn uploads are dropped once their client is gone (bounded wait)."""
    deadline = time.monotonic() + WAIT_S
    tmp = world.data / job / ".tmp"
    while tmp.exists() and any(tmp.iterdir()):
        assert time.monotonic() < deadline, f"torn uploads left: {list(tmp.iterdir())}"
        threading.Event().wait(0.02)
    assert not (world.data / job).exists() or not list((world.data / job).glob("0*/shards/*"))


def test_slow_clients_do_not_stall_the_services(world: World) -> None:
    tok = world.token
    stalled: list[socket.socket] = []
    try:
        for base in (world.rdzv, world.ckpt):
            host, port = base.removeprefix("http://").split(":")
            for i in range(10):
                s = socket.create_connection((host, int(port)), timeout=WAIT_S)
                stalled.append(s)
                if i % 2:  # half of a request line and headers, then nothing
                    s.sendall(b"POST /v1/jobs/slow-job/join HTTP/1.1\r\nHost: x\r\nAuthor")
                elif base == world.ckpt:  # headers and part of an upload, then nothing
                    s.sendall(
                        _request(
                            "PUT",
                            f"/v1/jobs/slow-job/checkpoints/1/shards/m{i}",
                            tok,
                            "Content-Length: 100000\r\n",
                            b"x" * 1000,
                        )
                    )
                else:  # headers and part of a join, then nothing
                    s.sendall(
                        _request(
                            "POST",
                            "/v1/jobs/slow-job/join",
                            tok,
                            "Content-Length: 1000\r\n",
                            b'{"node_id": ',
                        )
                    )
        start = time.monotonic()
        for _ in range(5):
            world.assert_healthy()
        took = time.monotonic() - start
        assert took < WAIT_S, f"other clients waited {took:.1f} s behind slow ones"
        CASES["http: slow clients"] += len(stalled)
    finally:
        for s in stalled:
            s.close()
    _until_no_torn_uploads(world, "slow-job")
    assert (
        world.client.get(f"{world.rdzv}/v1/jobs/slow-job", headers=world.auth).json()["waiting"]
        == []
    )
    world.assert_healthy()


def test_checkpoint_reads_and_bodies_of_the_right_length(world: World) -> None:
    """HEAD never carries a body (that would desync keep-alive connections)."""
    c, h = world.client, world.auth
    payload = b"p" * 5000
    url = f"{world.ckpt}/v1/jobs/head-job/checkpoints/1"
    info = c.put(f"{url}/shards/model", content=payload, headers=h).json()
    assert c.post(f"{url}/commit", json={"shards": {"model": info}}, headers=h).status_code == 201
    status, out = _raw(
        world,
        world.ckpt,
        _request("HEAD", "/v1/jobs/head-job/checkpoints/1/shards/model", world.token).replace(
            b"Connection: close\r\n", b""
        )
        + _request("GET", "/healthz", world.token),
        until_eof=True,
    )
    assert status == 200
    assert payload[:100] not in out and out.count(b"HTTP/1.1 200") == 2, out[:500]
    assert hashlib.sha256(payload).hexdigest().encode() in out
    CASES["http: head"] += 1
