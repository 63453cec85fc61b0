"""reconcile: one example per behaviour (gang start, resize, failures, limits, the end)."""

from __future__ import annotations

from _operator_world import World, make_job

from lattice.api.status import utc
from lattice.operator.core import (
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    Observed,
    SetRendezvousTarget,
    UpdateStatus,
    WorkerState,
    demand_for,
    reconcile,
)
from lattice.operator.core.reconcile import ReconcileConfig


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def reasons(world: World) -> list[str]:
    return [e.reason for e in world.events]


def test_starts_the_whole_gang_at_the_allocation() -> None:
    world = World(make_job(minSize=2))
    actions = world.step(3)
    assert [a.name for a in of(actions, CreateWorker)] == [
        "demo-worker-0",
        "demo-worker-1",
        "demo-worker-2",
    ]
    assert of(actions, SetRendezvousTarget) == [SetRendezvousTarget("lattice.demo", 3)]
    # The target goes to the rendezvous before any worker exists.
    assert isinstance(actions[0], SetRendezvousTarget)
    st = world.status
    assert (st.phase, st.target_size, st.size) == ("Pending", 3, 0)
    assert st.start_time == utc(1000.0) and st.observed_generation == 1
    assert reasons(world) == ["Admitted", "Pending"]
    world.run_all()
    world.step(3)
    assert (world.status.phase, world.status.size) == ("Running", 3)
    assert reasons(world)[-1] == "Running"
    assert world.step(3) == []


def test_not_admitted_means_no_workers_and_a_reason() -> None:
    world = World(make_job(minSize=2, maxSize=4))
    actions = world.step(0)
    assert of(actions, CreateWorker) == [] and of(actions, SetRendezvousTarget) == []
    assert world.status.phase == "Pending"
    assert world.status.message == "waiting for capacity: minSize 2 needs 2 pods"
    # An allocation below minSize is never a partial gang.
    assert of(world.step(1), CreateWorker) == []


def test_allocation_above_max_is_capped() -> None:
    world = World(make_job(maxSize=2))
    assert len(of(world.step(10), CreateWorker)) == 2
    assert world.status.target_size == 2


def test_grow_creates_the_next_indexes_and_reports_resizing() -> None:
    world = World(make_job())
    world.settle(2)
    world.now += 100
    actions = world.step(4)
    assert [a.name for a in of(actions, CreateWorker)] == ["demo-worker-2", "demo-worker-3"]
    assert of(actions, SetRendezvousTarget) == [SetRendezvousTarget("lattice.demo", 4)]
    assert world.status.phase == "Resizing"
    assert world.status.last_resize_time == utc(world.now)
    assert "Resized" in reasons(world)
    world.settle(4)
    assert world.status.phase == "Running" and world.status.size == 4


def test_shrink_deletes_highest_indexes_gracefully() -> None:
    world = World(make_job())
    world.settle(4)
    actions = world.step(2)
    deletes = of(actions, DeleteWorker)
    assert deletes == [
        DeleteWorker("demo-worker-3", graceful=True),
        DeleteWorker("demo-worker-2", graceful=True),
    ]
    assert of(actions, SetRendezvousTarget) == [SetRendezvousTarget("lattice.demo", 2)]
    assert world.names() == ["demo-worker-0", "demo-worker-1"]
    assert world.status.target_size == 2


def test_terminating_workers_are_not_deleted_twice_nor_their_names_reused() -> None:
    world = World(make_job(), slow_deletes=True)
    world.settle(3)
    world.step(2)
    assert world.workers["demo-worker-2"].deleting
    assert world.step(2) == []  # no second delete for a worker already terminating
    # Growing again while worker-2 still terminates: a fresh index, not a name clash.
    created = of(world.step(3), CreateWorker)
    assert [c.name for c in created] == ["demo-worker-3"]


def test_a_failed_worker_is_replaced_and_counted_once() -> None:
    world = World(make_job(maxSize=3))
    world.settle(3)
    world.set("demo-worker-1", "Failed", exit_code=137, message="OOMKilled")
    stale = world.observed()
    actions = world.step(3)
    assert of(actions, DeleteWorker) == [DeleteWorker("demo-worker-1", graceful=False)]
    assert [c.name for c in of(actions, CreateWorker)] == ["demo-worker-1"]
    st = world.status
    assert (st.phase, st.restarts) == ("Restarting", 1)
    assert st.worker_error == "demo-worker-1: exit code 137: OOMKilled"
    assert "WorkerFailed" in reasons(world) and "Restarting" in reasons(world)
    # A stale observation (the failed pod still listed) does not count the failure again.
    again = reconcile(world.job, stale, 3, now=world.now, services=world_services())
    status = [a.status for a in again if isinstance(a, UpdateStatus)]
    assert all(s.restarts == 1 for s in status)
    world.settle(3)
    assert world.status.phase == "Running" and world.status.restarts == 1


def world_services():  # type: ignore[no-untyped-def]
    from _operator_world import SERVICES

    return SERVICES


def test_every_worker_failing_the_same_way_is_a_user_error() -> None:
    world = World(make_job(minSize=2, maxSize=2))
    world.settle(2)
    for name in world.names():
        world.set(name, "Failed", exit_code=1, message="ZeroDivisionError: division by zero")
    actions = world.step(2)
    assert of(actions, CreateWorker) == []
    st = world.status
    assert st.phase == "Failed"
    assert st.conditions[-1].reason == "UserError"
    assert st.worker_error == "demo-worker-0: exit code 1: ZeroDivisionError: division by zero"
    assert "fix it and resubmit" in st.message
    assert st.target_size == 0 and st.completion_time == utc(world.now)
    assert world.step(2) == []


def test_the_same_failure_backoff_limit_times_is_a_user_error() -> None:
    world = World(make_job(minSize=1, maxSize=1, runPolicy={"backoffLimit": 3}))
    world.settle(1)
    for attempt in range(1, 4):
        world.set("demo-worker-0", "Failed", exit_code=2, message="No such file: data.csv")
        world.step(1)
        if attempt < 3:
            assert world.status.phase == "Restarting"
            world.settle(1)
    st = world.status
    assert st.phase == "Failed" and st.conditions[-1].reason == "UserError"
    assert st.last_failure is not None and st.last_failure.count == 3
    assert "No such file: data.csv" in (st.worker_error or "")


def test_restart_limit_fails_the_job() -> None:
    world = World(make_job(minSize=1, maxSize=2, runPolicy={"backoffLimit": 2}))
    world.settle(2)
    for attempt in range(3):
        world.set("demo-worker-1", "Failed", exit_code=None, message=f"node lost {attempt}")
        world.step(2)
        world.settle(2)
    st = world.status
    assert st.phase == "Failed" and st.restarts == 3
    assert st.conditions[-1].reason == "BackoffLimitExceeded"
    assert "runPolicy.backoffLimit (2)" in st.message
    # cleanPodPolicy Running (the default): the surviving running worker is stopped, the
    # failed one is kept for its logs.
    assert world.names() == ["demo-worker-1"]
    assert world.workers["demo-worker-1"].phase == "Failed"


def test_unschedulable_workers_shrink_the_job_to_what_runs() -> None:
    config = ReconcileConfig(unschedulable_timeout_s=120, capacity_retry_s=600)
    world = World(make_job(minSize=1, maxSize=4), config=config)
    world.step(3)
    world.set("demo-worker-0", "Running")
    world.set("demo-worker-1", "Running")
    world.set("demo-worker-2", "Unschedulable", message="0/3 nodes are available")
    world.now += 60
    assert of(world.step(3), DeleteWorker) == []  # not for long enough yet
    world.now += 61
    actions = world.step(3)
    assert of(actions, DeleteWorker) == [DeleteWorker("demo-worker-2", graceful=False)]
    st = world.status
    assert st.capacity_limit is not None and st.capacity_limit.size == 2
    assert st.target_size == 2 and st.phase == "Running"
    assert "could not be scheduled" in st.message or "limited" in st.message
    assert "Unschedulable" in reasons(world)
    # Allocation sees the limit, so the freed slot goes to other jobs ...
    demand = demand_for(world.job, now=world.now)
    assert demand is not None and demand.max_size == 2
    assert world.step(3) == []
    # ... until the retry time, when the full size is tried again.
    world.now += 600
    assert demand_for(world.job, now=world.now).max_size == 4  # type: ignore[union-attr]
    actions = world.step(3)
    assert [c.name for c in of(actions, CreateWorker)] == ["demo-worker-2"]
    assert world.status.capacity_limit is None


def test_unschedulable_below_min_waits_instead_of_stalling() -> None:
    world = World(make_job(minSize=2, maxSize=2), config=ReconcileConfig(120, 600))
    world.step(2)
    world.set("demo-worker-0", "Running")
    world.set("demo-worker-1", "Unschedulable")
    world.now += 121
    actions = world.step(2)
    assert {a.name for a in of(actions, DeleteWorker)} == {"demo-worker-0", "demo-worker-1"}
    st = world.status
    assert st.phase == "Pending" and st.target_size == 0
    assert "only 1 of minSize 2 workers could be scheduled" in st.message
    demand = demand_for(world.job, now=world.now)
    assert demand is not None and not demand.admissible


def test_active_deadline_fails_and_cleans_up() -> None:
    world = World(make_job(runPolicy={"activeDeadlineSeconds": 60}))
    world.settle(2)
    world.now += 59
    assert world.step(2) == []
    world.now += 1
    actions = world.step(2)
    assert world.status.phase == "Failed"
    assert world.status.conditions[-1].reason == "DeadlineExceeded"
    assert {a.name for a in of(actions, DeleteWorker)} == {"demo-worker-0", "demo-worker-1"}
    assert all(a.graceful for a in of(actions, DeleteWorker))
    assert world.step(2) == []


def test_all_succeeded_is_success_and_keeps_finished_pods_by_default() -> None:
    world = World(make_job())
    world.settle(2)
    world.set("demo-worker-0", "Succeeded", exit_code=0)
    world.step(2)
    assert world.status.phase == "Running"  # one still finishing
    assert "finishing" in world.status.message
    world.set("demo-worker-1", "Succeeded", exit_code=0)
    actions = world.step(2)
    assert of(actions, DeleteWorker) == [] and of(actions, CreateWorker) == []
    assert world.status.phase == "Succeeded" and world.status.target_size == 0
    assert demand_for(world.job, now=world.now) is None
    assert world.names() == ["demo-worker-0", "demo-worker-1"]
    assert world.step(2) == []


def test_clean_pod_policy_all_and_ttl() -> None:
    world = World(make_job(runPolicy={"cleanPodPolicy": "All", "ttlSecondsAfterFinished": 30}))
    world.settle(1)
    world.set("demo-worker-0", "Succeeded", exit_code=0)
    actions = world.step(1)
    assert of(actions, DeleteWorker) == [DeleteWorker("demo-worker-0", graceful=False)]
    assert world.status.phase == "Succeeded" and not world.job_deleted
    world.now += 29
    assert world.step(1) == []
    world.now += 1
    assert of(world.step(1), DeleteJob) and world.job_deleted


def test_clean_pod_policy_none_leaves_workers() -> None:
    world = World(make_job(runPolicy={"cleanPodPolicy": "None", "activeDeadlineSeconds": 10}))
    world.settle(2)
    world.now += 10
    actions = world.step(2)
    assert world.status.phase == "Failed" and of(actions, DeleteWorker) == []


def test_every_phase_transition_has_an_event() -> None:
    world = World(make_job(maxSize=3), track_round=True)
    phases = []

    def step(allocation: int) -> None:
        before = world.status.phase
        n = len(world.events)
        world.step(allocation)
        after = world.status.phase
        new = [e.reason for e in world.events[n:]]
        if after != before:
            phases.append(after)
            assert after in new, (before, after, new)

    step(2)
    world.run_all()
    step(2)
    step(3)  # resize
    world.run_all()
    step(3)
    world.set("demo-worker-0", "Failed", exit_code=9, message="boom")
    step(3)
    world.run_all()
    step(3)
    for name in world.names():
        world.set(name, "Succeeded", exit_code=0)
    step(3)
    assert phases == ["Running", "Resizing", "Running", "Restarting", "Running", "Succeeded"]
    kinds = {e.reason: e.type for e in world.events}
    assert kinds["Restarting"] == "Warning" and kinds["Running"] == "Normal"
    running = [c for c in world.status.conditions if c.type == "Running"]
    assert running and running[0].status == "False"
    assert world.status.conditions[-1].type == "Succeeded"


def test_phase_waits_for_the_rendezvous_round() -> None:
    job = make_job()
    world = World(job)
    world.settle(2)
    from lattice.operator.core import RoundInfo

    observed = Observed(
        workers=world.observed().workers, round=RoundInfo(round=7, size=1), rendezvous_target=2
    )
    actions = reconcile(world.job, observed, 2, now=world.now, services=world_services())
    (update,) = of(actions, UpdateStatus)
    assert update.status.round == 7 and update.status.size == 1
    assert update.status.phase == "Resizing"


def test_inject_lattice_false_runs_the_command_as_is() -> None:
    world = World(make_job(injectLattice=False))
    actions = world.step(2)
    assert of(actions, SetRendezvousTarget) == []
    (first, _) = of(actions, CreateWorker)
    assert first.command == ("python", "-u", "main.py")
    assert first.env == {}
    assert first.container == "trainingjob"


def test_create_worker_carries_command_env_and_labels() -> None:
    world = World(make_job(framework="generic", checkpoint={"every": "50", "keep": 2}))
    (create,) = of(world.step(1), CreateWorker)
    assert create.job == "lattice/demo" and create.index == 0
    assert create.command[:2] == ("lattice", "run")
    assert create.env == {
        "LATTICE_AUTOPATCH": "none",
        "LATTICE_CHECKPOINT_EVERY": "50",
        "LATTICE_CHECKPOINT_KEEP": "2",
    }
    assert create.labels == {
        "lattice.exabits.ai/job": "demo",
        "lattice.exabits.ai/worker-index": "0",
    }


def test_preempted_job_stops_and_waits() -> None:
    world = World(make_job())
    world.settle(2)
    actions = world.step(0)
    assert len(of(actions, DeleteWorker)) == 2 and all(
        d.graceful for d in of(actions, DeleteWorker)
    )
    assert world.status.phase == "Pending" and world.status.target_size == 0
    assert "Stopped" in reasons(world)
    assert isinstance(world.events[-1], EmitEvent)


def test_last_checkpoint_from_observation() -> None:
    from lattice.operator.core import CheckpointInfo

    world = World(make_job())
    world.settle(1)
    observed = Observed(
        workers=world.observed().workers,
        rendezvous_target=1,
        last_checkpoint=CheckpointInfo(step=420, time=2000.0),
    )
    actions = reconcile(world.job, observed, 1, now=world.now, services=world_services())
    (update,) = of(actions, UpdateStatus)
    assert update.status.last_checkpoint is not None
    assert update.status.last_checkpoint.step == 420
    assert update.status.last_checkpoint.time == utc(2000.0)


def test_workers_observed_with_foreign_indexes_are_kept_in_place() -> None:
    job = make_job()
    observed = Observed(
        workers=(WorkerState("demo-worker-5", 5, "Running", created=1.0, uid="a"),),
        rendezvous_target=2,
    )
    actions = reconcile(job, observed, 2, now=1000.0, services=world_services())
    assert [c.name for c in of(actions, CreateWorker)] == ["demo-worker-0"]


def test_signal_kills_on_every_worker_are_not_a_user_error() -> None:
    world = World(make_job(minSize=2, maxSize=2))
    world.settle(2)
    for name in world.names():
        world.set(name, "Failed", exit_code=137, message="OOMKilled")
    actions = world.step(2)
    assert world.status.phase == "Restarting" and world.status.restarts == 2
    assert sorted(c.name for c in of(actions, CreateWorker)) == world.names()


def test_status_survives_the_wire() -> None:
    from lattice.api import TrainingJobStatus

    world = World(make_job())
    world.settle(2)
    world.set("demo-worker-0", "Failed", exit_code=3, message="bad")
    world.step(2)
    wire = world.status.to_dict()
    assert wire["phase"] == "Restarting" and wire["targetSize"] == 2
    assert wire["lastResizeTime"].endswith("Z")
    assert wire["lastFailure"] == {
        "worker": "demo-worker-0",
        "exitCode": 3,
        "message": "bad",
        "count": 1,
    }
    assert TrainingJobStatus.model_validate(wire) == world.status


def test_rounds_that_failed_inside_the_pods_count_as_restarts_once() -> None:
    """The agents re-form after a crashed process without a pod failing: the rendezvous'
    failed-round count reaches status.restarts, each round once, and a restarted service
    (its count back at 0) is a new baseline, not a negative restart."""
    from lattice.operator.core import RoundInfo

    world = World(make_job(maxSize=2))
    world.settle(2)

    def observe(failed: int | None) -> None:
        rnd = RoundInfo(round=9, size=2, failed_rounds=failed, last_failure="rank 1 exited 1")
        observed = Observed(workers=world.observed().workers, round=rnd, rendezvous_target=2)
        world.apply(reconcile(world.job, observed, 2, now=world.now, services=world_services()))

    observe(2)
    assert world.status.restarts == 2
    assert world.status.worker_error == "rank 1 exited 1"
    failed_events = [e for e in world.events if e.reason == "RoundFailed"]
    assert len(failed_events) == 1 and "rank 1 exited 1" in failed_events[0].message
    observe(2)  # the same count again: nothing new
    observe(None)  # service unreachable: unknown, not zero
    assert world.status.restarts == 2
    observe(0)  # the service restarted
    observe(1)
    assert world.status.restarts == 3
    assert len([e for e in world.events if e.reason == "RoundFailed"]) == 2


def test_too_many_failed_rounds_fail_the_job() -> None:
    from lattice.operator.core import RoundInfo

    world = World(make_job(maxSize=2, runPolicy={"backoffLimit": 3}))
    world.settle(2)
    rnd = RoundInfo(round=9, size=2, failed_rounds=4)
    observed = Observed(workers=world.observed().workers, round=rnd, rendezvous_target=2)
    world.apply(reconcile(world.job, observed, 2, now=world.now, services=world_services()))
    assert world.status.phase == "Failed"
    assert "backoffLimit (3)" in world.status.message
