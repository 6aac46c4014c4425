"""torch.compile(model, fullgraph=True) of converted models (README "torch.compile"), W=2 and W=3 gloo ranks.

Proves: no graph break; one syncbn all-reduce per layer each way (in the traced graphs and at run time);
equal to eager SyncBatchNorm bit for bit and to float64 BatchNorm on the global batch over several steps
with uneven and empty per-rank batches; what a batch-size change recompiles; errors on every rank; eager
and compiled ranks in one job; converted BatchNorm subclasses. Compiling costs seconds per graph on 2 cores,
so each spawn runs many checks, and all but one test compile with backend="aot_eager" (Dynamo and
AOTAutograd build the graphs Inductor would get, without its code generation); one test runs Inductor.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from syncbn import SyncBatchNorm, compiled, convert_sync_batchnorm, sync_batch_norm
from syncbn.testing import gloo_calls

from .dist import spawn, values
from .reference import rel_err, rows_of

# The layers of Zoo: options, input shape after N, channels_last
LAYERS = [
    (nn.BatchNorm1d, {"momentum": None}, (3,), False),
    (nn.BatchNorm1d, {"affine": False}, (3, 4), False),
    (nn.BatchNorm2d, {}, (3, 2, 3), True),
    (nn.BatchNorm2d, {"track_running_stats": False}, (3, 2, 2), False),
    (nn.BatchNorm3d, {"momentum": None, "affine": False}, (3, 2, 2, 2), False),
]


class Zoo(nn.Module):
    """One BatchNorm of each kind the README promises under torch.compile, each on its own input."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(cls(3, dtype=torch.float64, **opts) for cls, opts, _, _ in LAYERS)
        for layer in self.layers:
            if layer.affine:  # not the defaults 1 and 0, so a lost weight or bias shows
                layer.weight.data = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
                layer.bias.data = torch.randn(3, generator=gen, dtype=torch.float64)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


def recording_backend():
    """aot_eager that keeps the forward and backward graphs AOTAutograd hands to the compiler."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: dict[str, list] = {"forward": [], "backward": []}

    def keep(kind: str):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def op_counts(gm) -> dict[str, int]:
    """Ops of an AOT graph by name (the update op sits inside auto_functionalized)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.args[0] if "auto_functionalized" in str(node.target) else node.target
            counts[str(target)] = counts.get(str(target), 0) + 1
    return counts


def _global_batch(step: int, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded global inputs and output gradients for every Zoo layer, in float64."""
    gen = torch.Generator().manual_seed(1000 + step)
    xs = [torch.randn(rows, *shape, generator=gen, dtype=torch.float64) * 2 + 1 for _, _, shape, _ in LAYERS]
    dys = [torch.randn(rows, *shape, generator=gen, dtype=torch.float64) for _, _, shape, _ in LAYERS]
    return xs, dys


def _local(tensors: list[torch.Tensor], rows: slice) -> list[torch.Tensor]:
    out = []
    for t, (_, _, _, channels_last) in zip(tensors, LAYERS, strict=True):
        t = t[rows]
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous())
    return out


def _step(model, xs: list[torch.Tensor], dys: list[torch.Tensor]) -> tuple[list, list]:
    """One training step: outputs and input gradients (parameter gradients land in .grad)."""
    xs = [x.clone().requires_grad_(True) for x in xs]
    ys = model(xs)
    sum((y * dy).sum() for y, dy in zip(ys, dys, strict=True)).backward()
    return [y.detach() for y in ys], [x.grad for x in xs]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b, strict=True))


def _param_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def equivalence(rank: int, world_size: int, splits: list[list[int]]) -> dict:
    """Eager SyncBN, compiled SyncBN and float64 BatchNorm on the global batch, step after step."""
    base = Zoo()
    eager = convert_sync_batchnorm(copy.deepcopy(base))
    model = convert_sync_batchnorm(copy.deepcopy(base))
    reference = copy.deepcopy(base.layers)  # torch's own BatchNorm*d in float64: the global-batch yardstick
    backend, graphs = recording_backend()
    compiled_model = torch.compile(model, backend=backend, fullgraph=True)
    out = {"vs_eager": 0.0, "vs_reference": 0.0, "compiles": []}
    for step, split in enumerate(splits):
        xs, dys = _global_batch(step, sum(split))
        rows = rows_of(rank, split)
        for m in (eager, model, reference):
            m.zero_grad(set_to_none=True)
        ye, ge = _step(eager, _local(xs, rows), _local(dys, rows))
        yc, gc = _step(compiled_model, _local(xs, rows), _local(dys, rows))
        yr, gr = _step(lambda xs_: [r(x) for r, x in zip(reference, xs_, strict=True)], xs, dys)
        pe, pc = _param_grads(eager), _param_grads(model)
        summed = [g.clone() for g in pc]
        for g in summed:
            dist.all_reduce(g)  # weight/bias grads stay local: their sum over ranks is the reference's
        vs_eager = [_max_diff(ye, yc), _max_diff(ge, gc), _max_diff(pe, pc)]
        vs_eager.append(_max_diff(list(eager.state_dict().values()), list(model.state_dict().values())))
        vs_ref = [rel_err(a, b[rows]) for a, b in zip(yc + gc, yr + gr, strict=True)]
        vs_ref += [rel_err(a, b) for a, b in zip(summed, _param_grads(reference), strict=True)]
        vs_ref += [
            rel_err(a, b)
            for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
        ]
        out["vs_eager"] = max(out["vs_eager"], *vs_eager)
        out["vs_reference"] = max(out["vs_reference"], *vs_ref)
        out["compiles"].append(len(graphs["forward"]))
    out["forward_ops"] = [op_counts(g) for g in graphs["forward"]]
    out["backward_ops"] = [op_counts(g) for g in graphs["backward"]]
    # At run time, after the first call: one all-reduce per layer in forward, one in backward.
    xs, dys = _global_batch(99, sum(splits[-1]))
    local = [x.clone().requires_grad_(True) for x in _local(xs, rows_of(rank, splits[-1]))]
    box: dict = {}
    out["forward_gloo"] = gloo_calls(lambda: box.setdefault("ys", compiled_model(local)))
    loss = sum(
        (y * dy).sum() for y, dy in zip(box["ys"], _local(dys, rows_of(rank, splits[-1])), strict=True)
    )
    out["backward_gloo"] = gloo_calls(loss.backward)
    out["recompiled_by_profiling"] = len(graphs["forward"]) - out["compiles"][-1]
    explain = torch._dynamo.explain(model)(_local(xs, rows_of(rank, splits[-1])))
    out["graph_breaks"], out["graphs"] = explain.graph_break_count, explain.graph_count
    out["mixed"] = mixed_eager_and_compiled(rank, world_size, splits)
    return out


def mixed_eager_and_compiled(rank: int, world_size: int, splits: list[list[int]]) -> float:
    """Rank 0 compiled, the others eager, in one job: their call tags agree and the numbers are right."""
    base = Zoo()
    model = convert_sync_batchnorm(copy.deepcopy(base))
    reference = copy.deepcopy(base.layers)
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if rank == 0 else model
    worst = 0.0
    for step, split in enumerate(splits[:2]):
        xs, dys = _global_batch(50 + step, sum(split))
        rows = rows_of(rank, split)
        y, g = _step(run, _local(xs, rows), _local(dys, rows))
        yr, gr = _step(lambda xs_: [r(x) for r, x in zip(reference, xs_, strict=True)], xs, dys)
        worst = max(worst, *(rel_err(a, b[rows]) for a, b in zip(y + g, yr + gr, strict=True)))
    return worst


SPLITS = {
    2: [[3, 2], [2, 0], [0, 3], [4, 1], [3, 2]],
    3: [[2, 1, 2], [0, 2, 1], [3, 0, 0], [1, 2, 2]],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 3])
def test_compiled_equals_eager_and_the_reference_with_one_all_reduce_each_way(world_size, tmp_path):
    results = values(spawn(equivalence, world_size, tmp_path, SPLITS[world_size], timeout=300))
    n = len(LAYERS)
    for r in results:
        assert r["graph_breaks"] == 0 and r["graphs"] == 1, r
        assert r["vs_eager"] == 0.0, r  # aot_eager runs the eager kernels: bit for bit
        assert r["vs_reference"] < 1e-10, r
        assert r["mixed"] < 1e-10, r
        # Every compiled graph holds one synced op per layer each way, and no other collective.
        for ops in r["forward_ops"]:
            assert ops["syncbn.forward.default"] == n and ops["syncbn.update_running_stats.default"] == n
            assert not [k for k in ops if "c10d" in k or "all_reduce" in k], ops
        for ops in r["backward_ops"]:
            assert ops["syncbn.backward.default"] == n, ops
            assert not [k for k in ops if "c10d" in k or "all_reduce" in k or "syncbn.forward" in k], ops
        assert r["forward_gloo"] == n and r["backward_gloo"] == n, r
        assert r["recompiled_by_profiling"] == 0


def _outcome(fn) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "none", "", time.monotonic() - start


def _train(layer, x: torch.Tensor, backward: bool = True) -> None:
    y = layer(x.requires_grad_(True))
    if backward:
        y.square().sum().backward()


def _error_cases(rank: int, culprit: int) -> dict:
    """Each case: what every rank runs on a fresh compiled layer (only ``culprit`` does it wrong)."""
    good = (4, 3, 2)
    wide = (4, 4 if rank == culprit else 3, 2)

    def steps(*shapes, skip_backward_at: int | None = None):
        def run():
            layer = torch.compile(SyncBatchNorm(3), backend="aot_eager", fullgraph=True)
            for i, shape in enumerate(shapes):
                skip = i == skip_backward_at and rank == culprit
                _train(layer, torch.randn(shape), backward=not skip)

        return run

    return {
        "bad_channels_first_call": steps(wide),
        "bad_channels_later": steps(good, wide),
        "one_dim_input": steps(good, (6,) if rank == culprit else good),
        "one_value": steps((1 if rank == 0 else 0, 3)),
        "empty": steps((0, 3, 2)),
        "skipped_backward": steps(good, good, good, skip_backward_at=1),
    }


def errors(rank: int, world_size: int) -> dict:
    """Invalid input and mispaired calls inside compiled code."""
    out = {name: _outcome(case) for name, case in _error_cases(rank, world_size - 1).items()}
    # The ranks are back in step: a new compiled layer syncs and matches the reference.
    x = torch.randn(2 * world_size, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    layer = torch.compile(SyncBatchNorm(3, dtype=torch.float64), backend="aot_eager", fullgraph=True)
    rows = slice(2 * rank, 2 * rank + 2)
    out["still_works"] = rel_err(layer(x[rows]), nn.BatchNorm1d(3, dtype=torch.float64)(x)[rows])
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 3])
def test_compiled_errors_raise_on_every_rank(world_size, tmp_path):
    results = values(spawn(errors, world_size, tmp_path, timeout=300, pg_timeout=60))
    culprit = world_size - 1
    expected = {
        "bad_channels_first_call": ("ValueError", f"rank {culprit}: expected C=3 channels, got 4"),
        "bad_channels_later": ("ValueError", f"rank {culprit}: expected C=3 channels, got 4"),
        "one_dim_input": ("ValueError", f"rank {culprit}: expected input (N, C, *) with at least 2 dims"),
        "one_value": ("ValueError", "Expected more than 1 value per channel when training"),
        "empty": ("ValueError", "the global batch is empty"),
        "skipped_backward": ("RuntimeError", "calls mispaired across ranks"),
    }
    for r in results:
        for case, (kind, words) in expected.items():
            got_kind, message, seconds = r[case]
            assert got_kind == kind and words in message, (case, r[case])
            assert seconds < 30, (case, seconds)  # raised at the collective, not at the 60 s timeout
        assert r["still_works"] < 1e-10


def recompiles(rank: int, world_size: int, sizes: list[int]) -> list[int]:
    """Graphs compiled so far after each step; rank 0 walks through ``sizes``, the others keep 4 rows."""
    backend, graphs = recording_backend()
    layer = torch.compile(SyncBatchNorm(3), backend=backend, fullgraph=True)
    seen = []
    for n in sizes:
        _train(layer, torch.randn(n if rank == 0 else 4, 3, 2, 2))
        seen.append(len(graphs["forward"]))
    return seen


@pytest.mark.multiprocess
def test_what_batch_size_changes_recompile(tmp_path):
    """README: the first size compiles; the first other size recompiles once with a dynamic batch
    dimension, which then serves every size >= 2; 0 and 1 rows (specialized by Dynamo) one graph each."""
    sizes = [4, 4, 4, 3, 3, 5, 2, 0, 0, 1, 1, 6, 7]
    first, second = values(spawn(recompiles, 2, tmp_path, sizes, timeout=200))
    assert first == [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4]
    assert second == [1] * len(sizes)  # a fixed shape never recompiles


class _Act(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (timm's BatchNormAct2d shape), converted by the subclass
    path: its synced call is routed from inside its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(super().forward(x))


def subclass_layers(rank: int, world_size: int) -> dict:
    base = nn.Sequential(_Act(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64))
    reference = copy.deepcopy(base)
    model = convert_sync_batchnorm(copy.deepcopy(base))
    backend, graphs = recording_backend()
    run = torch.compile(model, backend=backend, fullgraph=True)
    worst = 0.0
    for step, split in enumerate([[3, 2], [1, 3]]):
        x = torch.randn(
            sum(split), 3, 2, 2, generator=torch.Generator().manual_seed(step), dtype=torch.float64
        )
        rows = rows_of(rank, split)
        xl = x[rows].clone().requires_grad_(True)
        y = run(xl)
        y.square().sum().backward()
        xr = x.clone().requires_grad_(True)
        yr = reference(xr)
        yr.square().sum().backward()
        worst = max(worst, rel_err(y, yr[rows]), rel_err(xl.grad, xr.grad[rows]))
    worst = max(
        worst,
        *(
            rel_err(a, b)
            for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
        ),
    )
    explain = torch._dynamo.explain(model)(x[rows])
    return {"error": worst, "breaks": explain.graph_break_count, "ops": op_counts(graphs["forward"][0])}


def autocast_run(rank: int, world_size: int) -> dict:
    """bfloat16 autocast around a compiled conv + SyncBN model: what eager gives, dtypes included."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    eager = convert_sync_batchnorm(copy.deepcopy(base))
    model = convert_sync_batchnorm(copy.deepcopy(base))
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = {"diff": 0.0, "dtypes": set()}
    for step in range(2):
        x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(10 * step + rank))
        results = []
        for m in (eager, run):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(xi)
            y.float().square().sum().backward()
            results.append((y, xi.grad))
            out["dtypes"].add(str(y.dtype))
        (ye, ge), (yc, gc) = results
        out["diff"] = max(out["diff"], _max_diff([ye.float(), ge], [yc.float(), gc]))
    states = zip(eager.state_dict().values(), model.state_dict().values(), strict=True)
    out["diff"] = max(out["diff"], *((a.float() - b.float()).abs().max().item() for a, b in states))
    return out


def functional_run(rank: int, world_size: int) -> dict:
    """sync_batch_norm() inside a compiled function: the same ops, the reference's numbers."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    running = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    reference = nn.BatchNorm1d(3, dtype=torch.float64)
    reference.weight.data, reference.bias.data = weight.detach().clone(), bias.detach().clone()

    def fn(x):
        return sync_batch_norm(x, *running, weight, bias, training=True, momentum=0.2)

    run = torch.compile(fn, backend="aot_eager", fullgraph=True)
    reference.momentum = 0.2
    worst = 0.0
    for step, split in enumerate([[3, 2], [0, 4]]):
        x = torch.randn(sum(split), 3, 2, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        rows = rows_of(rank, split)
        xl = x[rows].clone().requires_grad_(True)
        run(xl).square().sum().backward()
        xr = x.clone().requires_grad_(True)
        y = reference(xr)
        y.square().sum().backward()
        worst = max(worst, rel_err(xl.grad, xr.grad[rows]))
    stats = rel_err(running[0], reference.running_mean), rel_err(running[1], reference.running_var)
    worst = max(worst, *stats)
    return {"error": worst, "breaks": torch._dynamo.explain(fn)(x[rows]).graph_break_count}


def more_models(rank: int, world_size: int) -> dict:
    return {
        "subclass": subclass_layers(rank, world_size),
        "autocast": autocast_run(rank, world_size),
        "functional": functional_run(rank, world_size),
    }


@pytest.mark.multiprocess
def test_subclasses_autocast_and_the_functional_form_compile(tmp_path):
    for r in values(spawn(more_models, 2, tmp_path, timeout=200)):
        sub, amp = r["subclass"], r["autocast"]
        assert sub["breaks"] == 0 and sub["error"] < 1e-10, sub
        assert sub["ops"]["syncbn.forward.default"] == 2, sub
        assert amp["dtypes"] == {"torch.bfloat16"} and amp["diff"] == 0.0, amp
        assert r["functional"]["breaks"] == 0 and r["functional"]["error"] < 1e-10, r["functional"]


def inductor_run(rank: int, world_size: int) -> dict:
    """The default backend on the default model (a ResNet: shortcut BNs run beside the main branch's)."""
    from launch.models import SmallResNet

    torch.manual_seed(0)
    base = SmallResNet(3, 5, (4, 8))
    eager = convert_sync_batchnorm(copy.deepcopy(base))
    model = convert_sync_batchnorm(copy.deepcopy(base))
    # layout_optimization=False: Inductor would run the convolutions channels-last, and torch 2.13's CPU
    # backward of a 1x1 stride-2 channels-last convolution corrupts the heap with one thread (README).
    run = torch.compile(model, fullgraph=True, options={"layout_optimization": False})
    out = {"error": 0.0, "seconds": []}
    split = [3, 2]  # ranks compile different static graphs: their synced ops must still pair up
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(sum(split), 3, 8, 8, generator=gen)[rows_of(rank, split)]
        results = []
        for m in (eager, run):
            xi = x.clone().requires_grad_(True)
            start = time.monotonic()
            y = m(xi)
            y.square().sum().backward()
            results.append((y.detach(), xi.grad, time.monotonic() - start))
        (ye, ge, _), (yc, gc, seconds) = results
        out["seconds"].append(seconds)
        grads = zip(_param_grads(eager), _param_grads(model), strict=True)
        states = zip(eager.state_dict().values(), model.state_dict().values(), strict=True)
        errs = [rel_err(yc, ye), rel_err(gc, ge), *(rel_err(a, b) for a, b in grads)]
        out["error"] = max(out["error"], *errs, *(rel_err(a, b) for a, b in states))
        eager.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.multiprocess
def test_inductor_equals_eager_on_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, every time
    for r in values(spawn(inductor_run, 2, tmp_path, timeout=540)):
        assert r["error"] < 1e-5, r  # float32; Inductor fuses the other layers' arithmetic differently


def test_opcheck_of_the_custom_ops(world_of_one):
    """torch.library.opcheck on a real one-rank group: schemas, fake kernels (shapes and strides, as
    channels_last and size-1 dims make them), autograd registration, AOT dispatch."""
    layer = SyncBatchNorm(3)
    key = layer._compile_key
    # The forward's info output carries the call index, which every call advances by design, so the test
    # that compares two calls' outputs (test_aot_dispatch_dynamic) cannot apply to it.
    forward_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    inputs = [
        torch.randn(4, 3, 5),
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        torch.randn(1, 3, 1, 4).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 3, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d),
        torch.randn(6, 3).bfloat16(),
    ]
    for x in inputs:
        weight = torch.rand(3, requires_grad=True)
        bias = torch.randn(3, requires_grad=True)
        args = (x.requires_grad_(True), weight, bias, compiled._ORDER, 1e-5, 3, key)
        torch.library.opcheck(compiled.forward_op, args, test_utils=forward_tests)
        torch.library.opcheck(compiled.forward_op, (x, None, None, *args[3:]), test_utils=forward_tests)
        out, stats, info = compiled.forward_op(*args)
        for momentum, tracked in ((0.1, None), (None, torch.tensor(3))):
            running = torch.zeros(3, dtype=stats.dtype), torch.ones(3, dtype=stats.dtype)
            update = (*running, compiled._ORDER, stats, info, tracked, momentum, key)
            torch.library.opcheck(compiled.update_running_stats_op, update)
        dy = torch.randn_like(out)
        # detached: the backward op has no autograd formula (no double backward, as in eager)
        for w, after, need in ((weight.detach(), None, True), (None, torch.zeros(1), False)):
            backward = (dy, x.detach(), w, stats, info, after, 1e-5, 3, key, need)
            torch.library.opcheck(compiled.backward_op, backward)


def test_not_distributed_compiles_to_plain_batch_norm():
    """Without torch.distributed the compiled layer is plain BatchNorm: no syncbn op in the graphs."""
    torch.manual_seed(0)
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    eager = copy.deepcopy(model)
    backend, graphs = recording_backend()
    run = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4)
        y, ye = run(x), eager(x)
        y.sum().backward()
        ye.sum().backward()
        assert torch.allclose(y, ye, atol=1e-6)
    for a, b in zip(model.state_dict().values(), eager.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    ops = [op_counts(g) for g in graphs["forward"] + graphs["backward"]]
    assert ops and not [k for o in ops for k in o if "syncbn" in k], ops
