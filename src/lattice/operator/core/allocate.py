"""`allocate`: how many workers each job gets from a shared pool of slots. Pure and deterministic.

Rules (docs/operator.md explains them with examples):

1. Gangs: a job runs with at least ``min_size`` workers or not at all.
2. Running jobs keep their size; only if the pool shrank below the sum of their minimums are the
   lowest-ranked ones stopped (rank: higher priority, then older, then key).
3. Waiting jobs are admitted in rank order when their minimum fits, counting running jobs of
   equal or lower priority at their minimum (they shrink to admit it) and running jobs of
   higher priority at their current size (they never shrink for a lower priority).
4. To make room, jobs shrink lowest priority first, preferring jobs outside their cooldown and
   with the most workers above minimum, so one admission resizes as few jobs as possible.
5. Spare slots go to higher priority first, then to the job holding the fewest slots (equal
   shares), up to ``max_size``. A running job resized less than ``resize_cooldown_s`` ago does
   not grow again (hysteresis), unless it is recovering from a failure anyway.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from lattice.api.job import TrainingJob

DEFAULT_RESIZE_COOLDOWN_S = 60.0


@dataclass(frozen=True)
class JobDemand:
    """One job as allocation sees it.

    ``current`` is the size it holds now (its status' targetSize); ``running`` jobs were
    admitted earlier and hold at least ``min_size``; ``restarting`` jobs are recovering from a
    failure, so resizing them now costs no extra restart. ``slots_per_worker`` is how many
    slots (pods, CPUs, GPUs …) one worker takes.
    """

    key: str
    min_size: int
    max_size: int
    priority: int = 0
    created: float = 0.0
    current: int = 0
    last_resize: float | None = None
    running: bool = False
    restarting: bool = False
    slots_per_worker: int = 1

    @property
    def waiting(self) -> bool:
        return not self.running

    @property
    def admissible(self) -> bool:
        return 1 <= self.min_size <= self.max_size


def _rank(job: JobDemand) -> tuple[int, float, str]:
    return (-job.priority, job.created, job.key)


def _held(job: JobDemand) -> int:
    return min(max(job.current, job.min_size), job.max_size)


def allocate(
    capacity: int,
    jobs: Sequence[JobDemand],
    *,
    now: float,
    resize_cooldown_s: float = DEFAULT_RESIZE_COOLDOWN_S,
) -> dict[str, int]:
    """Workers per job key (0: not admitted or stopped), within ``capacity`` slots."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("allocate: job keys must be unique")
    capacity = max(0, capacity)
    alloc = dict.fromkeys(keys, 0)
    ranked = sorted((j for j in jobs if j.admissible), key=_rank)

    # 2. Running jobs keep at least their minimum; stop the lowest-ranked if the pool shrank.
    kept = [j for j in ranked if j.running]
    floor = sum(j.min_size * j.slots_per_worker for j in kept)
    while kept and floor > capacity:
        dropped = kept.pop()
        floor -= dropped.min_size * dropped.slots_per_worker

    # 3. Admit waiting jobs in rank order. Slots above minimum held by running jobs of higher
    # priority than the candidate are not available to it.
    by_priority = sorted(kept, key=lambda j: j.priority)
    priorities = [j.priority for j in by_priority]
    extra_suffix = [0] * (len(by_priority) + 1)
    for i in range(len(by_priority) - 1, -1, -1):
        j = by_priority[i]
        extra_suffix[i] = extra_suffix[i + 1] + (_held(j) - j.min_size) * j.slots_per_worker
    admitted = list(kept)
    for job in ranked:
        if job.running:
            continue
        protected = extra_suffix[bisect.bisect_right(priorities, job.priority)]
        need = job.min_size * job.slots_per_worker
        if floor + protected + need <= capacity:
            admitted.append(job)
            floor += need

    for j in admitted:
        alloc[j.key] = _held(j) if j.running else j.min_size

    def cooling(j: JobDemand) -> bool:
        return (
            j.running
            and not j.restarting
            and j.last_resize is not None
            and now - j.last_resize < resize_cooldown_s
        )

    # 4. Shrink to make room (only ever needed to admit, or after the pool shrank).
    used = sum(alloc[j.key] * j.slots_per_worker for j in admitted)
    if used > capacity:
        donors = sorted(
            (j for j in admitted if j.running and alloc[j.key] > j.min_size),
            key=lambda j: (
                j.priority,
                cooling(j),
                -(alloc[j.key] - j.min_size) * j.slots_per_worker,
                -j.created,
                j.key,
            ),
        )
        for j in donors:
            if used <= capacity:
                break
            spw = j.slots_per_worker
            give = min(alloc[j.key] - j.min_size, -(-(used - capacity) // spw))
            alloc[j.key] -= give
            used -= give * spw

    # 5. Share spare slots: higher priority first, then the job holding the fewest slots.
    free = capacity - used
    heap = [
        (-j.priority, alloc[j.key] * j.slots_per_worker, j.created, j.key, j)
        for j in admitted
        if alloc[j.key] < j.max_size and not cooling(j)
    ]
    heapq.heapify(heap)
    while heap and free > 0:
        _, _, _, _, j = heapq.heappop(heap)
        spw = j.slots_per_worker
        if spw > free:
            continue
        alloc[j.key] += 1
        free -= spw
        if alloc[j.key] < j.max_size:
            heapq.heappush(heap, (-j.priority, alloc[j.key] * spw, j.created, j.key, j))
    return alloc


def demand_for(job: TrainingJob, *, now: float) -> JobDemand | None:
    """The `JobDemand` of a job from its spec and status (None: finished, needs no slots).

    A capacity limit in the status (workers that could not be scheduled) caps the job's
    maximum until it expires; a limit below ``minSize`` keeps the job waiting until then.
    """
    status = job.current_status()
    if status.terminal:
        return None
    spec = job.spec
    max_size = spec.max_size
    limit = status.capacity_limit
    if limit is not None and limit.until.timestamp() > now:
        max_size = min(max_size, limit.size)
    created = job.metadata.creation_timestamp
    resized = status.last_resize_time
    return JobDemand(
        key=job.key,
        min_size=spec.min_size,
        max_size=max_size,
        priority=spec.priority,
        created=created.timestamp() if created is not None else 0.0,
        current=status.target_size,
        last_resize=resized.timestamp() if resized is not None else None,
        running=status.target_size > 0,
        restarting=status.phase == "Restarting",
        slots_per_worker=spec.slots_per_worker,
    )
