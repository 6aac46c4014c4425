"""Tier 1 (one process): the SyncBatchNorm module's API contract and its single-process behaviour."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syncbn import SyncBatchNorm, sync_batch_norm
from syncbn.functional import _apply

from .reference import reference_bn, rel_err

OPTIONS = [
    {},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": None},
    {"eps": 1e-3, "momentum": 0.5},
    {"bias": False},
]


def test_constructor_matches_torch_syncbatchnorm():
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    # older torch (2.11, say) has no `bias` flag; ours has it on every torch
    assert list(ours) == list(theirs) or list(ours) == [*theirs, "bias"]
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name


@pytest.mark.parametrize("options", OPTIONS)
def test_parameters_buffers_and_state_dict_match_torch(options):
    ours = SyncBatchNorm(5, **options)
    if "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters:
        theirs = nn.SyncBatchNorm(5, **options)
    else:  # older torch (the GPU machine's 2.11): what the flag does, done by hand
        theirs = nn.SyncBatchNorm(5, **{k: v for k, v in options.items() if k != "bias"})
        if not options.get("bias", True):
            theirs.register_parameter("bias", None)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert n1 == n2 and t1.shape == t2.shape and t1.dtype == t2.dtype and torch.equal(t1, t2)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    # checkpoints move both ways
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours).replace("SyncBatchNorm", "") == repr(theirs).replace("SyncBatchNorm", "")


def test_bias_false_on_a_torch_without_the_flag(monkeypatch):
    """Older torch (2.11, say; our floor is 2.4) has no `bias` flag: the layer, convert/revert and the
    reference still build affine norms without a bias, with the parameters and state_dict of the flag."""
    from syncbn import convert_sync_batchnorm, modules, revert_sync_batchnorm
    from syncbn.testing import reference_batch_norm

    with_flag = SyncBatchNorm(5, bias=False)
    monkeypatch.setattr(modules, "_HAS_BIAS_ARG", False)
    layer = SyncBatchNorm(5, bias=False)
    assert layer.bias is None and layer.weight is not None
    assert layer.state_dict().keys() == with_flag.state_dict().keys()
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    plain = nn.Sequential(nn.BatchNorm2d(5))
    plain[0].register_parameter("bias", None)
    synced = convert_sync_batchnorm(plain)
    assert isinstance(synced[0], SyncBatchNorm) and synced[0].bias is None
    back = revert_sync_batchnorm(synced)
    assert isinstance(back[0], nn.BatchNorm2d) and back[0].bias is None and back[0].weight is not None
    ref = reference_batch_norm(4, 5, bias=False)
    assert ref.bias is None and ref.weight.dtype == torch.float64
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    layer.double()
    assert rel_err(layer(x), ref(x)) < 1e-12


def test_factory_kwargs():
    layer = SyncBatchNorm(3, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.running_mean.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (6, 3, 4, 4), (6, 3, 2, 3, 4)])
def test_not_distributed_is_plain_batchnorm(shape, options):
    """No process group: identical to torch BatchNorm, in training and in eval, running stats included."""
    torch.manual_seed(0)
    ours = SyncBatchNorm(3, dtype=torch.float64, **options)
    ref = reference_bn(len(shape), 3, **options)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        y, yr = ours(x), ref(xr)
        assert torch.equal(y, yr)
        y.sum().backward()
        yr.sum().backward()
        assert torch.equal(x.grad, xr.grad)
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(ours(x), ref(x))


def test_channels_last_not_distributed():
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    y = SyncBatchNorm(3)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, nn.BatchNorm2d(3)(x.contiguous()), atol=1e-6)


@pytest.mark.parametrize(
    ("make_input", "fragment"),
    [
        (lambda: torch.randn(5), "1D input"),
        (lambda: torch.randn(4, 2, 3), "expected C=3 channels, got 2"),
        (lambda: torch.ones(4, 3, dtype=torch.long), "floating point"),
    ],
)
def test_invalid_input_raises_value_error(make_input, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        SyncBatchNorm(3)(make_input())
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        sync_batch_norm(make_input(), torch.zeros(3), torch.ones(3), training=True)


def test_single_value_per_channel_in_training_raises_like_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SyncBatchNorm(3)(torch.randn(1, 3))


def test_num_features_must_be_positive():
    with pytest.raises(ValueError, match="num_features >= 1, got 0"):
        SyncBatchNorm(0)


def test_gradcheck_world_size_one():
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    layer = SyncBatchNorm(3, dtype=torch.float64, track_running_stats=False)
    assert torch.autograd.gradcheck(layer, (x,))


def test_autocast_not_distributed():
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
    layer = SyncBatchNorm(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32


def _sync(x, w, b, rm=None, rv=None, momentum=0.1, eps=1e-5):
    return _apply(x, w, b, rm, rv, eps=eps, momentum=momentum, num_features=x.shape[1], process_group=None)


def test_sync_function_on_one_rank_matches_batchnorm(world_of_one):
    """The sync math (stats packing, float64 combine, both backward paths) against torch on one rank."""
    torch.manual_seed(1)
    for shape in [(7, 3), (5, 3, 4), (4, 3, 5, 5), (2, 3, 2, 3, 4)]:
        x = (torch.randn(shape, dtype=torch.float64) * 5 + 3).requires_grad_(True)
        w = torch.randn(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        y = _sync(x, w, b, rm, rv)
        dy = torch.randn_like(y)
        y.backward(dy)
        xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        rmr, rvr = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        yr = F.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
        yr.backward(dy)
        for got, want in [
            (y, yr),
            (x.grad, xr.grad),
            (w.grad, wr.grad),
            (b.grad, br.grad),
            (rm, rmr),
            (rv, rvr),
        ]:
            assert rel_err(got, want) < 1e-12


def test_gradcheck_sync_function_on_one_rank(world_of_one):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _sync(x, w, b, eps=1e-3), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: _sync(x, None, None, eps=1e-3), (x,))
