"""The flat torch step (``backend="torch"``): reference-equal on the layouts the small-layer
tests of test_optim.py do not reach, torch.optim.SGD's bits on plain parameters, no host read
per step, a number of ops that does not grow with the depth of the network, tensor learning
rates, and CUDA graph capture where a GPU exists."""

from __future__ import annotations

import contextlib
import functools

import geoopt
import pytest
import torch

from fgo_geoopt import FGSGD, build_collection, register_manifold
from fgo_geoopt.manifolds import KernelSphere
from fgo_geoopt.manifolds.registry import unregister_manifold
from fgo_geoopt.optim.counting import DispatchCounter, HostSyncError
from fgo_geoopt.optim.reference import reference_step

OP_BUDGET = 400


def _param(shape, grouping="pio4", *, seed=0, dtype=torch.float64, scaled=False, device="cpu"):
    coll = build_collection(shape, grouping, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if scaled:
        coll.set_scale(0.5 + torch.rand(shape[1], generator=gen, dtype=torch.float64))
    x = coll.projx(torch.randn(shape, generator=gen, dtype=torch.float64))
    return geoopt.ManifoldParameter(x.to(device=device, dtype=dtype), manifold=coll)


def _worst_against_reference(layers, hyper, steps, *, metric="unit", scaled=True, late=()):
    """Step the torch backend and reference.py on the same gradients; layers listed in
    ``late`` get their first gradient at step 2 (mixed first steps in one call)."""
    params = [_param(s, "pio4", seed=i, scaled=scaled) for i, s in enumerate(layers)]
    ref_w = [p.detach().clone() for p in params]
    ref_b = [None] * len(params)
    opt = FGSGD(params, backend="torch", metric=metric, **hyper)
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    ref_hyper = {k: v for k, v in hyper.items() if k not in ("adaptive_step", "maximize")}
    sign = -1.0 if hyper.get("maximize") else 1.0
    for step in range(steps):
        for i, p in enumerate(params):
            if step == 0 and i in late:
                p.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3.0
            p.grad = g
            ref_w[i], ref_b[i] = reference_step(
                p.manifold, ref_w[i], sign * g, ref_b[i],
                adaptive=hyper.get("adaptive_step", True), metric=metric, **ref_hyper,
            )  # fmt: skip
        opt.step()
        for i, p in enumerate(params):
            worst = max(worst, (p.detach() - ref_w[i]).abs().max().item())
            if hyper.get("momentum") and ref_b[i] is not None:
                buf = opt.momentum_buffer(p).reshape(ref_b[i].shape)
                worst = max(worst, (buf - ref_b[i]).abs().max().item())
    return worst


# Filter-view layers whose columns are several sub-rows (64 + 64 + 64, 8 + 8 + 8) next to
# single-row ones, a wide 2x3 kernel (stored transposed) and 3x3 / 5x5 kernels: every bucket
# kind in one call.
MIXED_LAYERS = ((3, 192, 1, 1), (4, 128, 1, 1), (3, 24), (4, 3, 1, 1), (2, 3, 2, 3), (3, 4, 3, 3),
                (2, 2, 5, 5))  # fmt: skip
HYPERS = {
    "nesterov-wd": {"lr": 0.5, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "dampening-fixed": {"lr": 0.3, "momentum": 0.8, "dampening": 0.3, "adaptive_step": False},
    "sgd-maximize": {"lr": 0.5, "maximize": True},
}


@pytest.mark.parametrize("metric", ["unit", "stored"])
@pytest.mark.parametrize("name", list(HYPERS))
def test_every_bucket_kind_matches_reference(name, metric):
    worst = _worst_against_reference(MIXED_LAYERS, HYPERS[name], steps=8, metric=metric)
    assert worst < 1e-10, f"max deviation from reference.py {worst:.3e}"


@pytest.mark.parametrize("dampening", [0.0, 0.4])
def test_layers_on_their_first_step_next_to_later_ones(dampening):
    hyper = {"lr": 0.4, "momentum": 0.9, "dampening": dampening}
    worst = _worst_against_reference(MIXED_LAYERS, hyper, steps=4, late=(0, 3, 5))
    assert worst < 1e-10


def test_registered_manifolds_take_the_per_layer_step():
    class MySphere(KernelSphere):
        pass

    register_manifold("my_sphere_flat_test", MySphere)
    try:
        results = []
        for names in (("sphere", "euclidean"), ("my_sphere_flat_test", "euclidean")):
            coll = build_collection((4, 3, 3, 3), "pio", names, seed=3)
            x = coll.projx(torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=_gen(0)))
            p = geoopt.ManifoldParameter(x, manifold=coll)
            opt = FGSGD([p], lr=0.3, momentum=0.9, backend="torch")
            gen = _gen(1)
            for _ in range(5):
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen)
                opt.step()
            results.append(p.detach())
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)
    finally:
        unregister_manifold("my_sphere_flat_test")


@pytest.mark.parametrize("preset", ["pio4", "st", "pio3"])
def test_degenerate_kernels_become_what_the_manifolds_make_of_them(preset, monkeypatch):
    """Kernels moved exactly to zero (a momentum buffer edited from outside): the flat step
    gives what the per-layer path, through the manifolds' own retractions, gives."""
    import fgo_geoopt.optim.torch_step as torch_step

    results = []
    for per_layer in (False, True):
        if per_layer:  # no layer is flat: every one takes the per-layer step
            monkeypatch.setattr(torch_step, "flat_kinds", lambda coll, workspace: None)
        params = [_param(s, preset, seed=i) for i, s in enumerate(MIXED_LAYERS)]
        opt = FGSGD(params, lr=0.5, momentum=0.5, adaptive_step=False, backend="torch")
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # creates the (zero) buffers
        for p in params:
            buf = opt.state[p]["momentum_buffer"]
            chosen = torch.arange(0, buf.shape[0], 3)
            # x - lr * momentum * buf == 0 exactly (powers of two)
            buf[chosen] = p.detach().reshape(buf.shape)[chosen] * 4.0
        opt.step()
        for p in params:
            assert not p.manifold.violations(p.detach(), atol=1e-10, rtol=0)
        results.append([(p.detach().clone(), opt.momentum_buffer(p).clone()) for p in params])
    for (wa, ba), (wb, bb) in zip(*results, strict=True):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-12)
        torch.testing.assert_close(ba, bb, rtol=0, atol=1e-12)


def test_channels_last_weights_take_the_same_step():
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        params = [_param(s, seed=i) for i, s in enumerate(((4, 3, 3, 3), (6, 4, 1, 1)))]
        for p in params:
            p.data = p.data.contiguous(memory_format=fmt)
        plain = torch.nn.Parameter(torch.ones(2, 3, 2, 2, dtype=torch.float64))
        plain.data = plain.data.contiguous(memory_format=fmt)
        params.append(plain)
        opt = FGSGD(params, lr=0.3, momentum=0.9, backend="torch")
        gen = _gen(0)
        for _ in range(3):
            for p in params:
                grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.grad = grad.contiguous(memory_format=fmt)
            opt.step()
        assert params[0].is_contiguous(memory_format=fmt)
        results.append([p.detach().contiguous() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- plain parameters
SGD_CONFIGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(c))
def test_plain_parameters_are_torch_sgd_to_the_bit(config, dtype):
    gen = _gen(0)
    shapes = [(), (7,), (3, 5), (2, 3, 3, 3), (1000,), (33,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    ours.append(torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=gen).to(dtype)
                                   .contiguous(memory_format=torch.channels_last)))  # fmt: skip
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FGSGD(ours, lr=0.05, **config)
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=True, **config)
    for step in range(12 if dtype != torch.bfloat16 else 3):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            pairs = [(a, b)]
            if config.get("momentum"):
                pairs.append((opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"]))
            for x, y in pairs:
                if dtype == torch.bfloat16:
                    # torch's own 16-bit CPU kernels round differently at the end of a
                    # vector (the same tensor, cut elsewhere, gives other last bits)
                    torch.testing.assert_close(x, y, rtol=2**-6, atol=2**-6, msg=f"step {step}")
                else:
                    assert torch.equal(x, y), f"step {step}"


# ----------------------------------------------------------------------------- syncs and ops
def _config(model: torch.nn.Module) -> dict:
    """Scales on every other wrapped layer, so that both layouts of the scale data and the
    stored metric are part of the measured step."""
    colls = [p.manifold for p in model.parameters() if hasattr(p, "manifold")]
    gen = _gen(5)
    for coll in colls[::2]:
        coll.set_scale(0.5 + torch.rand(coll.in_channels, generator=gen, dtype=torch.float64))
    return {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
            "metric": "stored", "backend": "torch"}  # fmt: skip


@functools.cache
def _wrapped(name: str) -> tuple[torch.nn.Module, dict]:
    timm = pytest.importorskip("timm")
    import fgo_geoopt

    torch.manual_seed(0)
    model = fgo_geoopt.wrap(timm.create_model(name, pretrained=False), "pio4")
    return model, _config(model)


def _measure(params: list[torch.Tensor], config: dict, *, strict=contextlib.nullcontext,
             nan=False):  # fmt: skip
    """Ops of the third step (the first builds the index sets and may read the host), with
    ``strict()`` entered around it only."""
    opt = FGSGD(params, **config)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01 if p.device.type != "meta" else torch.empty_like(p)
        if step < 2:
            opt.step()
    if nan:  # one kernel of the stem (one POM) and one plain parameter
        params[0].grad[0, 0, 0, 0] = float("nan")
        params[1].grad[0] = float("nan")
    counter = DispatchCounter(forbid_sync=strict is not contextlib.nullcontext)
    with strict(), counter:
        opt.step()
    return counter, opt


def test_step_reads_nothing_on_the_host(monkeypatch):
    model, config = _wrapped("resnet18")
    params = list(model.parameters())
    assert hasattr(params[0], "manifold") and not hasattr(params[1], "manifold")

    def refuse(self, *args, **kwargs):
        raise HostSyncError("host read of a tensor's values")

    @contextlib.contextmanager
    def strict():  # host reads that dispatch no op on CPU, besides those the counter sees
        with monkeypatch.context() as patch:
            for name in ("tolist", "numpy", "__bool__", "__int__", "__float__", "item"):
                patch.setattr(torch.Tensor, name, refuse)
            yield

    counter, opt = _measure(params, config, strict=strict, nan=True)
    assert counter.syncs == 0
    assert opt.nonfinite_count == 2  # counted on the device, read here
    assert counter.ops <= OP_BUDGET, counter.by_name.most_common(10)
    _CPU_COUNTS["resnet18"] = counter.ops


_CPU_COUNTS: dict[str, int] = {}


def _on_meta(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's parameters as meta tensors on the same collections: the step dispatches
    the same ops without computing anything."""
    out = []
    for p in model.parameters():
        empty = torch.empty(p.shape, device="meta", dtype=p.dtype)
        manifold = getattr(p, "manifold", None)
        out.append(geoopt.ManifoldParameter(empty, manifold=manifold) if manifold is not None
                   else torch.nn.Parameter(empty))  # fmt: skip
    return out


def test_ops_per_step_do_not_grow_with_depth():
    counts = {}
    for name in ("resnet18", "resnet34"):
        model, config = _wrapped(name)
        counts[name] = _measure(_on_meta(model), config)[0].ops
    assert counts["resnet18"] == counts["resnet34"] <= OP_BUDGET, counts
    if "resnet18" in _CPU_COUNTS:  # the meta device dispatches what the CPU does
        assert counts["resnet18"] == _CPU_COUNTS["resnet18"]


# ----------------------------------------------------------------------------- capturable
def _twins(device="cpu"):
    """The same small network twice: two wrapped layers and a plain one."""
    out = []
    for _ in range(2):
        plain = torch.linspace(-1, 1, 7, dtype=torch.float64, device=device)
        params = [
            _param((6, 4, 3, 3), seed=1, scaled=True, device=device),
            _param((5, 6, 1, 1), seed=2, device=device),
            torch.nn.Parameter(plain),
        ]
        out.append(params)
    return out


def test_a_tensor_lr_takes_the_step_of_the_number():
    ours, theirs = _twins()
    lr = torch.tensor(0.2, dtype=torch.float64)
    opt = FGSGD(ours, lr=lr, momentum=0.9, nesterov=True, capturable=True, backend="torch")
    ref = FGSGD(theirs, lr=0.2, momentum=0.9, nesterov=True, backend="torch")
    gen = _gen(3)
    for step in range(6):
        if step == 3:  # a schedule writes into the tensor; a captured graph would read it
            lr.fill_(0.05)
            ref.param_groups[0]["lr"] = 0.05
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"nonfinite": "raise"}, "nonfinite='raise'"),
        ({"stabilize": 5}, "stabilize"),
        ({"capturable": 1}, "capturable must be a bool"),
    ],
)
def test_capturable_refuses_what_reads_the_host(extra, message):
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=message):
        FGSGD(params, lr=torch.tensor(0.1), **{"capturable": True, **extra})


def test_nonfinite_count_is_an_int_kept_on_the_device():
    p = _param((4, 3, 3, 3))
    opt = FGSGD([p], lr=0.1, backend="torch")
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert set(opt._skipped_device) == {p.device}  # nothing was read during the step
    count = opt.nonfinite_count
    assert isinstance(count, int) and count == p.manifold.num_poms
    state = opt.state_dict()
    assert state["nonfinite_count"] == count and isinstance(state["nonfinite_count"], int)
    opt.nonfinite_count = 3
    assert opt.nonfinite_count == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_graph_replays_the_eager_step(backend):
    ours, theirs = ([_as_float32(p) for p in twin] for twin in _twins("cuda"))
    lr = torch.tensor(0.2, device="cuda")
    opt = FGSGD(ours, lr=lr, momentum=0.9, capturable=True, backend=backend)
    ref = FGSGD(theirs, lr=0.2, momentum=0.9, backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(8, *p.shape, generator=gen, device="cuda") for p in ours]
    for p in ours:
        p.grad = torch.zeros_like(p)  # static gradients: replays read them in place
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds the index sets and the buffers
        for step in range(3):
            for p, q, g in zip(ours, theirs, grads, strict=True):
                p.grad.copy_(g[step])
                q.grad = g[step].clone()
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 8):
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad.copy_(g[step])
            q.grad = g[step].clone()
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def _as_float32(p: torch.Tensor) -> torch.Tensor:
    manifold = getattr(p, "manifold", None)
    data = p.detach().float()
    if manifold is None:
        return torch.nn.Parameter(data)
    return geoopt.ManifoldParameter(data, manifold=manifold)
