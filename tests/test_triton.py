"""The Triton backend (``backend="triton"``): every manifold kind equal to reference.py,
constraints after every step, the skip policy, tensor learning rates, and few launches per step.

Without a GPU the kernels run on CPU tensors in triton's interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` before anything defines them); it executes every program in Python, so
the shapes here are small and the step counts low. With a GPU the same tests run compiled.
"""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_geoopt import FGSGD, build_collection
from fgo_geoopt.optim import gpu
from fgo_geoopt.optim.reference import reference_step

pytest.importorskip("triton", reason="the Triton backend needs triton (fgo-geoopt[gpu])")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not gpu.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

# A 3x3 layer (every kind in pio4), a wide 2x3 kernel (stored transposed), filter-view columns
# of two lengths.
LAYERS = ((3, 4, 3, 3), (2, 3, 2, 3), (6, 64, 1, 1), (4, 24))
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2}


def _params(layers, grouping="pio4", *, dtype=torch.float32, scaled=False, seed=0):
    out = []
    for i, shape in enumerate(layers):
        coll = build_collection(shape, grouping, seed=seed + i)
        gen = torch.Generator().manual_seed(seed + i)
        if scaled:
            coll.set_scale(0.5 + torch.rand(shape[1], generator=gen, dtype=torch.float64))
        x = coll.projx(torch.randn(shape, generator=gen, dtype=torch.float64))
        out.append(geoopt.ManifoldParameter(x.to(DEVICE, dtype), manifold=coll))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("scaled", "metric"), [(False, "unit"), (True, "unit"), (True, "stored")], ids=str
)
@pytest.mark.parametrize("grouping", ["pio4", "st"])
def test_every_kind_matches_reference(grouping, scaled, metric, dtype):
    params = _params(LAYERS, grouping, dtype=dtype, scaled=scaled)
    hyper = {"lr": 0.5, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
    opt = FGSGD(params, backend="triton", metric=metric, **hyper)
    ref = [[p.detach().double().cpu(), None] for p in params]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(3):
        for p, r in zip(params, ref, strict=True):
            g = (3.0 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype)
            p.grad = g.to(DEVICE)
            r[0], r[1] = reference_step(p.manifold, r[0], g.double(), r[1], metric=metric, **hyper)
        opt.step()
        for p, (w, b) in zip(params, ref, strict=True):
            worst = max(worst, (p.detach().double().cpu() - w).abs().max().item())
            buf = opt.momentum_buffer(p).double().cpu().reshape(b.shape)
            worst = max(worst, (buf - b).abs().max().item())
        if dtype == torch.bfloat16:  # 16-bit storage: restart the reference from it
            ref = [[p.detach().double().cpu(), opt.momentum_buffer(p).double().cpu()
                    .reshape(r[1].shape)] for p, r in zip(params, ref, strict=True)]  # fmt: skip
    assert worst < TOLERANCE[dtype], f"max deviation from reference.py {worst:.3e}"


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_first_steps_next_to_later_ones_and_a_tensor_lr(dampening):
    """Layers that join at the second step (the per-kernel momentum factor) and a learning
    rate in a tensor, against the flat torch step."""
    results = []
    for backend in ("triton", "torch"):
        params = _params(LAYERS, scaled=True, seed=4)
        lr = torch.tensor(0.3, device=DEVICE)
        opt = FGSGD(params, lr=lr, momentum=0.9, dampening=dampening, backend=backend,
                    capturable=True)  # fmt: skip
        gen = torch.Generator().manual_seed(2)
        for step in range(3):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen).to(DEVICE)
                p.grad = None if step == 0 and i % 2 else g
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_a_nonfinite_pom_keeps_its_weights_and_is_counted_on_the_device():
    params = _params(LAYERS[:1] + LAYERS[2:3])
    opt = FGSGD(params, lr=0.3, momentum=0.9, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    coll = params[0].manifold
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[1, 2, 0, 0] = float("nan")  # kernel 1 * 4 + 2
    opt.step()
    in_pom = (coll.kernel_pom == coll.kernel_pom[6]).to(DEVICE).view(-1, 1)
    kx = params[0].detach().reshape(coll.num_kernels, -1)
    kx0 = before[0].reshape(coll.num_kernels, -1)
    assert torch.equal(torch.where(in_pom, kx, kx0), kx0)
    assert bool((kx != kx0).any(dim=1)[~in_pom.view(-1)].all())
    assert not torch.equal(params[1], before[1])
    assert opt.nonfinite_count == 1


@pytest.mark.parametrize("grouping", ["pio4", "st"])
def test_degenerate_kernels_as_the_torch_step(grouping):
    """Kernels moved exactly to zero (a buffer edited from outside) take the manifolds'
    fallbacks, as in the flat torch step."""
    results = []
    for backend in ("triton", "torch"):
        params = _params(LAYERS, grouping, seed=2)
        opt = FGSGD(params, lr=0.5, momentum=0.5, adaptive_step=False, backend=backend)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in params:
            buf = opt.state[p]["momentum_buffer"]
            chosen = torch.arange(0, buf.shape[0], 2)
            buf[chosen] = p.detach().reshape(buf.shape)[chosen] * 4.0  # x - 0.25 buf == 0
        opt.step()
        results.append([(p.detach().cpu(), opt.momentum_buffer(p).cpu()) for p in params])
    for (wa, ba), (wb, bb) in zip(*results, strict=True):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6)
        torch.testing.assert_close(ba, bb, rtol=0, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(
    grouping=st.sampled_from(["pio4", "st", "pio3", "poms_st"]),
    seed=st.integers(0, 2**10),
    lr=st.floats(1e-3, 10.0),
    momentum=st.sampled_from([0.0, 0.9]),
    grad_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    scaled=st.booleans(),
)
def test_every_step_stays_on_the_manifold(grouping, seed, lr, momentum, grad_scale, scaled):
    params = _params(((3, 3, 3, 3), (2, 2, 1, 7), (3, 16, 1, 1)), grouping, scaled=scaled,
                     seed=seed)  # fmt: skip
    opt = FGSGD(params, lr=lr, momentum=momentum, backend="triton")
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        for p in params:
            p.grad = (grad_scale * torch.randn(p.shape, generator=gen)).to(DEVICE)
        opt.step()
        for p in params:
            bad = p.manifold.violations(p.detach(), atol=1e-5, rtol=0.0)
            assert not bad, f"after step {step + 1}: {bad}"
            assert bool(torch.isfinite(p).all())


def test_launches_per_step_on_a_small_resnet(monkeypatch):
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, ResNet

    import fgo_geoopt
    from fgo_geoopt.optim.gpu import _launch

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(4, 8, 8, 8), num_classes=5)
    assert timm.__version__
    fgo_geoopt.wrap(model, "pio4")
    model.to(DEVICE)
    opt = FGSGD(model.parameters(), lr=0.1, momentum=0.9, backend="triton")
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    launches = []
    real = _launch.launch

    def counted(kernel, grid, *args, **kwargs):
        launches.append(kernel)
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launch, "launch", counted)
    opt.step()
    kernel_shapes = {p.manifold.kernel_shape for p in model.parameters() if hasattr(p, "manifold")}
    assert len(kernel_shapes) >= 3  # 7x7, 3x3 and filter-view columns
    assert 0 < len(launches) <= 64, len(launches)


def test_triton_refuses_what_it_cannot_step():
    coll = build_collection((4, 3, 3, 3), "pio4")
    p = geoopt.ManifoldParameter(coll.projx(torch.randn(4, 3, 3, 3, dtype=torch.float64)),
                                 manifold=coll)  # fmt: skip
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"backend='triton' cannot step a torch\.float64"):
        FGSGD([p], lr=0.1, backend="triton").step()
