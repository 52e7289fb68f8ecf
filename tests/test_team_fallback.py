"""torch's OpenMP team is an optional speed-up: where finding, compiling or calling it fails,
the fused step warns once and finishes on its own thread pool, with the same result."""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch

from fgo_geoopt import FGSGD, build_collection
from fgo_geoopt.optim import cpu

if cpu.AVAILABLE:
    from fgo_geoopt.optim.cpu import _jobs, _schedule

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="numba fused backend unavailable")

SHAPE = (64, 32, 3, 3)  # float32 and large enough for the team; POMs of several kernels


def _run(backend, steps=3):
    """``steps`` steps of one parameter; its weights, and the fallback warnings raised."""
    coll = build_collection(SHAPE, "pio4", seed=0)
    gen = torch.Generator().manual_seed(1)
    p = geoopt.ManifoldParameter(coll.projx(torch.randn(SHAPE, generator=gen)), manifold=coll)
    opt = FGSGD([p], lr=0.1, momentum=0.9, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (1e-4, 3.0, 1e-3)[:steps]:
            p.grad = scale * torch.randn(SHAPE, generator=gen)
            opt.step()
    ours = [w for w in caught if "OpenMP threads" in str(w.message)]
    assert all(w.category is RuntimeWarning for w in ours)
    return p.detach().clone(), ours


@pytest.fixture
def fresh(monkeypatch):
    """Two threads, the team looked up afresh, no warning given yet (all restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(_schedule, "_TEAM", [])
    monkeypatch.setattr(_schedule, "_TEAM_FAILED", set())
    monkeypatch.setattr(_schedule, "_TEAM_WARNED", [])
    yield monkeypatch
    torch.set_num_threads(before)


def test_a_team_that_cannot_be_found_warns_once(fresh):
    from fgo_geoopt.optim.cpu import _team

    def missing():
        raise RuntimeError("no libgomp here (test)")

    fresh.setattr(_team, "_find_libgomp", missing)
    got, warned = _run("fused")
    assert len(warned) == 1 and "no libgomp here" in str(warned[0].message)
    assert _schedule._team_module() is None
    want, _ = _run("torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert _run("fused")[1] == []  # once per process


@pytest.mark.parametrize("fails", ["compile", "first call", "update call"])
def test_a_team_that_fails_warns_once_and_the_step_finishes_on_the_pool(fresh, fails):
    """``update call``: the first phase of the first step (the exact norms; the bounds where
    they are switched on) ran on the team, its update (and everything after) on the pool."""
    team = _schedule._team_module()
    if team is None:
        pytest.skip("torch does not run on its own GNU OpenMP here: no team path")
    calls = []
    real_run = team.run

    def run(path, kidx, descs, threads):
        calls.append(int(descs[0][0]))  # the phase kind (``_team._KIND``)
        if fails == "first call" or descs[0][0] == team.UPDATE:
            raise OSError("GOMP_parallel failed (test)")
        return real_run(path, kidx, descs, threads)

    def entry(key):
        raise RuntimeError("no entry point (test)")

    if fails == "compile":
        fresh.setattr(team, "entry", entry)
    else:
        fresh.setattr(team, "run", run)
    got, warned = _run("fused")
    assert len(warned) == 1
    first = team.BOUNDS if _jobs.GRADIENT_BOUNDS else team.NORMS
    assert calls == {"compile": [], "first call": [first], "update call": [first, 2]}[fails]
    want, _ = _run("torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if fails != "compile":
        assert _schedule._team_module() is None  # off for the rest of the process


def test_team_descriptors_keep_no_addresses_of_a_step(fresh):
    """After a step the team descriptors forget the weights, gradients and buffers."""
    from fgo_geoopt.optim.cpu import _team

    if _schedule._team_module() is None:
        pytest.skip("torch does not run on its own GNU OpenMP here: no team path")
    coll = build_collection(SHAPE, "pio4", seed=0)
    p = geoopt.ManifoldParameter(coll.projx(torch.randn(SHAPE)), manifold=copy.deepcopy(coll))
    opt = FGSGD([p], lr=0.1, momentum=0.9, backend="fused")
    p.grad = torch.randn(SHAPE)
    opt.step()
    layers = list(opt._workspace.of(p.manifold)["cpu plan"].layers.values())
    # the step ran on the team (a descriptor was made), and none survives the step
    assert layers and all(layer.team_module is _team for layer in layers)
    assert all(layer.desc is None for layer in layers)
