"""The fused CPU paths against the batched torch path: layouts, switching paths, edge cases."""

from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import geoopt
import numpy as np
import pytest
import torch

from fgo_geoopt import FGSGD, build_collection
from fgo_geoopt.optim import cpu
from fgo_geoopt.optim._state import from_tiles, to_tiles
from fgo_geoopt.optim.cpu._layout import TILE

if cpu.AVAILABLE:
    from fgo_geoopt.optim.cpu import _jobs, _schedule

needs_numba = pytest.mark.skipif(not cpu.AVAILABLE, reason="numba fused backend unavailable")


def _param(shape, preset, seed=0):
    coll = build_collection(shape, preset, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = coll.projx(torch.randn(shape, generator=gen, dtype=torch.float64))
    return geoopt.ManifoldParameter(x, manifold=coll)


def _grads(shape, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("num_kernels", [1, TILE - 1, TILE, 2 * TILE + 44])
def test_tile_layout_round_trip_and_positions(num_kernels):
    buf = torch.arange(num_kernels * 9, dtype=torch.float64).view(num_kernels, 9)
    tiled = to_tiles(buf, TILE)
    assert torch.equal(from_tiles(tiled, TILE), buf)
    flat = tiled.view(-1)
    for k in {0, num_kernels - 1, min(TILE, num_kernels - 1)}:
        t0 = k - k % TILE
        nt = min(TILE, num_kernels - t0)
        for j in (0, 4, 8):  # entry j of kernel k sits in row j of its tile's (9, nt) block
            assert flat[t0 * 9 + j * nt + (k - t0)] == buf[k, j]


@needs_numba
@pytest.mark.parametrize("preset", ["pio4", "st"])
def test_switching_between_fused_and_torch_paths_keeps_the_trajectory(preset):
    shape = (20, 15, 3, 3)  # 300 kernels: two full tiles and a partial one
    fused, plain = _param(shape, preset), _param(shape, preset)
    opt_a = FGSGD([fused], lr=0.05, momentum=0.9, backend="fused")
    opt_b = FGSGD([plain], lr=0.05, momentum=0.9, backend="torch")
    for i, g in enumerate(_grads(shape, 6)):
        # a: fused, fused, torch, torch, fused, fused; b: torch throughout
        opt_a.param_groups[0]["backend"] = "torch" if i in (2, 3) else "fused"
        fused.grad, plain.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        tiled = opt_a.state[fused].get("momentum_tiles")
        assert tiled == (None if i in (2, 3) else TILE)
        torch.testing.assert_close(fused.detach(), plain.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            opt_a.momentum_buffer(fused), opt_b.momentum_buffer(plain), rtol=0, atol=1e-12
        )


@needs_numba
def test_tile_major_state_dict_resumes_on_the_torch_path(tmp_path):
    shape = (12, 16, 3, 3)
    p, q = _param(shape, "pio4"), _param(shape, "pio4")
    grads = _grads(shape, 4)
    opt = FGSGD([p], lr=0.05, momentum=0.9, nesterov=True, backend="fused")
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    q.data.copy_(p.detach())
    resumed = FGSGD([q], lr=0.05, momentum=0.9, nesterov=True, backend="torch")
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.state[q]["momentum_tiles"] == TILE  # survives the dtype/device cast
    resumed.param_groups[0]["backend"] = "torch"  # the loaded group said "fused"
    for g in grads[2:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-12)
    assert "momentum_tiles" not in resumed.state[q]
    torch.testing.assert_close(
        opt.momentum_buffer(p), resumed.momentum_buffer(q), rtol=0, atol=1e-12
    )


@needs_numba
@pytest.mark.parametrize("preset", ["pio4", "st", "poms_st"])
def test_degenerate_retractions_match_the_torch_path(preset):
    """Kernels moved exactly to zero (every manifold): the fused 3x3 loop hands them to the
    general code, which must do what the batched torch path does."""
    shape = (8, 6, 3, 3)
    base = _param(shape, preset, seed=3)
    results = []
    for backend in ("fused", "torch"):
        p = geoopt.ManifoldParameter(base.detach().clone(), manifold=copy.deepcopy(base.manifold))
        opt = FGSGD([p], lr=0.5, momentum=0.5, backend=backend, adaptive_step=False)
        p.grad = torch.zeros_like(p)
        opt.step()  # creates the (zero) buffer
        st = opt.state[p]
        plain = opt.momentum_buffer(p).clone()
        k = p.detach().reshape(plain.shape)
        chosen = torch.arange(0, plain.shape[0], 5)
        plain[chosen] = k[chosen] * 4.0  # x - lr * momentum * buf == 0 exactly (powers of two)
        tiles = st.get("momentum_tiles")
        st["momentum_buffer"].copy_(plain if tiles is None else to_tiles(plain, tiles))
        opt.step()
        assert bool(torch.isfinite(p).all())
        assert not p.manifold.violations(p.detach(), atol=1e-10, rtol=0)
        results.append((p.detach().clone(), opt.momentum_buffer(p)))
    (wa, ba), (wb, bb) = results
    torch.testing.assert_close(wa, wb, rtol=0, atol=1e-12)
    torch.testing.assert_close(ba, bb, rtol=0, atol=1e-12)


@needs_numba
@pytest.mark.parametrize(
    ("shape", "preset"), [((16, 12, 3, 3), "pio4"), ((16, 12, 3, 3), "poms_st"), ((40, 24), "pio4")]
)
def test_gradient_bounds_shortcut_matches_the_torch_path(shape, preset, monkeypatch):
    """With the (opt-in) gradient bounds: tiny gradients, every POM's factor is settled by the
    cheap bound; huge ones, every POM needs the exact norms (and the next steps skip the
    bounds); both equal the torch path."""
    monkeypatch.setattr(_jobs, "GRADIENT_BOUNDS", True)
    gen = torch.Generator().manual_seed(5)
    fused, plain = _param(shape, preset, seed=4), _param(shape, preset, seed=4)
    opt_a = FGSGD([fused], lr=0.05, momentum=0.9, weight_decay=1e-3, backend="fused")
    opt_b = FGSGD([plain], lr=0.05, momentum=0.9, weight_decay=1e-3, backend="torch")
    plan_states = []
    for scale in (1e-4, 1e-4, 1e2, 1e-4, 1.0):
        g = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        fused.grad, plain.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        plan_states.append(opt_a.state[fused].get(_jobs.EXACT_STATE, 0))
        torch.testing.assert_close(fused.detach(), plain.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            opt_a.momentum_buffer(fused), opt_b.momentum_buffer(plain), rtol=0, atol=1e-12
        )
    assert plan_states[:2] == [0, 0]  # settled by the bounds
    assert plan_states[2] == _jobs.EXACT_STEPS  # the bounds settled too little
    assert plan_states[3:] == [_jobs.EXACT_STEPS - 1, _jobs.EXACT_STEPS - 2]


def _team_or_skip():
    from fgo_geoopt.optim.cpu import _team  # a broken team module fails here, loudly

    if _schedule._team_module() is None:
        pytest.skip("torch does not run on its own GNU OpenMP here: no team path")
    assert _team.KEYS
    return _team


@needs_numba
@pytest.mark.parametrize(
    ("shape", "preset", "scaled"),
    [
        ((128, 64, 3, 3), "pio4", False),
        ((128, 64, 3, 3), "pio4", True),
        ((128, 64, 3, 3), "st", False),
        ((256, 512), "pio4", False),
        ((256, 512), "st", True),
    ],
)
def test_torch_openmp_team_matches_the_thread_pool(shape, preset, scaled, monkeypatch):
    """Layers large enough for torch's OpenMP team: every phase runs there (counted), and the
    result equals our thread pool's and the torch path's (float32; POM sums are added in
    another order, hence a tolerance)."""
    team = _team_or_skip()
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no team")
    coll = build_collection(shape, preset, seed=7)
    assert coll.num_kernels * coll.kernel_numel >= _schedule.TEAM_MIN_NUMEL
    gen = torch.Generator().manual_seed(8)
    if scaled:
        coll.set_scale(0.5 + torch.rand(coll.in_channels, generator=gen, dtype=torch.float64))
    x0 = coll.projx(torch.randn(shape, generator=gen))
    grads = [s * torch.randn(shape, generator=gen) for s in (1e-4, 3.0, 1e-3)]
    calls = []
    real_run = team.run

    def counting_run(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    results = []
    for mode in ("team", "pool", "torch"):
        p = geoopt.ManifoldParameter(x0.clone(), manifold=copy.deepcopy(coll))
        backend = "torch" if mode == "torch" else "fused"
        opt = FGSGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        with monkeypatch.context() as patch:
            if mode == "team":
                patch.setattr(team, "run", counting_run)
            if mode == "pool":
                patch.setattr(_schedule, "_TEAM", [None])
            for g in grads:
                p.grad = g.clone()
                opt.step()
        assert not p.manifold.violations(p.detach(), atol=1e-5, rtol=0)
        results.append((p.detach().clone(), opt.momentum_buffer(p)))
    assert calls, "the team path did not run"
    for w, b in results[1:]:
        torch.testing.assert_close(results[0][0], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[0][1], b, rtol=1e-4, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("mode", ["team", "pool"])
def test_parameters_sharing_a_collection_and_copies_of_a_used_one(mode, monkeypatch):
    """Two parameters on one collection object; then, once it has been used, a parameter on a
    deep copy of it stepped together with one more on the original. Each parameter keeps its
    own step buffers (a copy starts with an empty cache), so the fused step equals the torch
    path throughout."""
    if mode == "team":
        _team_or_skip()
    else:
        monkeypatch.setattr(_schedule, "_TEAM", [None])
    shape = (64, 32, 3, 3)  # large enough for the team
    coll = build_collection(shape, "pio4", seed=0)
    gen = torch.Generator().manual_seed(1)

    def run(fused_params, steps):
        ref = [
            geoopt.ManifoldParameter(p.detach().clone(), manifold=copy.deepcopy(p.manifold))
            for p in fused_params
        ]
        opt = FGSGD(fused_params, lr=0.5, momentum=0.9, backend="fused")
        opt_ref = FGSGD(ref, lr=0.5, momentum=0.9, backend="torch")
        for _ in range(steps):
            for p, q in zip(fused_params, ref, strict=True):
                p.grad = 3.0 * torch.randn(shape, generator=gen)
                q.grad = p.grad.clone()
            opt.step()
            opt_ref.step()
            for p, q in zip(fused_params, ref, strict=True):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        return opt

    def param(manifold):
        return geoopt.ManifoldParameter(
            manifold.projx(torch.randn(shape, generator=gen)), manifold=manifold
        )

    opt = run([param(coll), param(coll)], steps=4)
    # used: per-parameter buffers are kept, by the optimizer (not by the collection)
    assert len(opt._workspace.of(coll)["cpu plan"].layers) == 2
    assert not hasattr(coll, "_cache")
    copied = copy.deepcopy(coll)
    opt = run([param(copied), param(coll)], steps=3)
    plans = [opt._workspace.of(c)["cpu plan"] for c in (copied, coll)]
    assert plans[0] is not plans[1] and len(plans[0].layers) == len(plans[1].layers) == 1


@needs_numba
@pytest.mark.parametrize("mode", ["team", "pool"])
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (96, 80)])
def test_step_keeps_no_reference_to_gradients(mode, shape, monkeypatch):
    """After a step, ``zero_grad(set_to_none=True)`` frees the gradients: the fused step must
    not keep them (or the weights' and buffers' views) alive. Kept gradients made every
    backward allocate and fault in all of them afresh. Also after a step that fails."""
    if mode == "team":
        _team_or_skip()
    else:
        monkeypatch.setattr(_schedule, "_TEAM", [None])
    coll = build_collection(shape, "pio4", seed=0)
    gen = torch.Generator().manual_seed(1)
    p = geoopt.ManifoldParameter(coll.projx(torch.randn(shape, generator=gen)), manifold=coll)
    opt = FGSGD([p], lr=0.1, momentum=0.9, backend="fused")
    for step in range(3):
        p.grad = torch.randn(shape, generator=gen)
        grad = p.grad.untyped_storage()._weak_ref()  # the memory, not the tensor object
        if step == 2:  # a step that raises half-way: the arrays are dropped all the same

            def failing(*args, **kwargs):
                raise RuntimeError("stop")

            monkeypatch.setattr(_schedule, "_parallel", failing)
            monkeypatch.setattr(_schedule, "_TEAM", [None])
            with pytest.raises(RuntimeError, match="stop"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        freed = torch.UntypedStorage._expired(grad)
        torch.UntypedStorage._free_weak_ref(grad)
        assert freed, f"step {step}: the gradient's memory outlived zero_grad"


@needs_numba
def test_fused_numba_code_shares_one_cache_stamp(tmp_path, monkeypatch):
    """numba's disk cache of every fused function is stamped with all the fused modules'
    sources: a cached caller must not keep the old code of a callee in another file (the team
    entry points compile all of ``_tiles3x3`` into themselves; a stale one ran old code after
    ``_tiles3x3.py`` changed)."""
    from fgo_geoopt.optim.cpu import _bounds3x3, _numba_cache, _soa, _team, _tiles3x3

    assert _numba_cache.install()
    dispatchers = [_tiles3x3.pass2, _bounds3x3.bounds, _soa._soa_chunk]
    if _schedule._team_module() is not None:
        dispatchers.append(_team._entry(True, np.int8))
    for fn in dispatchers:
        assert isinstance(fn._cache._impl.locator, _numba_cache._Stamped), fn

    copies = []
    for path in _numba_cache.FILES:
        copy_path = tmp_path / os.path.basename(path)
        copy_path.write_bytes(Path(path).read_bytes())
        copies.append(str(copy_path))
    monkeypatch.setattr(_numba_cache, "FILES", tuple(copies))
    monkeypatch.setattr(_numba_cache, "_STATE", dict(_numba_cache._STATE))
    _numba_cache._STATE.pop("stamp", None)
    first = _numba_cache._stamp()
    for path in copies:  # a change in any one of the files changes the stamp
        with open(path, "a") as fh:
            fh.write("\n# edited\n")
        _numba_cache._STATE.pop("stamp")
        assert _numba_cache._stamp() != first
        first = _numba_cache._stamp()
