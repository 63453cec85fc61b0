"""Kill -9 mid-epoch, restart: the final parameters are bitwise those of an uninterrupted run."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from lattice.addon import local_tier
from lattice.addon.local_tier import step_dir
from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT

from .harness import TEARDOWN_ABORT, Launcher, bitwise_equal, id_lines, params, poll

# script, world size, batches logged (by rank 0) before the kill, environment
CASES = [
    ("train_epochs.py", 2, 8, {}),  # epoch loop, set_epoch, per-epoch scheduler
    # a batch sampler of the script's own (length bucketing), resumed by count
    ("train_epochs.py", 2, 8, {"ZOO_SAMPLER": "bucket"}),
    # rank 0 alone iterates an evaluation DataLoader first: loaders are matched by where they
    # were made, not by the order each rank first iterated them in
    ("train_epochs.py", 2, 8, {"ZOO_EVAL_FIRST": "1"}),
    # … with gradients on (model.eval() only): rank 0 restores in that pass, its collectives
    # meeting rank 1's restore at its first training pass
    ("train_epochs.py", 2, 8, {"ZOO_EVAL_FIRST": "grad"}),
    # a new DataLoader every epoch (and a validation one): the earlier epochs' loaders are
    # earlier makings of the checkpoint's, their passes fast-forwarded; killed in epoch 2
    ("train_epochs.py", 2, 15, {"ZOO_LOADER_PER_EPOCH": "1"}),
    # two loaders zipped (multi-task): the shorter ends each epoch mid-pass of the other
    ("train_epochs.py", 2, 9, {"ZOO_ZIP": "1"}),
    # ZeroRedundancyOptimizer: each rank holds a shard of the optimizer state (its state_dict
    # raised unless consolidated: such a script crashed at its first checkpoint)
    ("train_epochs.py", 2, 8, {"ZOO_ZERO": "1"}),
    ("train_accum.py", 2, 11, {}),  # per-step scheduler, dropout, accumulation (odd → mid-window)
    # SequentialLR (warm-up, then cosine) steps two schedulers; killed past its milestone
    ("train_accum.py", 2, 11, {"ZOO_SCHED": "warmup_cosine"}),
    ("train_workers.py", 1, 17, {}),  # num_workers=2, RandomSampler
    # … its draws from DataLoader(generator=g): the generator's state is restored too; and
    # persistent_workers (one iterator reset for every pass)
    ("train_workers.py", 1, 17, {"ZOO_GENERATOR": "1", "ZOO_PERSISTENT": "1"}),
    # … a WeightedRandomSampler (global RNG) and a SubsetRandomSampler (its own generator):
    # each pass's drawn order is kept like a RandomSampler's
    ("train_workers.py", 1, 17, {"ZOO_SAMPLER": "weighted"}),
    ("train_workers.py", 1, 13, {"ZOO_SAMPLER": "subset", "ZOO_GENERATOR": "1"}),
    # accelerator.prepare: a DataLoaderShard, one batch ahead; BatchSamplerShard on two ranks
    ("train_accelerate.py", 1, 17, {}),
    ("train_accelerate.py", 2, 9, {}),
    # … accelerator.accumulate over 2 batches; 11 batches per epoch: windows cut by epochs
    ("train_accelerate.py", 1, 18, {"ZOO_ACCUMULATE": "2", "ZOO_SAMPLES": "44"}),
    # an IterableDataset with state_dict/load_state_dict (each rank's stream state saved)
    ("train_stream.py", 2, 7, {}),
    # torchdata's StatefulDataLoader: its own state per rank (two workers prefetching; a
    # DistributedSampler on two ranks), killed in the second epoch
    ("train_torchdata.py", 1, 17, {}),
    ("train_torchdata.py", 2, 9, {}),
    ("train_register.py", 2, 8, {}),  # lattice.register: state of the script's own (an lr)
    ("train_amp.py", 1, 13, {}),  # autocast float16 + GradScaler("cpu") with skipped steps
    ("train_ema.py", 1, 15, {}),  # AveragedModel EMA updated every step (not in the optimizer)
    # … a deep copy: held by an object with an update counter (YOLO's ModelEMA), inside a
    # module holder with a Python counter (timm's ModelEmaV3), in a bare local variable
    ("train_ema.py", 1, 15, {"ZOO_EMA": "holder"}),
    ("train_ema.py", 1, 15, {"ZOO_EMA": "module"}),
    ("train_ema.py", 1, 15, {"ZOO_EMA": "copy"}),
    ("train_ema.py", 1, 15, {"ZOO_EMA": "diffusers"}),  # diffusers' EMAModel: bare tensors
    # … a module-global copy in a script without a DataLoader: its update follows the boundary
    ("train_getbatch.py", 1, 13, {"ZOO_EMA": "1"}),
    # nanoGPT's estimate_loss (a range loop under no_grad) on rank 0 only, every 5 iterations:
    # a restore attempted there hung the job, the first run's too
    ("train_getbatch.py", 2, 11, {"ZOO_ESTIMATE_EVERY": "5"}),
    # … a script that resumes itself (nanoGPT's init_from='resume'): its own checkpoint every 5
    # iterations, loaded at its start, is older than the addon's
    ("train_getbatch.py", 1, 13, {"ZOO_RESUME": "1"}),
    ("train_eval.py", 1, 17, {}),  # a validation DataLoader every epoch, metric = sum / count
    ("train_trainer.py", 1, 11, {}),  # transformers.Trainer: tiny GPT-2, accumulation; mid-epoch
    ("train_trainer.py", 1, 9, {}),  # … restored at the end of an epoch (8 steps per epoch)
    ("train_trainer.py", 2, 7, {}),  # … two processes (DDP over gloo), 4 steps per epoch
    # … the script's own resume_from_checkpoint (a folder every 5 steps), older than the addon's
    ("train_trainer.py", 2, 7, {"ZOO_RESUME": "1"}),
    # PyTorch Lightning's Trainer.fit: its own counters (batch index, global step) steer its
    # loop (the epoch's scheduler step at the epoch's last batch by count) …
    ("train_lightning.py", 1, 17, {}),
    # … its accumulation windows, a per-step scheduler, max_steps (ends mid-epoch 2); killed
    # mid-window
    ("train_lightning.py", 1, 17, {"ZOO_ACCUMULATE": "2"}),
    # … validation twice an epoch (val_check_interval), resumed just before one; and
    # EarlyStopping, killed between the two validations that make it stop
    ("train_lightning.py", 1, 17, {"ZOO_VAL": "1"}),
    ("train_lightning.py", 1, 33, {"ZOO_VAL": "1"}),
    # … loaders from a LightningDataModule (two workers), validation, default logger and
    # ModelCheckpoint on
    ("train_lightning.py", 1, 17, {"ZOO_DATAMODULE": "1", "ZOO_VAL": "1"}),
    # … DDP on two ranks (torchelastic's environment, as the agent gives it)
    ("train_lightning.py", 2, 9, {"TORCHELASTIC_RUN_ID": "zoo"}),
    # … Lightning's own resume too (ModelCheckpoint every 5 steps, fit(ckpt_path="last")): its
    # checkpoint is older than the addon's, and not loaded over it
    ("train_lightning.py", 1, 17, {"ZOO_CKPT_PATH": "1"}),
    ("train_lightning.py", 2, 9, {"ZOO_CKPT_PATH": "1", "TORCHELASTIC_RUN_ID": "zoo"}),
    # … an IterableDataset keeping its own state, read a batch ahead by Lightning's fetcher
    ("train_lightning.py", 1, 17, {"ZOO_DATASET": "stream"}),
    ("train_lightning.py", 2, 9, {"ZOO_DATASET": "stream", "TORCHELASTIC_RUN_ID": "zoo"}),
    # Lightning Fabric: setup() wraps the model and optimizer, setup_dataloaders() the loader
    # (it counts its passes itself, for set_epoch)
    ("train_fabric.py", 1, 17, {}),
    ("train_fabric.py", 2, 9, {"TORCHELASTIC_RUN_ID": "zoo"}),
    # … LitGPT's loop: its counter in a dict (state["iter_num"]) sets the lr and ends the run
    ("train_fabric.py", 1, 17, {"ZOO_STATE": "1"}),
    ("train_fsdp.py", 2, 9, {}),  # fully_shard (FSDP2) on a CPU mesh: full state via DCP
    # an optimizer step on a dummy batch before the loader loop: not the checkpoint's replay
    ("train_steps.py", 1, 15, {"ZOO_WARMUP_STEP": "1"}),
]


def baseline(launcher: Launcher, script: str, world: int, **extra: str) -> Path:
    """The uninterrupted run, without Lattice: its final parameters."""
    out = launcher.tmp / "baseline.pt"
    run = launcher.start(
        script,
        world,
        lattice=False,
        ZOO_OUT=str(out),
        ZOO_LOG=str(launcher.tmp / "base"),
        **extra,
    )
    codes = run.settle(out)
    # torch's teardown at exit, after the work is done, may abort (-6, saying so) or hang
    # (None: killed once the output was written)
    torn = set(codes) <= {0, -6, None} and (-6 not in codes or TEARDOWN_ABORT in run.output())
    assert codes == [0] * world or (torn and out.exists()), run.output()
    return out


def kill_and_restart(
    launcher: Launcher, script: str, world: int, kill_after: int, **env: str
) -> tuple[str, bool]:
    """An uninterrupted run; then a run with a checkpoint every step, killed with -9 once rank
    0 logged ``kill_after`` batches, and restarted (its batches logged to ``after.<rank>``).
    The restarted run's output, and whether it ended bitwise equal to the uninterrupted one."""
    expected = baseline(launcher, script, world, **env)
    out = launcher.tmp / "resumed.pt"
    env = {"ZOO_OUT": str(out), "LATTICE_CHECKPOINT_EVERY": "1", **env}
    first = launcher.start(script, world, ZOO_STEP_SLEEP="0.1", **env)
    poll(lambda: len(id_lines(launcher.tmp)) >= kill_after, "training progress")
    first.kill()
    assert not out.exists(), "the first run finished before it was killed"
    second = launcher.start(script, world, ZOO_LOG=str(launcher.tmp / "after"), **env)
    assert second.wait() == [0] * world, second.output()
    return second.output(), bitwise_equal(params(expected), params(out))


@pytest.mark.parametrize(("script", "world", "kill_after", "env"), CASES)
def test_kill_and_restart_is_bitwise_exact(
    launcher: Launcher, script: str, world: int, kill_after: int, env: dict[str, str]
) -> None:
    log, exact = kill_and_restart(launcher, script, world, kill_after, **env)
    assert "restored step" in log
    assert exact


@pytest.mark.parametrize("addon", [True, False], ids=["older-addon-checkpoint", "none"])
def test_lightning_resumes_from_its_own_checkpoint_where_it_is_the_newer(
    launcher: Launcher, addon: bool
) -> None:
    """``fit(ckpt_path="last")``, a ModelCheckpoint every 5 steps, the process gone at its 23rd
    batch: Lightning's last checkpoint is of global step 20, the addon's (every 8 steps) of 16,
    or there is none of the addon's (the first run without Lattice). Lightning's is restored and
    the addon's not; the addon's steps count on from 20, so that its next checkpoints rank
    above its older one. (Where the addon's is the newer, it is restored instead: the
    ``ZOO_CKPT_PATH`` case of `CASES`.)"""
    env = {
        "ZOO_CKPT_PATH": "1",
        "ZOO_OUT": str(launcher.tmp / "out.pt"),
        "LATTICE_CHECKPOINT_EVERY": "8",
    }
    first = launcher.start("train_lightning.py", 1, lattice=addon, ZOO_DIE_AT="23", **env)
    assert first.wait() == [137], first.output()
    local = launcher.tmp / "local"
    assert max(local_tier.steps(local), default=None) == (16 if addon else None)
    second = launcher.start("train_lightning.py", 1, **env)
    assert second.wait() == [0], second.output()
    log = second.output()
    assert "Restored all states from the checkpoint" in log and "restored step" not in log
    if addon:
        assert "global step 20, newer than the addon's checkpoint (global step 16)" in log
    else:
        assert "Lightning resumes from it (the addon has no checkpoint of this job)" in log
    assert max(local_tier.steps(local)) > 20, log


@pytest.mark.parametrize(
    ("every", "lattice_first", "restored"),
    [("1", True, "addon"), ("8", True, "trainer"), ("1", False, "trainer")],
    ids=["newer-addon-checkpoint", "older-addon-checkpoint", "none"],
)
def test_trainer_resume_from_checkpoint_the_newer_checkpoint_is_restored(
    launcher: Launcher, every: str, lattice_first: bool, restored: str
) -> None:
    """``train(resume_from_checkpoint=get_last_checkpoint(out))``, Trainer saving every 5
    steps, the process gone after step 13's optimizer step: Trainer's last folder is of global
    step 10. The addon's, checkpointing every step, is of 12 or 13 (a write may lag a step):
    it is restored instead, and the run ends bitwise as an uninterrupted one. Checkpointing
    every 8 steps it is of 8; with a first run without Lattice there is none: Trainer resumes
    from its folder, and the addon's steps count on from 10."""
    env = {"ZOO_RESUME": "1", "LATTICE_CHECKPOINT_EVERY": every}
    expected = baseline(launcher, "train_trainer.py", 1, **env) if restored == "addon" else None
    out = launcher.tmp / "out.pt"
    env["ZOO_OUT"] = str(out)
    first = launcher.start(
        "train_trainer.py", 1, lattice=lattice_first, ZOO_DIE_AT="13", ZOO_STEP_SLEEP="0.1", **env
    )
    assert first.wait() == [137], first.output()
    local = launcher.tmp / "local"
    second = launcher.start("train_trainer.py", 1, **env)
    assert second.wait() == [0], second.output()
    log = second.output()
    if restored == "addon":
        assert "its folder is at global step 10, the addon's checkpoint at 1" in log, log
        assert expected is not None and bitwise_equal(params(expected), params(out))
    else:
        mine = "8" if lattice_first else "none"
        assert f"folder at global step 10 (the addon's checkpoint: {mine})" in log, log
        assert "restored step" not in log and max(local_tier.steps(local)) > 10


def test_accelerate_dispatching_an_iterable_dataset_neither_hangs_nor_changes_training(
    launcher: Launcher,
) -> None:
    """accelerate dispatches an IterableDataset's batches from rank 0 (``dispatch_batches``):
    only rank 0 iterates the DataLoader. Tracked there, rank 0's step boundary was at the
    fetch and the others' at the optimizer step, their collectives crossed and the job hung.
    Checkpointing every step, the run now ends as it does without the addon; killed and
    restarted, it resumes the step, and the pass starts over (said in the log)."""
    env = {"ZOO_DATASET": "iterable", "LATTICE_CHECKPOINT_EVERY": "1"}
    expected = baseline(launcher, "train_accelerate.py", 2, ZOO_DATASET="iterable")
    out = launcher.tmp / "with-addon.pt"
    run = launcher.start("train_accelerate.py", 2, ZOO_OUT=str(out), **env)
    try:
        assert run.wait(timeout=120) == [0, 0], run.output()
    finally:
        run.kill()
    assert bitwise_equal(params(expected), params(out))
    resumed = launcher.tmp / "resumed.pt"
    first = launcher.start("train_accelerate.py", 2, ZOO_STEP_SLEEP="0.1", **env)
    poll(lambda: len(id_lines(launcher.tmp)) >= 9, "training progress")
    first.kill()
    second = launcher.start("train_accelerate.py", 2, ZOO_OUT=str(resumed), **env)
    assert second.wait() == [0, 0], second.output()
    log = second.output()
    assert "restored step" in log and "dispatch_batches" in log and "starts over" in log


def test_a_hugging_face_streaming_dataset_resumes_exactly(launcher: Launcher) -> None:
    """``datasets`` streaming over local JSON-lines shards, split over two ranks: each rank's
    stream state is saved and loaded back (before, the pass started over and its samples were
    trained on twice)."""
    shards = launcher.tmp / "data"
    shards.mkdir()
    for shard in range(4):
        rows = []
        for i in range(shard * 12, shard * 12 + 12):
            x = [math.sin(i * k) for k in range(1, 9)]
            rows.append(json.dumps({"id": i, "x": x, "y": [sum(x)]}))
        (shards / f"part-{shard}.jsonl").write_text("\n".join(rows) + "\n")
    log, exact = kill_and_restart(launcher, "train_hfstream.py", 2, 7, ZOO_DATA=str(shards))
    assert "restored step" in log and "starts over" not in log
    assert exact


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(launcher: Launcher, damage: str) -> None:
    expected = baseline(launcher, "train_epochs.py", 2)
    out = launcher.tmp / "resumed.pt"
    first = launcher.start(
        "train_epochs.py", 2, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1", ZOO_STEP_SLEEP="0.1"
    )
    poll(lambda: len(id_lines(launcher.tmp)) >= 8, "training progress")
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)  # stop with whole checkpoints
    assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
    (launcher.tmp / "control").unlink()
    steps = sorted((launcher.tmp / "local").glob("step-*"))
    newest = steps[-1]
    victim = newest / "state.pt"  # every rank's RNG is in it too
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    victim.write_bytes(bytes(raw))
    second = launcher.start("train_epochs.py", 2, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1")
    assert second.wait() == [0, 0], second.output()
    log = second.output()
    assert f"checkpoint at step {int(newest.name[5:])} unusable" in log
    assert f"restored step {int(steps[-2].name[5:])}" in log
    assert bitwise_equal(params(expected), params(out))


# script, steps it makes, batches logged before the kill (12 batches per pass)
STEP_LOOPS = [
    ("train_steps.py", 30, 15),  # while step < N: for batch in loader (counter restored)
    ("train_steps.py", 30, 27),  # … killed in the third pass
    ("train_range.py", 40, 15),  # for step in range(N): next(it) (range resumed)
    ("train_range.py", 40, 29),  # … killed in the third pass: two passes skipped at once
    ("train_toplevel.py", 40, 29),  # the same loop at module level: globals, not locals
]


@pytest.mark.parametrize(("script", "steps", "kill_after"), STEP_LOOPS)
def test_step_count_loop_resumes_exactly(
    launcher: Launcher, script: str, steps: int, kill_after: int
) -> None:
    log, exact = kill_and_restart(launcher, script, 1, kill_after)
    found = re.search(r"restored step (\d+)", log)
    assert found, log
    restored = int(found.group(1))
    assert kill_after - 3 <= restored < steps  # the pass the kill was meant for
    assert f"restored the script's counters: step={restored}" in log
    # The loop goes on from the restored step with the uninterrupted run's batches, and stops
    # after `steps` steps in all.
    resumed = (launcher.tmp / "after.0").read_text().splitlines()
    uninterrupted = (launcher.tmp / "base.0").read_text().splitlines()
    assert len(uninterrupted) == steps
    assert resumed == uninterrupted[restored:]
    assert exact


def _damage(victim: Path, how: str) -> None:
    if how == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    else:  # never written (its rank was killed first)
        victim.unlink()
        victim.with_name(victim.name + ".sha256").unlink()


@pytest.mark.parametrize(
    ("damage", "replica_too"), [("flip", False), ("flip", True), ("missing", True)]
)
def test_damaged_or_missing_piece_falls_back_to_the_replica_or_the_previous_step(
    launcher: Launcher, damage: str, replica_too: bool
) -> None:
    """FSDP over 2 nodes (no service: each rank's pieces are also on the other node): node 1's
    file of its pieces of the newest step has a flipped byte or is gone. With node 0's replica
    of it intact, the newest step is restored from the replica; with the replica damaged as
    well, that step is not restored (every rank agrees) but the previous one is. Either way
    the run ends bitwise equal to an uninterrupted one."""
    expected = baseline(launcher, "train_fsdp.py", 2)
    out = launcher.tmp / "resumed.pt"
    env = {"ZOO_OUT": str(out), "LATTICE_CHECKPOINT_EVERY": "1"}
    first = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **env)
    poll(lambda: len(id_lines(launcher.tmp)) >= 8, "training progress")
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)  # stop with whole checkpoints
    assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
    (launcher.tmp / "control").unlink()
    steps = sorted(launcher.local_dir(1).glob("step-*"))
    newest, previous = int(steps[-1].name[5:]), int(steps[-2].name[5:])
    _damage(steps[-1] / "shard-1-of-2.pt", damage)
    if replica_too:
        _damage(step_dir(launcher.local_dir(0), newest) / "shard-1-of-2.pt", damage)
    second = launcher.start("train_fsdp.py", 2, nodes=2, **env)
    assert second.wait() == [0, 0], second.output()
    log = second.output()
    if damage == "flip":
        assert f"node-local pieces of step {newest} unusable" in log
    else:
        assert f"node-local pieces of step {newest} are incomplete (old rank 1)" in log
    assert f"restored step {previous if replica_too else newest} " in log
    assert bitwise_equal(params(expected), params(out))


@pytest.mark.parametrize(
    ("loop", "world", "kill_after", "eval_every"),
    [
        ("while", 1, 13, "0"),
        ("while", 2, 9, "0"),
        ("range", 1, 17, "0"),
        # nanoGPT's own loop: the batch in the script's globals is the checkpoint's again
        ("prefetch", 1, 13, "0"),
        ("prefetch", 2, 11, "0"),
        # a validation DataLoader after steps 10, 20, 30: the steps still checkpoint each
        ("while", 1, 17, "10"),
        # … constructed before the range loop starts, which still resumes it
        ("range", 1, 17, "10"),
    ],
)
def test_a_script_without_a_dataloader_resumes_exactly(
    launcher: Launcher, loop: str, world: int, kill_after: int, eval_every: str
) -> None:
    """nanoGPT's shape: batches drawn from the torch RNG, a ``while`` counter loop at module
    level (or a ``for … in range`` loop). No DataLoader comes before the restarted run's first
    step: the restore happens in that optimizer step (or as the ``range`` loop starts, which it
    then resumes), and the step replays the checkpoint's (its update dropped, what follows it
    kept); the run goes on with the uninterrupted run's batches and ends bitwise equal."""
    script, steps = "train_getbatch.py", 30
    log, exact = kill_and_restart(
        launcher, script, world, kill_after, ZOO_LOOP=loop, ZOO_EVAL_EVERY=eval_every
    )
    found = re.search(r"restored step (\d+)", log)
    assert found, log
    restored = int(found.group(1))
    assert kill_after - 3 <= restored < steps
    counters = re.search(r"restored the script's counters: (.*)", log)
    assert counters, log
    # set back to the checkpoint step's values (the range loop's resumed at that iteration)
    assert f"iter_num={restored - 1}" in counters.group(1).split(", ")
    assert loop != "range" or f"it={restored - 1}" in counters.group(1).split(", ")
    tensors = re.search(r"restored the script's tensors: (.*)", log)
    assert loop != "prefetch" or (tensors and set(tensors.group(1).split(", ")) >= {"x", "y"})
    for rank in range(world):
        # The restarted run's first batch is thrown away with the replayed step; then come the
        # uninterrupted run's batches from the restored step on, and no more.
        resumed = (launcher.tmp / f"after.{rank}").read_text().splitlines()
        uninterrupted = (launcher.tmp / f"base.{rank}").read_text().splitlines()
        assert len(uninterrupted) == steps
        assert resumed[1:] == uninterrupted[restored:]
    assert exact
    # The replayed step was not counted: the last checkpoint is the last step's.
    assert max(int(p.name[5:]) for p in launcher.local_dir(0).glob("step-*")) == steps


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile (inductor) needs g++")
@pytest.mark.parametrize(("loop", "world", "kill_after"), [("prefetch", 1, 13), ("while", 2, 11)])
def test_a_torch_compiled_model_resumes_exactly(
    launcher: Launcher, loop: str, world: int, kill_after: int
) -> None:
    """nanoGPT compiles its model (``torch.compile``, inductor) before DDP wraps it. Killed
    with -9 and restarted: bitwise equal; the checkpoint holds the model inside the compiled
    wrapper (no ``_orig_mod.`` in its keys: a run restarted without compile loads it too)."""
    log, exact = kill_and_restart(
        launcher, "train_getbatch.py", world, kill_after, ZOO_LOOP=loop, ZOO_COMPILE="1"
    )
    assert "restored step" in log
    assert exact
    newest = max(launcher.local_dir(0).glob("step-*"))
    keys = list(local_tier.load(newest / "state.pt")["model.0"])
    assert keys == ["0.weight", "0.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize(
    ("loop", "order"), [("while", "d_first"), ("range", "d_first"), ("while", "g_first")]
)
def test_a_gan_without_a_dataloader_resumes_exactly(
    launcher: Launcher, loop: str, order: str
) -> None:
    """Two optimizers stepped one after the other in each iteration, the generator's on the
    fake batch the discriminator's step saw (DCGAN). The boundary is after the generator's
    step (the iteration's last); the restore waits for that step (a ``while`` loop: loading in
    the discriminator's step broke the generator's graph, and the restarted run crashed) or,
    at a ``range`` loop's start, drops both updates of the replayed iteration. The optimizer
    that steps first, not the one created first, begins an iteration (``g_first``)."""
    log, exact = kill_and_restart(launcher, "train_gan.py", 1, 13, ZOO_LOOP=loop, ZOO_ORDER=order)
    found = re.search(r"restored step (\d+)", log)
    assert found, log
    restored = int(found.group(1))
    resumed = (launcher.tmp / "after.0").read_text().splitlines()
    uninterrupted = (launcher.tmp / "base.0").read_text().splitlines()
    assert resumed[1:] == uninterrupted[restored:]  # the replayed iteration's batch, then these
    assert exact
