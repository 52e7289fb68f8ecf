"""FGAdam: torch.optim.AdamW on plain parameters, reference_adam.py on collections, manifold
invariance, resume, non-finite policies, loaded-state checks, argument validation, DDP."""

from __future__ import annotations

import contextlib
import copy

import geoopt
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgo_geoopt import FGAdam, build_collection
from fgo_geoopt.collections import KernelCollection
from fgo_geoopt.optim import cpu
from fgo_geoopt.optim.reference_adam import reference_adam_step

# Both backends of collection parameters; the fused one needs numba.
BACKENDS = [
    "torch",
    pytest.param(
        "fused", marks=pytest.mark.skipif(not cpu.AVAILABLE, reason="numba is not importable")
    ),
]

# Strategies (default manifolds Sp+Ob+St), the Table 3 presets and Sp / Ob / Euc mixes.
GROUPINGS = (
    ("pio", None),
    ("single", None),
    ("st", None),
    ("poms_st", None),
    ("pio3", None),
    ("pio4", None),
    ("pi", ("sphere", "euclidean")),
    ("po", ("oblique", "euclidean")),
    ("pio", ("sphere", "oblique")),
)
GROUPING_IDS = [g if m is None else f"{g}-{'+'.join(m)}" for g, m in GROUPINGS]
# A 3x3 conv, a factorised 1x7 conv, a 2x3 kernel (oblique / Stiefel taken transposed), a 1x1
# conv and a Linear layer (the last two: filter view, stepped row by row in place).
LAYERS = ((4, 3, 3, 3), (3, 2, 1, 7), (2, 3, 2, 3), (4, 3, 1, 1), (3, 5))
FIXTURE_OK = [*settings().suppress_health_check, HealthCheck.function_scoped_fixture]


def _randn(*shape, gen: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)


def _manifold_param(
    shape, grouping="pio4", manifolds=None, *, seed=0, dtype=torch.float64, scaled=False
) -> geoopt.ManifoldParameter:
    coll = build_collection(shape, grouping, manifolds, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if scaled:
        coll.set_scale(0.5 + torch.rand(shape[1], generator=gen, dtype=torch.float64))
    x = coll.projx(_randn(*shape, gen=gen)).to(dtype)
    return geoopt.ManifoldParameter(x, manifold=coll)


def _kernel_grad(coll: KernelCollection, gen: torch.Generator) -> torch.Tensor:
    """Kernels whose gradients span four orders of magnitude: the POMs' second moments differ."""
    g = _randn(coll.num_kernels, coll.kernel_numel, gen=gen)
    mag = 10.0 ** (4.0 * torch.rand(coll.num_kernels, 1, generator=gen, dtype=torch.float64) - 2)
    return (g * mag).reshape(coll.shape)


def _violations(p: torch.Tensor, atol: float) -> list[str]:
    return p.manifold.violations(p.detach(), atol=atol, rtol=0.0)


@contextlib.contextmanager
def _one_thread():
    """reference_adam.py calls LAPACK once per kernel: intra-op threads only add barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------- plain parameters == AdamW
ADAMW_CONFIGS = [
    {},
    {"weight_decay": 0.0},
    {"amsgrad": True},
    {"maximize": True, "weight_decay": 0.1},
    {"betas": (0.5, 0.9), "eps": 1e-3, "amsgrad": True, "maximize": True},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=lambda c: "-".join(c) or "default")
def test_plain_parameters_match_torch_adamw_bit_for_bit(config, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (3, 5), (2, 3, 3, 3), (4, 1, 1, 7)]
    ours = [torch.nn.Parameter(_randn(*s, gen=gen, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FGAdam(ours, lr=0.05, **config)
    ref = torch.optim.AdamW(theirs, lr=0.05, foreach=True, **config)
    for step in range(6):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = _randn(*a.shape, gen=gen, dtype=dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
            for key, value in ref.state[b].items():
                assert torch.equal(opt.state[a][key], value), key


# ----------------------------------------------------------------- collections == reference
REF_CONFIGS = {
    "adam": {},
    "rescaled-wd": {"scaled": True, "weight_decay": 0.1},
    "amsgrad-maximize-rescaled": {"scaled": True, "amsgrad": True, "maximize": True},
    "kernel-moment-wd": {"moment": "kernel", "weight_decay": 0.1},
    "kernel-moment-amsgrad-rescaled": {"moment": "kernel", "amsgrad": True, "scaled": True},
    "stored-metric-rescaled-wd": {"metric": "stored", "scaled": True, "weight_decay": 0.1},
}


def _run_against_reference(
    grouping, manifolds, config, *, steps, dtype=torch.float64, device="cpu", backend="auto"
):
    """Step FGAdam and reference_adam.py on the same gradients; return the worst errors of the
    weights, the first moments and the second moments (relative)."""
    config = dict(config)
    scaled = config.pop("scaled", False)
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.0, **config}
    start = [
        _manifold_param(s, grouping, manifolds, seed=i, scaled=scaled) for i, s in enumerate(LAYERS)
    ]
    params = [
        geoopt.ManifoldParameter(p.detach().to(device, dtype), manifold=p.manifold) for p in start
    ]
    opt = FGAdam(params, backend=backend, **hyper)
    ref_w = [p.detach().clone() for p in start]
    ref_s: list = [None] * len(start)
    gen = torch.Generator().manual_seed(123)
    worst = {"weight": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for _ in range(steps):
        grads = [_kernel_grad(p.manifold, gen) for p in start]
        with _one_thread():
            for i, p in enumerate(start):
                ref_w[i], ref_s[i] = reference_adam_step(
                    p.manifold, ref_w[i], grads[i], ref_s[i], **hyper
                )
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device, dtype)
        opt.step()
        for i, p in enumerate(params):
            mine = {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            theirs = ref_s[i]
            worst["weight"] = max(worst["weight"], (p.cpu().double() - ref_w[i]).abs().max().item())
            m = opt.exp_avg(p).cpu().double().reshape(theirs["exp_avg"].shape)
            worst["exp_avg"] = max(worst["exp_avg"], (m - theirs["exp_avg"]).abs().max().item())
            key = "max_exp_avg_sq" if hyper.get("amsgrad") else "exp_avg_sq"
            rel = (mine[key].double() - theirs[key]).abs() / theirs[key]
            worst["exp_avg_sq"] = max(worst["exp_avg_sq"], rel.max().item())
    return worst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(REF_CONFIGS), ids=str)
@pytest.mark.parametrize(("grouping", "manifolds"), GROUPINGS, ids=GROUPING_IDS)
def test_step_matches_reference_float64(grouping, manifolds, config, backend):
    worst = _run_against_reference(
        grouping, manifolds, REF_CONFIGS[config], steps=8, backend=backend
    )
    assert max(worst.values()) < 1e-10, worst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["adam", "amsgrad-maximize-rescaled", "kernel-moment-wd"])
@pytest.mark.parametrize("grouping", ["st", "pio3", "pio4"])
def test_step_matches_reference_float32(grouping, config, backend):
    worst = _run_against_reference(
        grouping, None, REF_CONFIGS[config], steps=8, dtype=torch.float32, backend=backend
    )
    assert max(worst.values()) < 1e-5, worst


def test_batched_step_matches_reference_on_device(device):
    config = REF_CONFIGS["amsgrad-maximize-rescaled"]
    worst = _run_against_reference("pio4", None, config, steps=4, device=device)
    assert max(worst.values()) < 1e-10, worst


def test_second_moment_is_the_mean_square_per_pom_by_hand():
    """One step from zero moments: v_g = (1 - b2) |r_g|^2 / N_g, and a POM whose gradient is
    c times another's takes the same step (Adam's invariance, per POM)."""
    p = _manifold_param((4, 3, 3, 3), "pio4", seed=4)
    coll = p.manifold
    gen = torch.Generator().manual_seed(0)
    grad = _kernel_grad(coll, gen)
    hyper = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-300, "weight_decay": 0.0}
    opt = FGAdam([p], **hyper)
    before = p.detach().clone()
    p.grad = grad
    opt.step()
    r = coll.unit_proju(before, grad.reshape(coll.num_kernels, -1)).reshape(coll.num_kernels, -1)
    sq = torch.zeros(coll.num_poms, dtype=torch.float64)
    sq.index_add_(0, coll.kernel_pom, r.pow(2).sum(1))
    expected = 0.01 * sq / (coll.pom_sizes * coll.kernel_numel)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], expected, rtol=1e-14, atol=0)
    # Scaling one POM's gradient by 1000 leaves every kernel's step unchanged.
    in_pom = (coll.kernel_pom == coll.kernel_pom[0]).view(4, 3, 1, 1)
    q = geoopt.ManifoldParameter(before.clone(), manifold=coll)
    q.grad = torch.where(in_pom, 1000.0 * grad, grad)
    FGAdam([q], **hyper).step()
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (6, 4, 1, 1)], ids=["spatial", "filter"])
@pytest.mark.parametrize("metric", ["unit", "stored"])
def test_first_step_moves_every_pom_by_lr_per_entry_in_its_metric(metric, shape):
    """From zero moments the direction is r / rms(r): each POM moves by lr per entry (rms),
    measured in unit coordinates (metric="unit") or in the stored weights ("stored")."""
    p = _manifold_param(shape, "pio3", seed=6, scaled=True)
    coll = p.manifold
    before = p.detach().clone()
    p.grad = _kernel_grad(coll, torch.Generator().manual_seed(0))
    lr = 1e-5  # the retraction's second-order change is below the tolerance
    FGAdam([p], lr=lr, eps=1e-30, weight_decay=0.0, metric=metric).step()
    moved = (p.detach() - before).reshape(coll.num_kernels, -1)
    if metric == "unit":
        moved = moved / coll.elem_scale(p.device, p.dtype).repeat(coll.shape[0], 1)
    sq = torch.zeros(coll.num_poms, dtype=torch.float64)
    sq.index_add_(0, coll.kernel_pom, moved.pow(2).sum(1))
    rms = (sq / (coll.pom_sizes * coll.kernel_numel)).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, lr), rtol=1e-4, atol=0)


def test_kernel_moment_has_one_scalar_per_kernel():
    p = _manifold_param((8, 6, 3, 3), "pio4")
    assert p.manifold.num_poms != p.manifold.num_kernels
    opt = FGAdam([p], moment="kernel")
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].shape == (p.manifold.num_kernels,)
    assert opt.state[p]["exp_avg"].shape == (p.manifold.num_kernels, 9)
    opt.param_groups[0]["moment"] = "pom"
    with pytest.raises(ValueError, match="moment mode of a group cannot change"):
        opt.step()


def test_first_moment_layouts_and_stabilize():
    """The torch backend keeps the first moment of gathered layers in the step's blocks;
    exp_avg() converts it, and stabilize() projects it in either layout."""
    gathered = _manifold_param((6, 4, 3, 3), "pio4", seed=1, dtype=torch.float32)
    rows = _manifold_param((6, 4, 1, 1), "pio4", seed=2, dtype=torch.float32)
    opt = FGAdam([gathered, rows], lr=0.05, stabilize=2, backend="torch")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in (gathered, rows):
            p.grad = _randn(*p.shape, gen=gen, dtype=torch.float32)
        opt.step()
    assert opt.state[gathered]["exp_avg_blocks"] == 1 and "exp_avg_blocks" not in opt.state[rows]
    assert opt.exp_avg(rows) is opt.state[rows]["exp_avg"]
    m = opt.exp_avg(gathered)
    assert m.shape == (24, 9) and not torch.equal(m, opt.state[gathered]["exp_avg"])
    with torch.no_grad():  # knock both off the manifold; stabilize() must bring them back
        gathered.mul_(1.1)
        rows.mul_(1.1)
    opt.stabilize()
    for p in (gathered, rows):
        assert not _violations(p, atol=1e-5)
        m = opt.exp_avg(p)
        torch.testing.assert_close(m, p.manifold.unit_proju(p.detach(), m), rtol=0, atol=1e-6)


@pytest.mark.skipif(not cpu.AVAILABLE, reason="numba is not importable")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_switching_backends_mid_run_keeps_the_run(amsgrad):
    """Steps alternating between the backends (the first moment changes layout each time, a
    state dict is saved and loaded in between) land where the torch backend alone lands."""
    shapes = ((6, 4, 3, 3), (5, 3, 1, 7), (6, 4, 1, 1))
    one = [_manifold_param(s, "pio4", seed=i, scaled=True) for i, s in enumerate(shapes)]
    two = [geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold) for p in one]
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "amsgrad": amsgrad}
    alone = FGAdam(one, backend="torch", **kwargs)
    gen = torch.Generator().manual_seed(5)
    state = None
    for backend in ("fused", "torch", "fused", "fused", "torch", "fused"):
        mixed = FGAdam(two, backend=backend, **kwargs)
        if state is not None:
            mixed.load_state_dict(state)
            assert mixed.param_groups[0]["backend"] == backend
        for _ in range(2):
            grads = [_kernel_grad(p.manifold, gen) for p in one]
            for a, b, g in zip(one, two, grads, strict=True):
                a.grad, b.grad = g.clone(), g.clone()
            alone.step()
            mixed.step()
        state = copy.deepcopy(mixed.state_dict())
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
            torch.testing.assert_close(mixed.exp_avg(b), alone.exp_avg(a), rtol=0, atol=1e-12)
            for key in ("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",):
                torch.testing.assert_close(
                    mixed.state[b][key], alone.state[a][key], rtol=1e-12, atol=0
                )


@pytest.mark.skipif(not cpu.AVAILABLE, reason="numba is not importable")
@pytest.mark.parametrize(
    ("shape", "grouping"),
    [
        ((40, 16, 3, 3), "pio4"),
        ((40, 20, 3, 3), "single"),
        ((40, 16, 7, 7), "pio3"),
        ((300, 4), "pio4"),
    ],
)
def test_fused_pieces_add_up_to_the_whole_step(shape, grouping):
    """The threads' pieces (ranges of kernels, or of chunks of lanes) of every phase, run in
    any order, give the step of one piece bit for bit; layers of several chunks."""
    from fgo_geoopt.optim import adam_step
    from fgo_geoopt.optim.cpu._adam_jobs import AdamJob, adam_plan

    p = _manifold_param(shape, grouping, seed=4, dtype=torch.float32, scaled=True)
    coll = p.manifold
    plan = adam_plan(coll)
    assert plan.rows or len(plan.chunk_block) > 3  # several chunks to share out
    hyper = adam_step.AdamHyper(0.05, 0.9, 0.99, 1e-8, 0.1, True, False, "pom", "stored", True)
    gen = torch.Generator().manual_seed(0)
    k, n = coll.num_kernels, coll.kernel_numel
    grad = _kernel_grad(coll, gen).to(torch.float32).view(k, n)
    grad[3, 0] = float("nan")  # one POM skipped
    results = []
    for parts in (1, 3, 5):
        x = p.detach().clone().view(k, n)
        m = _randn(k, n, gen=torch.Generator().manual_seed(1), dtype=torch.float32)
        v = torch.rand(coll.num_poms, generator=torch.Generator().manual_seed(2))
        vmax = v.clone()
        job = AdamJob(
            coll, plan, x.numpy(), grad.numpy(), m.numpy(), v.numpy(), vmax.numpy(), hyper, 3.0
        )
        skipped = 0
        for phase in job.phases:
            pieces = list(range(parts if phase.split else 1))
            for c in reversed(pieces):
                skipped += phase.run(c, len(pieces))
        results.append((x, m, v, vmax, skipped))
    for x, m, v, vmax, skipped in results[1:]:
        assert skipped == results[0][4] == 1
        for a, b in zip((x, m, v, vmax), results[0][:4], strict=True):
            assert torch.equal(a, b)


def test_fused_backend_refuses_what_it_cannot_step(monkeypatch):
    import importlib

    dispatch = importlib.import_module("fgo_geoopt.optim._dispatch")
    monkeypatch.setattr(dispatch, "_FALLBACK_WARNED", set())
    p = _manifold_param((4, 3, 3, 3), "pio4", dtype=torch.bfloat16)
    p.grad = torch.randn_like(p)
    if not cpu.AVAILABLE:
        with pytest.raises(ValueError, match="backend='fused' needs numba"):
            FGAdam([p], backend="fused")
        return
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"backend='fused' cannot step a torch\.bfloat16"):
        FGAdam([p], backend="fused").step()
    assert torch.equal(p, before)
    with pytest.warns(UserWarning, match="batched torch ops.*not torch.bfloat16"):
        FGAdam([p]).step()  # "auto" says that it falls back
    assert not torch.equal(p, before)


def test_weight_decay_only_touches_euclidean_kernels_and_plain_parameters():
    base = _manifold_param((8, 6, 3, 3), "pio4", seed=3, scaled=True)
    coll = base.manifold
    euclid = coll.kernel_type() == coll.manifold_names.index("euclidean")
    sphere = geoopt.Sphere()
    results = []
    for wd in (0.0, 0.5):
        p = geoopt.ManifoldParameter(base.detach().clone(), manifold=coll)
        s = geoopt.ManifoldParameter(sphere.projx(torch.ones(5, dtype=torch.float64)), sphere)
        w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = FGAdam([p, s, w], lr=0.1, weight_decay=wd)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            p.grad = _kernel_grad(coll, gen)
            s.grad = _randn(5, gen=gen)
            w.grad = _randn(3, gen=gen)
            opt.step()
        results.append((p.detach().reshape(coll.num_kernels, -1), s.detach(), w.detach()))
    (p0, s0, w0), (p1, s1, w1) = results
    assert torch.equal(p0[~euclid], p1[~euclid]) and torch.equal(s0, s1)
    assert bool((p0[euclid] != p1[euclid]).any(dim=1).all()) and not torch.equal(w0, w1)


# ----------------------------------------------------------------- stays on the manifold
@settings(max_examples=12, suppress_health_check=FIXTURE_OK, deadline=None)
@given(
    layer=st.sampled_from([(4, 3, 3, 3), (3, 2, 1, 7), (5, 3, 1, 1), (4, 6), (3, 2, 5, 5)]),
    grouping=st.sampled_from(["pi", "po", "pio", "single", "st", "poms_st", "pio3", "pio4"]),
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-4, 1.0),
    amsgrad=st.booleans(),
    moment=st.sampled_from(["pom", "kernel"]),
    grad_scale=st.sampled_from([1e-6, 1.0, 1e4]),
    scaled=st.booleans(),
    backend=st.sampled_from(["torch", "fused"] if cpu.AVAILABLE else ["torch"]),
)
def test_every_step_stays_on_the_manifold(
    layer, grouping, seed, lr, amsgrad, moment, grad_scale, scaled, backend
):
    p = _manifold_param(layer, grouping, seed=seed, dtype=torch.float32, scaled=scaled)
    opt = FGAdam([p], lr=lr, amsgrad=amsgrad, moment=moment, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    grads = grad_scale * _randn(60, *layer, gen=gen, dtype=torch.float32)
    for step in range(60):
        p.grad = grads[step]
        opt.step()
        bad = _violations(p, atol=1e-5)
        assert not bad, f"after step {step + 1}: {bad}"
    m = opt.exp_avg(p)
    assert bool(torch.isfinite(p).all()) and bool(torch.isfinite(m).all())
    # The first moment lives in the tangent space of the current point (unit coordinates).
    tol = 1e-5 * float(m.abs().max())
    torch.testing.assert_close(m, p.manifold.unit_proju(p.detach(), m), rtol=0, atol=tol)


def test_other_geoopt_manifolds_stay_on_them():
    gen = torch.Generator().manual_seed(0)
    sphere, stiefel = geoopt.Sphere(), geoopt.EuclideanStiefel()
    params = [
        geoopt.ManifoldParameter(sphere.projx(_randn(10, gen=gen)), manifold=sphere),
        geoopt.ManifoldParameter(stiefel.projx(_randn(6, 3, gen=gen)), manifold=stiefel),
    ]
    opt = FGAdam(params, lr=0.05, amsgrad=True, stabilize=7)
    for _ in range(30):
        for p in params:
            p.grad = 5.0 * _randn(*p.shape, gen=gen)
        opt.step()
        for p in params:
            p.manifold.assert_check_point_on_manifold(p.detach(), atol=1e-10, rtol=0)
            m = opt.state[p]["exp_avg"]
            p.manifold.assert_check_vector_on_tangent(p.detach(), m, atol=1e-10, rtol=0)
            assert opt.state[p]["exp_avg_sq"].shape == ()  # one POM: the whole tensor


def test_bfloat16_and_channels_last_parameters():
    gen = torch.Generator().manual_seed(0)
    half = _manifold_param((8, 6, 3, 3), "pio4", dtype=torch.bfloat16)
    last = _manifold_param((6, 4, 3, 3), "pio3", seed=1)
    twin = geoopt.ManifoldParameter(last.detach().clone(), manifold=last.manifold)
    with torch.no_grad():
        last.data = last.data.contiguous(memory_format=torch.channels_last)
    opt = FGAdam([half, last], lr=0.05)
    twin_opt = FGAdam([twin], lr=0.05)
    for _ in range(5):
        half.grad = _randn(*half.shape, gen=gen, dtype=torch.bfloat16)
        g = _randn(*last.shape, gen=gen)
        last.grad, twin.grad = g.contiguous(memory_format=torch.channels_last), g
        opt.step()
        twin_opt.step()
        assert not _violations(half, atol=1e-2) and half.dtype == torch.bfloat16
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last.detach().contiguous(), twin.detach())


# ----------------------------------------------------------------- resume in lock-step
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.proj = torch.nn.Conv2d(6, 8, 1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.proj(torch.relu(self.conv(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def _wrap(net: _Net, groupings: dict | None = None) -> dict:
    saved = {}
    for i, name in enumerate(("conv", "proj")):
        mod = getattr(net, name)
        if groupings is None:
            coll = build_collection(mod.weight.shape, "pio4", seed=11 + i)
        else:
            coll = KernelCollection.from_state_dict(groupings[name])
        mod.weight = geoopt.ManifoldParameter(coll.projx(mod.weight.detach()), manifold=coll)
        saved[name] = coll.state_dict()
    return saved


def _train(net, opt, data, steps):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("moment", ["pom", "kernel"])
def test_resume_runs_in_lock_step(moment, tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    hyper = {"lr": 0.01, "weight_decay": 1e-2, "amsgrad": True, "moment": moment, "stabilize": 3}
    torch.manual_seed(0)
    net = _Net()
    groupings = _wrap(net)
    opt = FGAdam(net.parameters(), **hyper)
    _train(net, opt, data, steps=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "groupings": groupings}, path)

    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(1)  # another initialisation: everything must come from the file
    fresh = _Net()
    _wrap(fresh, ckpt["groupings"])
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = FGAdam(fresh.parameters(), lr=0.5)  # the saved group values win
    fresh_opt.load_state_dict(ckpt["optim"])

    _train(net, opt, data, steps=5)
    _train(fresh, fresh_opt, data, steps=5)
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert opt.state[a].keys() == fresh_opt.state[b].keys()
        for key, value in opt.state[a].items():
            other = fresh_opt.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert float(opt.state[net.conv.weight]["step"]) == 9.0
    assert fresh_opt.param_groups[0]["lr"] == 0.01


def test_torch_adamw_state_dict_loads_for_plain_parameters():
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(_randn(3, 4, gen=gen)), torch.nn.Parameter(_randn(6, gen=gen))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    adamw = torch.optim.AdamW(a, lr=0.1, foreach=True, amsgrad=True)
    for _ in range(2):
        for p in a:
            p.grad = _randn(*p.shape, gen=gen)
        adamw.step()
    for p, q in zip(a, b, strict=True):
        q.data.copy_(p.detach())
    fg = FGAdam(b, lr=0.1)
    fg.load_state_dict(copy.deepcopy(adamw.state_dict()))
    assert "foreach" not in fg.param_groups[0] and fg.param_groups[0]["amsgrad"] is True
    for _ in range(3):
        for p, q in zip(a, b, strict=True):
            p.grad = _randn(*p.shape, gen=gen)
            q.grad = p.grad.clone()
        adamw.step()
        fg.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 5)], ids=["conv3x3", "linear"])
def test_torch_adamw_state_for_manifold_parameters_is_refused(shape):
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(_randn(*shape, gen=gen))
    adamw = torch.optim.AdamW([plain], lr=0.1)
    plain.grad = _randn(*shape, gen=gen)
    adamw.step()
    fg = FGAdam([_manifold_param(shape, "pio4")])
    # the Linear's first moment has the (K, n) shape of its filter view: only its origin tells
    with pytest.raises(ValueError, match=r"saved by another optimizer.*create the optimizer"):
        fg.load_state_dict(adamw.state_dict())
    assert fg.state == {}


def test_moments_of_the_wrong_shape_are_refused():
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(_randn(4, 3, 3, 3, gen=gen))
    before = FGAdam([plain])  # FGAdam on the unwrapped weight
    plain.grad = _randn(4, 3, 3, 3, gen=gen)
    before.step()
    wrapped = _manifold_param((4, 3, 3, 3), "pio4")
    with pytest.raises(ValueError, match=r"exp_avg of .* has shape \(4, 3, 3, 3\), FGAdam expects"):
        FGAdam([wrapped]).load_state_dict(before.state_dict())
    larger = _manifold_param((8, 6, 3, 3), "pio4")
    pom = FGAdam([larger])
    larger.grad = torch.randn_like(larger)
    pom.step()
    saved = pom.state_dict()
    saved["param_groups"][0]["moment"] = "kernel"  # a (P,) second moment claimed per kernel
    with pytest.raises(ValueError, match=r"exp_avg_sq .* expects \(48,\) \(moment='kernel'\)"):
        FGAdam([larger]).load_state_dict(saved)
    other = FGAdam([torch.nn.Parameter(_randn(5, gen=gen))])
    with pytest.raises(ValueError, match=r"FGAdam expects \(5,\)"):
        other.load_state_dict(before.state_dict())


# ----------------------------------------------------------------- non-finite gradients
def _skip_setup(bad_value, moment="pom"):
    p = _manifold_param((6, 4, 3, 3), "pio4", seed=5)
    gen = torch.Generator().manual_seed(0)
    plain = [torch.nn.Parameter(_randn(5, gen=gen)), torch.nn.Parameter(_randn(2, 3, gen=gen))]
    opt = FGAdam([p, *plain], lr=0.05, amsgrad=True, moment=moment)
    grads = [_randn(*q.shape, gen=gen) for q in (p, *plain)]
    bad_p = grads[0].clone()
    bad_p[2, 1, 0, 2] = bad_value  # kernel 2 * 4 + 1
    bad_plain = grads[1].clone()
    bad_plain[3] = bad_value
    return p, plain, opt, grads, [bad_p, bad_plain, grads[2]]


@pytest.mark.parametrize("moment", ["pom", "kernel"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_skip_policy_leaves_affected_pom_and_parameter_untouched(bad_value, moment):
    p, plain, opt, grads, bad = _skip_setup(bad_value, moment)
    params = [p, *plain]
    for q, g in zip(params, grads, strict=True):
        q.grad = g
    opt.step()
    before = [q.detach().clone() for q in params]
    states = [copy.deepcopy(opt.state[q]) for q in params]
    m0 = opt.exp_avg(p).clone()
    for q, g in zip(params, bad, strict=True):
        q.grad = g
    opt.step()
    coll = p.manifold
    pom = int(coll.kernel_pom[2 * 4 + 1])
    in_pom = coll.kernel_pom == pom
    kx, kx0 = p.detach().reshape(coll.num_kernels, -1), before[0].reshape(coll.num_kernels, -1)
    st = opt.state[p]
    assert torch.equal(kx[in_pom], kx0[in_pom])  # the POM is untouched ...
    assert torch.equal(opt.exp_avg(p)[in_pom], m0[in_pom])
    slots = pom if moment == "pom" else in_pom
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(st[key][slots], states[0][key][slots])
    assert bool((kx != kx0).any(dim=1)[~in_pom].all())  # ... and only that POM
    assert torch.equal(plain[0], before[1])
    for key, value in states[1].items():
        assert torch.equal(opt.state[plain[0]][key], value), key
    assert not torch.equal(plain[1], before[2])
    assert opt.nonfinite_count == 2  # one POM, one plain parameter
    for q in params:
        assert bool(torch.isfinite(q).all())
        moments = [v for v in opt.state[q].values() if torch.is_tensor(v)]
        assert all(bool(torch.isfinite(v).all()) for v in moments)
    assert not _violations(p, atol=1e-12)


def test_skip_in_a_layer_stepped_row_by_row():
    """1x1 convs are stepped in place: a skipped POM there must keep its rows too."""
    p = _manifold_param((6, 5, 1, 1), "pio4", seed=2)
    opt = FGAdam([p], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    p.grad = _randn(*p.shape, gen=gen)
    opt.step()
    before, m0 = p.detach().clone(), opt.exp_avg(p).clone()
    g = _randn(*p.shape, gen=gen)
    g[3, 0, 0, 0] = float("nan")  # kernel 3 (the whole filter)
    p.grad = g
    opt.step()
    coll = p.manifold
    in_pom = coll.kernel_pom == coll.kernel_pom[3]
    kx, kx0 = p.detach().reshape(coll.num_kernels, -1), before.reshape(coll.num_kernels, -1)
    assert torch.equal(kx[in_pom], kx0[in_pom])
    assert torch.equal(opt.exp_avg(p)[in_pom], m0[in_pom])
    assert bool((kx != kx0).any(dim=1)[~in_pom].all()) and opt.nonfinite_count == 1


def test_raise_policy_raises_and_changes_nothing():
    p = _manifold_param((4, 3, 3, 3), "pio4")
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(_randn(5, gen=gen))
    # The clean group comes first: it must not be stepped either.
    opt = FGAdam([{"params": [plain]}, {"params": [p]}], nonfinite="raise")
    plain.grad = _randn(5, gen=gen)
    p.grad = _randn(*p.shape, gen=gen)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    values = [plain.detach().clone(), p.detach().clone()]
    p.grad = p.grad.clone()
    p.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* in 1 parameter"):
        opt.step()
    assert torch.equal(plain, values[0]) and torch.equal(p, values[1])
    after = opt.state_dict()
    assert after["param_groups"] == snapshot["param_groups"]
    for key, st_before in snapshot["state"].items():
        assert after["state"][key].keys() == st_before.keys()
        for name, value in st_before.items():
            if torch.is_tensor(value):
                assert torch.equal(after["state"][key][name], value), name
    assert opt.nonfinite_count == 0


def test_none_policy_lets_nan_through():
    p = _manifold_param((6, 4, 3, 3), "pio3", seed=5)
    opt = FGAdam([p], nonfinite="none")
    p.grad = torch.randn_like(p)
    p.grad[2, 1, 0, 2] = float("nan")
    opt.step()
    assert opt.nonfinite_count == 0
    assert not bool(torch.isfinite(opt.state[p]["exp_avg_sq"]).all())


def test_nonfinite_count_survives_state_dict():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FGAdam([p])
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.nonfinite_count == 1 and torch.equal(p, torch.zeros(3))
    fresh = FGAdam([torch.nn.Parameter(torch.zeros(3))])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.nonfinite_count == 1


# ----------------------------------------------------------------- argument validation
INVALID_ARGS = [
    ({"lr": -0.1}, r"Invalid lr: -0\.1"),
    ({"lr": float("nan")}, r"Invalid lr: nan"),
    ({"betas": (0.9,)}, r"betas must be a pair of numbers"),
    ({"betas": (1.0, 0.999)}, r"Invalid beta1: 1\.0 \(expected < 1\.0\)"),
    ({"betas": (0.9, -0.1)}, r"Invalid beta2: -0\.1"),
    ({"eps": 0.0}, r"Invalid eps: 0\.0 \(expected > 0"),
    ({"weight_decay": -1e-4}, r"Invalid weight_decay"),
    ({"amsgrad": 1}, r"amsgrad must be a bool, got 1"),
    ({"maximize": "no"}, r"maximize must be a bool"),
    ({"moment": "filter"}, r"moment must be one of pom, kernel, got 'filter'"),
    ({"nonfinite": "ignore"}, r"nonfinite must be one of skip, raise, none"),
    ({"metric": "euclid"}, r"metric must be one of unit, stored"),
    ({"stabilize": 0}, r"stabilize must be None or a positive int, got 0"),
    ({"backend": "triton"}, r"backend must be one of auto, fused, torch, got 'triton'"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID_ARGS, ids=[m for _, m in INVALID_ARGS])
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FGAdam([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_group_values_changed_after_construction_are_validated_at_step():
    p = _manifold_param((4, 3, 3, 3), "pio4")
    opt = FGAdam([p])
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="Invalid lr: nan"):
        opt.step()
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="moment must be one of"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "moment": "x"})


# ----------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)  # two processes on a shared machine
    try:
        torch.manual_seed(0)
        net = _Net().double()
        _wrap(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = FGAdam(ddp.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (16,), generator=gen)
        _train(ddp, opt, (x[rank::world], y[rank::world]), steps=3)
        torch.save({k: v for k, v in net.state_dict().items()}, f"{out}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_step_identically_and_as_one_process(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    net = _Net().double()
    _wrap(net)
    opt = FGAdam(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=gen)
    # DDP averages the gradients of the two shards: the gradient of the mean of both losses.
    for _ in range(3):
        opt.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(net(x[r::2]), y[r::2]) for r in range(2))
        (loss / 2).backward()
        opt.step()
    # Batch-norm running statistics follow each rank's own shard; the parameters are shared.
    for key, value in net.named_parameters():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value.detach(), rtol=0, atol=1e-10)
    assert not _violations(net.conv.weight, atol=1e-12)


def test_diagnostics_leave_eq7_empty_under_fgadam():
    from fgo_geoopt.diagnostics import StepRecorder

    net = _Net()
    _wrap(net)
    opt = FGAdam(net.parameters(), lr=0.01)
    recorder = StepRecorder(net, every=1)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
    recorder.snapshot()
    _train(net, opt, data, steps=1)
    recorder.record(opt)
    rows = [r for r in recorder.rows() if r["type"] != "plain"]
    assert rows and all(r["tau_mean"] != r["tau_mean"] for r in rows)  # NaN: no Eq. (7)
    assert all(r["tau_gt1"] != r["tau_gt1"] and r["kernel_angle"] > 0 for r in rows)


# ----------------------------------------------------------------- timm
@_one_thread()
def test_timm_factory_builds_fgadam_for_a_wrapped_resnet():
    timm = pytest.importorskip("timm")
    import fgo_geoopt

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    fgo_geoopt.wrap(model, "pio4")
    assert "fgadam" in timm.optim.list_optimizers()
    opt = timm.optim.create_optimizer_v2(model, "fgadam", lr=1e-3)
    assert type(opt) is FGAdam and opt.defaults["betas"] == (0.9, 0.999)
    decayed = timm.optim.create_optimizer_v2(
        model, "fgadam", lr=1e-3, weight_decay=0.05, eps=1e-6, betas=(0.8, 0.99)
    )
    assert decayed.defaults["eps"] == 1e-6 and decayed.defaults["betas"] == (0.8, 0.99)
    assert {g["weight_decay"] for g in decayed.param_groups} == {0.0, 0.05}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    wrapped = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    before = [p.detach().clone() for p in wrapped]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert fgo_geoopt.check(model) == []
    assert all(not torch.equal(p, q) for p, q in zip(wrapped, before, strict=True))
    assert all(opt.state[p]["exp_avg_sq"].shape == (p.manifold.num_poms,) for p in wrapped)


def test_adam_benchmark_runs_end_to_end(tmp_path, capsys):
    """benchmarks/adam_step.py on a tiny timm model: every case timed, ratios and target lines
    printed, the samples written (speed is what the script reports, not what this asserts)."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("timm")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adam_step.py"
    spec = importlib.util.spec_from_file_location("fgo_benchmark_adam_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "samples.json"
    argv = ["--model", "test_resnet", "--repeats", "2", "--warmup", "1", "--no-strict"]
    argv += ["--torch-backend"]
    threads = torch.get_num_threads()
    try:
        assert bench.main([*argv, "--malloc", "default", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "target FGAdam <= 3x AdamW(foreach)" in text and "RiemannianAdam" in text
    samples = json.loads(out.read_text())["samples_ms"]
    assert len(samples) == 4 and all(len(s) == 2 and min(s) > 0 for s in samples.values())
