from __future__ import annotations

import errno
import random
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lattice.addon import data, policy, protocol, runtime, service_tier, settings, state
from lattice.common.errors import UserError


def test_rng_state_survives_a_weights_only_roundtrip() -> None:
    saved = state.loads(state.dumps(state.capture_rng()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state.restore_rng(saved)
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_detached_copy_does_not_alias() -> None:
    t = torch.ones(3)
    copy = state.detached_copy({"a": [t, (t, 1)], "b": "s"})
    t.add_(1)
    assert torch.equal(copy["a"][0], torch.ones(3)) and copy["a"][1][1] == 1 and copy["b"] == "s"


@pytest.mark.parametrize(
    ("raw", "parsed"), [(None, ("auto", 0.0)), ("5", ("steps", 5.0)), ("30s", ("seconds", 30.0))]
)
def test_parse_every(raw: str | None, parsed: tuple[str, float]) -> None:
    assert settings.parse_every(raw) == parsed


@pytest.mark.parametrize("raw", ["0", "-3", "fast", "0s"])
def test_parse_every_rejects_nonsense(raw: str) -> None:
    with pytest.raises(UserError, match="LATTICE_CHECKPOINT_EVERY"):
        settings.parse_every(raw)


@pytest.mark.parametrize(("old", "new", "consumed"), [(2, 3, 12), (3, 2, 18), (2, 4, 4), (4, 1, 0)])
def test_resplit_covers_the_remainder_exactly_once(old: int, new: int, consumed: int) -> None:
    dataset = list(range(60))
    samplers = [
        torch.utils.data.distributed.DistributedSampler(dataset, new, r, shuffle=True, seed=5)
        for r in range(new)
    ]
    order = data._distributed_order(samplers[0])
    shares = [data._split(order[consumed:], s) for s in samplers]
    assert sorted(i for share in shares for i in share) == sorted(order[consumed:])
    assert len({len(s) for s in shares}) == 1


def test_autopatch_switch() -> None:
    assert not settings.autopatch_enabled({})
    assert not settings.autopatch_enabled({"LATTICE_JOB": "j", "LATTICE_AUTOPATCH": "none"})
    assert settings.autopatch_enabled({"LATTICE_JOB": "j"})
    assert protocol.SAFEPOINT_EXIT == 83


def test_the_writer_lets_go_of_a_snapshot_once_written(tmp_path: Path) -> None:
    """A written snapshot is freed at once (a GPU snapshot's pinned buffers get reused)."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    tensor = torch.ones(1000)
    alive = weakref.ref(tensor)
    rt.queue.put((1, {"state": {"t": tensor}}, None))
    del tensor
    rt.queue.join()
    assert (tmp_path / "step-000000000001" / "state.pt").exists()
    assert alive() is None


def test_the_model_saved_is_the_one_inside_torch_compile(tmp_path: Path) -> None:
    """A checkpoint's keys do not depend on ``torch.compile`` (``_orig_mod.`` prefixes): a run
    restarted without it loads. A dead ``weakref.proxy`` on the heap (torch.compile leaves
    them; ``isinstance`` on one raises ReferenceError) does not break the search."""

    class Gone:
        pass

    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    rt.optimizers.append(weakref.ref(opt))
    gone = Gone()
    dead = weakref.proxy(gone)
    del gone
    assert rt.models() == [model]
    assert list(rt.objects()["model.0"].state_dict()) == ["0.weight", "0.bias"]
    assert compiled is not None and dead is not None


def test_the_node_local_tier_never_holds_more_than_two_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In memory that counts against a pod's limit: the oldest step goes before the newest is
    written, not after (three copies of a large state at once)."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    real, beside = runtime.local_tier.save, []

    def save(path: Path, obj: object) -> None:
        beside.append(runtime.local_tier.steps(tmp_path))
        real(path, obj)

    monkeypatch.setattr(runtime.local_tier, "save", save)
    for step in range(1, 6):
        rt.queue.put((step, {"state": {"t": torch.ones(3)}}, None))
        rt.queue.join()
    assert beside == [[1], [2, 1], [3, 2], [4, 3], [5, 4]]  # the one being written, one more
    assert runtime.local_tier.steps(tmp_path) == [5, 4]


def test_a_failed_step_save_makes_room_once_the_write_in_flight_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed-step save path prunes like `_write` does, but only after the snapshot being
    written is whole (until then the oldest step may be the only whole one)."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    for step in (1, 2):
        rt.queue.put((step, {"state": {"t": torch.ones(3)}}, None))
        rt.queue.join()
    real, release, writing = runtime.local_tier.save, threading.Event(), threading.Event()

    def save(path: Path, obj: object) -> None:
        if "step-000000000003" in str(path):
            writing.set()
            assert release.wait(30)
        real(path, obj)

    monkeypatch.setattr(runtime.local_tier, "save", save)
    with rt._written:
        rt.writing.append(3)  # as `snapshot` does
    rt.queue.put((3, {"state": {"t": torch.ones(3)}}, None))
    assert writing.wait(30)
    room = threading.Thread(target=rt._room_for, args=(4,))
    room.start()
    room.join(0.2)
    assert room.is_alive()  # waiting for step 3's write
    assert runtime.local_tier.steps(tmp_path) == [3, 2]  # step 1 went before 3 was written
    release.set()
    room.join(30)
    assert not room.is_alive()
    assert runtime.local_tier.steps(tmp_path) == [3]  # room for step 4: one step beside it


def test_a_full_node_local_tier_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A container's 64 MiB /dev/shm fills at the first checkpoint: the log names the fix, the
    half-written file is gone, and training goes on (the next write is tried again)."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    real = torch.save

    def full(obj: object, out: Any) -> None:
        out.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.local_tier.torch, "save", full)
    rt.queue.put((1, {"state": {"t": torch.ones(3)}}, None))
    rt.queue.join()
    err = capsys.readouterr().err
    assert "checkpoint write failed" in err and f"node-local tier {tmp_path} is full" in err
    assert "LATTICE_LOCAL_ROOT" in err
    folder = tmp_path / "step-000000000001"
    assert [p.name for p in folder.iterdir()] == ["round"]  # no partial file left
    assert runtime.local_tier.steps(tmp_path) == [] or rt._valid(1) is None
    monkeypatch.setattr(runtime.local_tier.torch, "save", real)
    rt.queue.put((2, {"state": {"t": torch.ones(3)}}, None))
    rt.queue.join()
    assert runtime.local_tier.recorded(tmp_path / "step-000000000002" / "state.pt")


def run_auto_policy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_s: Callable[[int], float],
    until: int,
    upload_s: Callable[[int], float] | None = None,
) -> tuple[runtime.Runtime, list[int]]:
    """10 ms steps under the auto policy until it is calibrated and ``until`` snapshots were
    written; snapshot n's write takes ``write_s(n)`` and its upload ``upload_s(n)`` CPU
    seconds (a fake clock: nothing else takes time). (runtime, their steps)"""
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    rt = runtime.Runtime(tmp_path, None, ("auto", 0.0))
    writes: list[int] = []

    def write(step: int, files: object, upload: object) -> None:
        writes.append(step)
        rt.write_s.append(write_s(len(writes)))
        if upload_s is not None:
            rt.upload_s.append(upload_s(len(writes)))

    monkeypatch.setattr(rt, "_write", write)
    while len(writes) < until or not rt.calibrated:
        clock[0] += 0.010
        rt.step += 1
        rt.pending = True
        rt.boundary()
        rt.queue.join()
    return rt, writes


def test_auto_policy_sizes_the_interval_under_the_3_percent_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 ms steps, a 0.5 s write: a checkpoint every ceil(0.5 / (2.5 % of 10 ms)) = 2000 steps
    (aimed at 2.5 %: one checkpoint's cost varies ±20 % around its estimate)."""
    rt, writes = run_auto_policy(tmp_path, monkeypatch, lambda n: 0.5, until=2)
    assert rt.step == policy.CALIBRATION_STEPS
    assert writes == [1, 2] and rt.calibrated
    assert rt.cost_s == pytest.approx(0.5)  # the snapshots themselves took no time here
    assert rt.interval == 2000


def test_auto_policy_counts_the_upload_cpu_beside_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0.3 s write and 0.2 CPU-seconds of upload cost what a 0.5 s write does: 2000 steps,
    and more once the uploads turn out to take 0.7 s."""
    rt, writes = run_auto_policy(
        tmp_path, monkeypatch, lambda n: 0.3, until=4, upload_s=lambda n: 0.2 if n <= 2 else 0.7
    )
    assert rt.cost_s == pytest.approx(0.5)
    # At 2002 the uploads done are [0.2, 0.2] → 2000 again; at 4002 [0.2, 0.2, 0.7]:
    # 0.3 + 0.3667 → ceil(0.6667 / 0.00025) = 2667.
    assert writes == [1, 2, 2002, 4002]
    assert rt.interval == 2667


def test_auto_policy_follows_writes_that_turn_out_slower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibrated on 0.5 s writes (2000 steps of 10 ms), the writes then take 1.5 s: the
    interval follows the measured costs (mean of the snapshots after the first) and the next
    checkpoint comes that many steps after the last one, not at a multiple of it."""
    rt, writes = run_auto_policy(tmp_path, monkeypatch, lambda n: 0.5 if n <= 2 else 1.5, until=4)
    # 2: calibration; 2002: 2000 after it; at 2002 the costs were still [0.5] → 2000 again;
    # at 4002 they are [0.5, 1.5] → ceil(1.0 / 0.00025) = 4000.
    assert writes == [1, 2, 2002, 4002]
    assert rt.interval == 4000


def test_a_node_local_step_serves_whichever_rank_the_node_has_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank's RNG is in the node's state file: a re-ranked node restores from it."""
    monkeypatch.setenv("RANK", "1")  # this node was rank 2 when it wrote the step
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    rngs = [{"who": torch.tensor([r])} for r in range(3)]
    runtime.local_tier.save(
        runtime.local_tier.step_dir(tmp_path, 5) / "state.pt", {"step": 5, "world": 3, "rngs": rngs}
    )
    got = rt._valid(5)
    assert got is not None and torch.equal(got["rng"]["who"], torch.tensor([1]))
    assert "rngs" not in got["state"]
    monkeypatch.setenv("RANK", "3")  # the world grew: a new rank has no RNG of its own
    got = rt._valid(5)
    assert got is not None and got["rng"] is None


def test_the_next_step_waits_until_a_snapshot_interval_steps_old_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability gate: with a checkpoint every 3 steps, the snapshot of step 3 may still be
    written during steps 4 and 5, not once step 6 starts (a kill -9 loses at most 5 steps)."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 3.0))
    release = threading.Event()
    written: list[int] = []

    def write(step: int, files: object, upload: object) -> None:
        assert release.wait(30)
        written.append(step)

    monkeypatch.setattr(rt, "_write", write)

    def finish_step() -> None:
        rt.step += 1
        rt.pending = True
        rt.boundary()

    for _ in range(4):  # step 3's snapshot is taken, its write hangs; steps 4 and 5 start
        finish_step()
    assert rt.writing == [3] and written == [] and rt.waits == []
    fifth = threading.Thread(target=finish_step)  # step 5 ends: step 6 needs step 3 written
    fifth.start()
    fifth.join(0.3)
    assert fifth.is_alive(), "step 6 may start while the snapshot of step 3 is unwritten"
    release.set()
    fifth.join(30)
    assert not fifth.is_alive() and written == [3] and rt.writing == [] and len(rt.waits) == 1


@pytest.mark.parametrize("colocated", [False, True])
def test_an_upload_records_the_cpu_it_took_on_its_thread(tmp_path: Path, colocated: bool) -> None:
    """The policy counts an upload's CPU time (see `test_auto_policy_counts_the_upload_cpu_…`):
    the upload thread measures it, waits on a remote service excluded; a service on this
    machine works on the same cores, so there the whole upload counts."""

    class Service:
        def __init__(self) -> None:
            self.colocated = colocated

        def put(self, step: int, folder: Path, names: list[str], rngs: object) -> dict:
            end = time.thread_time() + 0.05
            while time.thread_time() < end:  # reading, hashing, sending: CPU
                pass
            time.sleep(0.3)  # the service answering: no CPU here
            return {"state": step}

        def commit(self, step: int, shards: object, world: int, generation: int) -> None:
            pass

    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    rt.service = Service()  # type: ignore[assignment]
    threading.Thread(target=rt._upload_loop, daemon=True).start()
    with rt._uploads:
        rt._upload_next = (3, tmp_path, runtime._Upload(["state"], [], commit=True))
        rt._uploads.notify_all()
        assert rt._uploads.wait_for(lambda: rt.uploaded is not None, timeout=30)
    assert rt.uploaded == (3, {"state": 3})
    (cost,) = rt.upload_s
    if colocated:
        assert cost >= 0.35
    else:
        assert 0.05 <= cost < 0.3  # the 0.3 s wait is not counted


@pytest.mark.parametrize(
    ("endpoint", "colocated"),
    [
        ("127.0.0.1:9000", True),
        ("localhost:9000", True),
        ("[::1]:9000", True),
        ("http://127.0.0.2:9000", True),
        ("lattice-checkpoint.lattice.svc:9000", False),
        ("10.255.255.7:9000", False),
        ("https://ckpt.example.com", False),
    ],
)
def test_a_service_on_this_machine_is_told_by_its_endpoint(endpoint: str, colocated: bool) -> None:
    assert service_tier._on_this_machine(endpoint) is colocated


def test_this_machines_own_name_and_interface_address_count_as_this_machine() -> None:
    import socket

    assert service_tier._on_this_machine(f"{socket.gethostname()}:9000")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
        except OSError:
            pytest.skip("no route off loopback: no interface address to try")
        mine = udp.getsockname()[0]
    if mine.startswith("127."):
        pytest.skip("the only route is loopback")
    assert service_tier._on_this_machine(f"http://{mine}:9000")


def test_register_takes_only_what_can_save_and_load_its_state() -> None:
    """``state_dict`` as a plain attribute (a dict some object keeps) is not a way to save."""
    from lattice.addon import api

    class Keeps:
        state_dict: dict[str, int] = {}

        def load_state_dict(self, state: dict[str, int]) -> None:
            pass

    class Saves(Keeps):
        def state_dict(self) -> dict[str, int]:  # type: ignore[override]
            return {}

    with pytest.raises(UserError, match="Keeps has no state_dict/load_state_dict"):
        api.register(Keeps())
    saves = Saves()
    assert api.register(saves) is saves and data.has_state(saves) and data.has_state(Saves)


def test_an_inner_optimizer_is_known_again_only_after_an_optimizer_is_made(
    tmp_path: Path,
) -> None:
    """`Runtime.wrapped` runs in both step hooks: its answer is kept until a making (a
    wrapper's inner optimizer may be made lazily, after the wrapper: then it is found)."""
    from lattice.addon import patches

    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))

    class Wrapper:
        def __init__(self) -> None:
            pass

        def consolidate_state_dict(self) -> None:
            pass

    class Inner:
        def __init__(self) -> None:
            pass

    patches.track_init(Wrapper, rt.optimizers, rt.optimizer_made)
    patches.track_init(Inner, rt.optimizers, rt.optimizer_made)
    wrapper = Wrapper()
    assert not rt.wrapped(wrapper)  # no inner one yet: the answer is kept ...
    wrapper.optim = Inner()  # type: ignore[attr-defined]
    assert rt.wrapped(wrapper.optim) and not rt.wrapped(wrapper)  # ... until this making
    assert rt._optimizers() == [wrapper]
    rt._inner = {id(wrapper)}  # a kept answer is used as is: nothing recomputed per call
    assert rt.wrapped(wrapper)


def test_an_iterator_routed_through_the_addon_keeps_its_signature_and_is_routed_once() -> None:
    import inspect

    from lattice.addon import patches

    calls: list[str] = []

    class Loader:
        def __iter__(self) -> Any:
            """Own docstring."""
            return iter([1, 2])

    def iterate(self: Any, original: Callable[[Any], Any]) -> Any:
        calls.append("routed")
        return original(self)

    patches.wrap_iter(Loader, iterate)
    patches.wrap_iter(Loader, iterate)
    assert list(Loader()) == [1, 2] and calls == ["routed"]
    assert Loader.__iter__.__doc__ == "Own docstring."
    assert inspect.unwrap(Loader.__iter__).__doc__ == "Own docstring."  # the original's


def test_a_step_whose_closure_failed_is_not_marked_as_cut_in_half() -> None:
    """Lightning runs forward and backward inside ``optimizer.step(closure)``: a failure there
    (a peer died in the all-reduce) leaves the parameters whole, so the step may be saved."""
    import types

    from lattice.addon import patches

    rt = types.SimpleNamespace(stepping=True)
    seen: list[bool] = []

    def closure() -> float:
        seen.append(rt.stepping)
        return 1.0

    def failing() -> float:
        raise RuntimeError("Connection reset by peer")

    args, kwargs = patches._outside_step(rt, (closure,), {})  # type: ignore[arg-type,misc]
    assert args[0]() == 1.0 and seen == [False] and rt.stepping  # the update comes next
    args, kwargs = patches._outside_step(rt, (), {"closure": failing})  # type: ignore[arg-type,misc]
    with pytest.raises(RuntimeError):
        kwargs["closure"]()
    assert not rt.stepping
    assert patches._outside_step(rt, (), {}) is None  # type: ignore[arg-type]
