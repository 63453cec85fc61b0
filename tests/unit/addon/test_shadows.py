"""Copies of a model that no optimizer steps (EMAs): found, labelled by where they are held,
saved with their holder's counters, and left alone where they do not fit."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lattice.addon import policy, runtime, shadows


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def modules() -> list[nn.Module]:
    gc.collect()  # not another test's leftovers (a failed test's traceback holds its frames)
    return [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]


class Holder:
    def __init__(self, model: nn.Module) -> None:
        self.ema = copy.deepcopy(model)
        self.updates = 7
        self.decay = lambda x: x  # not a number: not saved


def owned(*models: nn.Module) -> set[int]:
    return {id(p) for m in models for p in m.parameters()}


def test_a_holders_copy_is_labelled_by_its_attribute_and_its_counter_saved() -> None:
    model = net()
    holder = Holder(model)
    found = shadows.find(modules(), [model], owned(model), [])
    assert [(s.obj, s.label, s.holder) for s in found] == [(holder.ema, "Holder.ema", holder)]
    saved = shadows.state_objects(found)
    assert set(saved) == {"shadow.Holder.ema", "shadow.Holder.ema.holder"}
    assert saved["shadow.Holder.ema.holder"].state_dict() == {"updates": 7}
    vars(holder)  # a materialized __dict__ is the referrer then: the same label
    assert [s.label for s in shadows.find(modules(), [model], owned(model), [])] == ["Holder.ema"]


def test_a_variables_copy_is_labelled_by_its_name() -> None:
    model = net()
    ema_weights = copy.deepcopy(model)
    found = shadows.find(modules(), [model], owned(model), [])
    assert [(s.obj, s.label, s.holder) for s in found] == [(ema_weights, "ema_weights", None)]


def test_only_unstepped_copies_with_the_models_shapes_count() -> None:
    model = net()
    averaged = AveragedModel(model)  # tracked on its own, and so is the copy inside it
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))  # other shapes
    stepped = copy.deepcopy(model)  # an optimizer's too (a second model of the same shape)
    tied = nn.Sequential(model[0], nn.ReLU(), nn.Linear(4, 1))  # shares a stepped parameter
    frozen = copy.deepcopy(model)
    found = shadows.find(modules(), [model], owned(model, stepped), [averaged])
    assert [s.obj for s in found] == [frozen]
    assert other is not None and tied is not None


def test_copies_held_alike_get_numbered_labels() -> None:
    model = net()
    emas = [copy.deepcopy(model), copy.deepcopy(model)]
    labels = sorted(s.label for s in shadows.find(modules(), [model], owned(model), []))
    assert len(emas) == 2 and labels == ["Sequential#0", "Sequential#1"]


def test_a_module_holders_own_numbers_are_saved_and_loaded() -> None:
    class EmaModule(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.module = copy.deepcopy(model)
            self.num_updates = 3
            self._private = 1

    model = net()
    ema = EmaModule(model)
    saved = shadows.state_objects(shadows.find(modules(), [model], owned(model), []))
    own = saved["shadow.ema.own"]
    assert own.state_dict() == {"num_updates": 3}  # not `training`, not private
    ema.num_updates = 9
    ema.train(False)
    own.load_state_dict({"num_updates": 3, "training": True, "junk": 1})
    assert ema.num_updates == 3 and ema.training is False and not hasattr(ema, "junk")


def test_a_copy_missing_from_the_checkpoint_or_not_fitting_it_is_left_as_is(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ema = net()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    shadows.load("shadow.ema", ema, {})
    shadows.load("shadow.ema", ema, {"shadow.ema": {"0.weight": torch.zeros(9)}})
    after = ema.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    err = capsys.readouterr().err
    assert "ema is not in the checkpoint: left as the script made it" in err
    assert "ema not restored, it does not fit the checkpoint's" in err


def test_the_runtime_saves_a_copy_made_once_training_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy made later (a deep copy signalled by `shadows.patch_copies`) is found by a new
    scan, within the scans' share of the run's time."""
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.optimizers.append(weakref.ref(opt))
    assert rt.shadows() == [] and set(rt.objects()) == {"model.0", "optimizer.0"}
    late = copy.deepcopy(model)
    monkeypatch.setattr(policy, "SCAN_SHARE", 0.0)
    rt.module_copied()
    assert rt.shadows() == []  # over the share: the last scan holds
    monkeypatch.setattr(policy, "SCAN_SHARE", 1e9)
    assert [s.obj for s in rt.shadows()] == [late]
    # Saved once written in place (an EMA's update); a restore loads into it either way.
    assert "shadow.late" not in rt.objects() and "shadow.late" in rt.objects(saving=False)
    with torch.no_grad():
        next(late.parameters()).mul_(0.5)
    assert "shadow.late" in rt.objects()


def test_only_copies_written_in_place_are_saved() -> None:
    """A frozen reference copy (never written) is what a restarted script makes again."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # its buffers' copy bumps them
    ema = copy.deepcopy(model)
    found = {s.label: s for s in shadows.find(modules(), [model], owned(model), [])}
    assert not shadows.moved(found["reference"]) and not shadows.moved(found["ema"])
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(m, 0.1)
    assert shadows.moved(found["ema"]) and not shadows.moved(found["reference"])
    assert reference is not None


def test_a_variables_label_is_its_outermost_name() -> None:
    """A helper it is passed to names it otherwise; the outer name holds wherever the scan
    runs from."""
    model = net()
    ema = copy.deepcopy(model)

    def helper(ema_model: nn.Module) -> list[str]:
        return [s.label for s in shadows.find(modules(), [model], owned(model), [])]

    assert helper(ema) == ["ema"]


class BareEma:
    """diffusers' EMAModel's shape: tensors in a list, its own state_dict, which keeps the
    tensors it is given."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow_params = [p.detach().clone().double() for p in model.parameters()]
        self.optimization_step = 0

    def state_dict(self) -> dict[str, object]:
        return {"optimization_step": self.optimization_step, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimization_step = state["optimization_step"]  # type: ignore[assignment]
        self.shadow_params = state["shadow_params"]  # type: ignore[assignment]


def test_a_tracked_ema_of_bare_tensors_is_labelled_and_loaded_onto_its_tensors_dtypes() -> None:
    model = net()
    unet_ema = BareEma(model)
    found = shadows.find(modules(), [model], owned(model), [], tracked=[unet_ema])
    assert [(s.obj, s.label) for s in found] == [(unet_ema, "unet_ema")]
    assert shadows.tensors(found) == unet_ema.shadow_params
    saved = shadows.state_objects(found)
    assert set(saved) == {"shadow.unet_ema"}
    taken = {"optimization_step": 5, "shadow_params": [torch.ones(4, 3), torch.ones(4)]}
    taken["shadow_params"] += [torch.ones(1, 4), torch.ones(1)]
    saved["shadow.unet_ema"].load_state_dict(taken)  # read back as float32 (a CPU restore)
    assert unet_ema.optimization_step == 5
    assert [t.dtype for t in unet_ema.shadow_params] == [torch.float64] * 4
    assert all(bool((t == 1).all()) for t in unet_ema.shadow_params)


def test_a_half_built_module_in_the_heap_breaks_no_scan(tmp_path: Path) -> None:
    """A module whose ``__init__`` raised before ``Module.__init__`` (a traceback holds it)
    has no ``_parameters``: asking it for its parameters raises."""

    class Half(nn.Module):
        pass

    half = Half.__new__(Half)
    rt = runtime.Runtime(tmp_path, None, ("steps", 1.0))
    model = net()
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.optimizers.append(weakref.ref(opt))
    assert rt.models() == [model] and [s.obj for s in rt.shadows()] == [ema]
    assert half is not None
