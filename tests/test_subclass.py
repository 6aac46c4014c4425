"""Tier 1: BatchNorm subclasses convert keeping their own forward, children and attributes, or are refused.

One stand-in per way model zoos subclass BatchNorm (tests/standins.py). Converted layers must compute exactly
what the original computes (eval, and training on one process), share its tensors, survive pickling and
revert to the original class; layers that cannot be synced exactly raise a ValueError naming them.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.subclass import synced_class

from .standins import (
    TIMM_MODELS,
    AllReduceBatchNorm2d,
    BatchNormAct2d,
    HandStatsBatchNorm2d,
    ScaledBatchNorm2d,
    TaggedBatchNorm1d,
    TorchSyncAct,
    timm_or_skip,
)

# (class, kwargs, input shape); BatchNormAct2d with real dropout, so training draws random numbers
STANDINS = {
    "bnact": (BatchNormAct2d, {"act": nn.ReLU, "drop": 0.5}, (6, 5, 3, 3)),
    "tagged": (TaggedBatchNorm1d, {"momentum": None}, (6, 5, 4)),
    "scaled": (ScaledBatchNorm2d, {}, (6, 5, 3, 3)),
    "bare": (BatchNormAct2d, {"affine": False, "track_running_stats": False}, (6, 5, 3, 3)),
}


def trained(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A stand-in layer (float64) after two training steps, so its running stats are not the defaults."""
    cls, kwargs, shape = STANDINS[name]
    torch.manual_seed(1)
    layer = cls(5, dtype=torch.float64, **kwargs)
    for _ in range(2):
        layer(torch.randn(shape, dtype=torch.float64) * 3 + 1)
    return layer, torch.randn(shape, dtype=torch.float64) * 2 - 1


def model_with(layer: nn.Module) -> nn.Module:
    # ``layer`` sits at path blocks.3.bn1; the plain BatchNorm in front converts to SyncBatchNorm.
    blocks = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity(), nn.Module())
    blocks[3].add_module("bn1", layer)
    return nn.ModuleDict({"pre": nn.BatchNorm2d(5), "blocks": blocks})


@pytest.mark.parametrize("name", STANDINS)
def test_converted_subclass_keeps_class_children_attributes_and_state(name):
    layer, _ = trained(name)
    if layer.weight is not None:
        layer.weight.requires_grad_(False)
    old_state = dict(vars(layer))
    net = model_with(layer)
    group = object()  # any object stands for a process group here; it is only stored
    assert convert_sync_batchnorm(net, process_group=group) is net
    new = net["blocks"][3].bn1
    assert type(new) is synced_class(type(layer)) and type(new).__name__ == f"Sync{type(layer).__name__}"
    assert isinstance(new, type(layer)) and isinstance(new, SyncBatchNorm)
    assert type(net["pre"]) is SyncBatchNorm
    assert new.process_group is group and new.training
    assert dict(new.named_children()).keys() == dict(layer.named_children()).keys()
    assert all(new.get_submodule(k) is c for k, c in layer.named_children())
    for key, value in vars(layer).items():
        if not key.startswith("_"):
            assert getattr(new, key) == value, key  # tag, lr_scale, eps, momentum, ...
    old_tensors = [*layer.named_parameters(), *layer.named_buffers()]
    new_tensors = [*new.named_parameters(), *new.named_buffers()]
    assert [k for k, _ in new_tensors] == [k for k, _ in old_tensors]
    assert all(t1 is t2 for (_, t1), (_, t2) in zip(old_tensors, new_tensors, strict=True))
    assert new.weight is None or not new.weight.requires_grad
    assert vars(layer) == old_state and type(layer) is not type(new)  # the original object is left as it was


@pytest.mark.parametrize("name", STANDINS)
def test_converted_subclass_computes_exactly_what_the_original_does(name):
    layer, x = trained(name)
    reference = copy.deepcopy(layer)
    new = convert_sync_batchnorm(layer)
    # Training on one process (world size 1: the subclass's forward as is), same dropout draws.
    for _ in range(2):
        with torch.random.fork_rng():
            want = reference(x)
        assert torch.equal(new(x), want)
    state, want_state = new.state_dict(), reference.state_dict()  # running stats and counter
    assert state.keys() == want_state.keys()
    assert all(torch.equal(state[k], want_state[k]) for k in state)
    reference.eval(), new.eval()
    assert torch.equal(new(x), reference(x))


@pytest.mark.parametrize("name", STANDINS)
def test_revert_restores_the_original_class_children_and_tensors(name):
    layer, x = trained(name)
    layer.eval()
    want = layer(x)
    new = convert_sync_batchnorm(layer)
    back = revert_sync_batchnorm(nn.Sequential(new))[0]
    assert type(back) is type(layer) and back is not new
    assert vars(back).keys() == vars(layer).keys()  # no process_group or other leftovers
    assert all(back.get_submodule(k) is c for k, c in layer.named_children())
    assert [id(t) for t in [*back.parameters(), *back.buffers()]] == [
        id(t) for t in [*layer.parameters(), *layer.buffers()]
    ]
    assert torch.equal(back(x), want)


@pytest.mark.parametrize("name", STANDINS)
def test_converted_subclass_pickles_deep_copies_and_loads_state_dicts(name):
    layer, x = trained(name)
    layer.eval()
    want, keys = layer(x), list(layer.state_dict())
    new = convert_sync_batchnorm(copy.deepcopy(layer))
    assert list(new.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(new, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(new), pickle.loads(pickle.dumps(new)), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is type(new)
        tensors = [*other.parameters(), *other.buffers()]
        assert not any(t is u for t in tensors for u in [*new.parameters(), *new.buffers()])
        assert torch.equal(other(x), want)
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        for t in plain.state_dict().values():
            t.zero_()
    plain.load_state_dict(new.state_dict())  # checkpoints move between original and converted
    assert torch.equal(plain(x), want)


def test_hooks_are_kept_and_containers_are_not_shared():
    layer, x = trained("bnact")
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    new = convert_sync_batchnorm(layer)
    new(x)
    assert seen == ["SyncBatchNormAct2d"]
    new.register_forward_hook(lambda m, i, o: seen.append("new only"))
    new.add_module("extra", nn.Identity())
    layer(x)
    assert seen == ["SyncBatchNormAct2d", "BatchNormAct2d"] and not hasattr(layer, "extra")


def test_convert_is_idempotent_and_updates_the_group():
    new = convert_sync_batchnorm(BatchNormAct2d(3))
    group = object()
    assert convert_sync_batchnorm(new, process_group=group) is new and new.process_group is group


def test_conversion_probe_leaves_rng_and_layer_untouched():
    layer, _ = trained("bnact")
    state = {k: t.clone() for k, t in layer.state_dict().items()}
    rng = torch.get_rng_state()
    convert_sync_batchnorm(layer)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe's dropout drew from a forked RNG
    assert all(torch.equal(layer.state_dict()[k], t) for k, t in state.items())


def test_subclass_that_computes_statistics_by_hand_is_refused_naming_it():
    net = model_with(HandStatsBatchNorm2d(5))
    with pytest.raises(ValueError) as info:
        convert_sync_batchnorm(net)
    message = str(info.value)
    assert "'blocks.3.bn1'" in message and "tests.standins.HandStatsBatchNorm2d" in message
    assert "torch.nn.BatchNorm2d subclass" in message and "0 times" in message
    assert "What you can do" in message
    assert type(net["pre"]) is nn.BatchNorm2d  # refused before anything was replaced


def test_refusals_of_torch_syncbn_subclasses_and_attribute_clashes():
    with pytest.raises(
        ValueError, match=r"the root module .*TorchSyncAct.*subclasses torch.nn.SyncBatchNorm"
    ):
        convert_sync_batchnorm(TorchSyncAct(3))
    clash = BatchNormAct2d(3)
    clash.process_group = "mine"
    with pytest.raises(ValueError, match=r"already has an attribute 'process_group'.*rename"):
        convert_sync_batchnorm(nn.Sequential(clash))


def test_subclass_with_its_own_collective_is_refused_without_running_it(world_of_one):
    before = AllReduceBatchNorm2d.all_reduces
    with pytest.raises(ValueError, match=r"'0' .*collective \(c10d\.allreduce_\) of its own"):
        convert_sync_batchnorm(nn.Sequential(AllReduceBatchNorm2d(3)))
    assert AllReduceBatchNorm2d.all_reduces == before + 1  # its forward got there, the all-reduce did not run


def test_subclass_whose_forward_fails_on_every_probe_is_refused():
    class Broken(nn.BatchNorm2d):
        def forward(self, x):
            raise RuntimeError("needs a calibration step first")

    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 4\).*calibration step"):
        convert_sync_batchnorm(Broken(3))


def test_lazy_batchnorm_refusal_names_the_path():
    with pytest.raises(ValueError, match=r"'1' .*uninitialized"):
        convert_sync_batchnorm(nn.Sequential(nn.Identity(), nn.LazyBatchNorm2d()))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_converts_exactly_and_reverts(name):
    timm = timm_or_skip()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).double()
    model(torch.randn(4, 3, 64, 64, dtype=torch.float64))  # training step: running stats not the defaults
    model.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want = model(x)
    classes = {n: type(m) for n, m in model.named_modules()}
    converted = convert_sync_batchnorm(model)
    synced = [type(m).__name__ for m in converted.modules() if isinstance(m, SyncBatchNorm)]
    assert "SyncBatchNormAct2d" in synced
    assert len(synced) == sum(issubclass(c, nn.modules.batchnorm._BatchNorm) for c in classes.values())
    assert torch.equal(converted(x), want)
    reverted = revert_sync_batchnorm(converted)
    assert {n: type(m) for n, m in reverted.named_modules()} == classes
    assert torch.equal(reverted(x), want)
