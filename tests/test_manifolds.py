"""Per-kernel manifolds: the contract suite, agreement with geoopt, long runs, numerical safety."""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgo_geoopt import build_collection
from fgo_geoopt.manifolds import KernelEuclidean, KernelSphere, get_manifold
from fgo_geoopt.testing import (
    BUILTIN_MANIFOLDS,
    DEFAULT_SHAPES,
    DTYPES,
    batch_shapes,
    check_manifold_contract,
    dtypes,
    kernel_shapes,
    seeds,
)

# Hypothesis with the function-scoped (but stateless) `device` fixture.
FIXTURE_OK = [*settings().suppress_health_check, HealthCheck.function_scoped_fixture]


def _randn(*shape, seed=0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)


def _tol(dtype: torch.dtype) -> float:
    # The bound: 50 eps in float64/float32, 1e-2 for the 16-bit floats.
    return 50 * torch.finfo(dtype).eps if torch.finfo(dtype).bits >= 32 else 1e-2


def _tall(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2) if x.shape[-2] < x.shape[-1] else x


# ---------------------------------------------------------------------- contract suite
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BUILTIN_MANIFOLDS)
def test_contract_float64(name, shape, device):
    check_manifold_contract(get_manifold(name), [shape], device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BUILTIN_MANIFOLDS)
def test_contract_every_dtype(name, dtype, device):
    check_manifold_contract(get_manifold(name), dtype=dtype, device=device, seed=1)


def test_contract_without_batch_dims():
    for name in BUILTIN_MANIFOLDS:
        check_manifold_contract(get_manifold(name), batch_shape=())


class _NoProjx(KernelSphere):
    def projx(self, x):
        return x


class _NoProju(KernelSphere):
    def proju(self, x, u):
        return u

    egrad2rgrad = proju


class _RetrOff(KernelSphere):
    def retr(self, x, u):
        return x + u


class _RetrFlips(KernelSphere):
    def retr(self, x, u):
        return -self.projx(x + u)


class _RetrTooFast(KernelSphere):
    def retr(self, x, u):
        return self.projx(x + 2 * u)


class _TranspStays(KernelSphere):
    def transp(self, x, y, v):
        return v


class _InnerSkewed(KernelEuclidean):
    def inner(self, x, u, v=None, *, keepdim=False):
        v = u if v is None else v
        return (u * v.transpose(-1, -2).flip(-1)).sum(dim=(-2, -1), keepdim=keepdim)


class _NaNAtZero(KernelSphere):
    def projx(self, x):
        return x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (_NoProjx, "projx lands on the manifold"),
        (_NoProju, "proju is tangent"),
        (_RetrOff, r"retr\(x, u\) is on the manifold"),
        (_RetrFlips, r"retr\(x, 0\) == x"),
        (_RetrTooFast, "retr is first order"),
        (_TranspStays, "transp is tangent at the new point"),
        (_InnerSkewed, "inner is symmetric"),
        (_NaNAtZero, r"projx\(0\) is on the manifold"),
    ],
)
def test_contract_catches_broken_manifolds(broken, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_manifold_contract(broken(), [(3, 3)])
    assert "at shape (2, 3, 3, 3)" in str(info.value)


def test_contract_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kernel shapes"):
        check_manifold_contract(get_manifold("sphere"), [(3,)])
    coll = build_collection((4, 2, 3, 3), "pio3")
    with pytest.raises(ValueError, match="fixed point shape"):
        check_manifold_contract(coll, [(3, 3)])


# ---------------------------------------------------------------------- agreement with geoopt
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sphere_equals_geoopt_sphere_on_flat_kernels(shape, device):
    ours, ref = get_manifold("sphere"), geoopt.Sphere()
    a, b = shape
    e = _randn(5, 4, a, b, seed=1, device=device)
    flat = lambda t: t.reshape(5, 4, a * b)  # noqa: E731
    x = ours.projx(e)
    torch.testing.assert_close(flat(x), ref.projx(flat(e)), rtol=0, atol=1e-12)
    g = _randn(5, 4, a, b, seed=2, device=device)
    u = ours.proju(x, g)
    torch.testing.assert_close(flat(u), ref.proju(flat(x), flat(g)), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        flat(ours.retr(x, 3 * u)), ref.retr(flat(x), 3 * flat(u)), rtol=0, atol=1e-12
    )
    v = ours.proju(x, _randn(5, 4, a, b, seed=3, device=device))
    torch.testing.assert_close(ours.inner(x, u, v), ref.inner(flat(x), flat(u), flat(v)))


@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_stiefel_retraction_equals_sign_fixed_qr(shape, device):
    """The Gram-Schmidt retraction is geoopt's sign-fixed QR retraction (tall orientation)."""
    ours, ref = get_manifold("stiefel"), geoopt.EuclideanStiefel()
    x = ours.projx(_randn(64, *shape, seed=4, device=device))
    u = ours.proju(x, _randn(64, *shape, seed=5, device=device))
    for step in (0.1, 1.0, 10.0):
        got = _tall(ours.retr(x, step * u))
        want = ref.retr(_tall(x), step * _tall(u))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        _tall(ours.proju(x, u)), ref.proju(_tall(x), _tall(u)), rtol=0, atol=1e-12
    )
    # projx of a point in general position is its sign-fixed Q factor too.
    e = _randn(64, *shape, seed=6, device=device)
    torch.testing.assert_close(
        _tall(ours.projx(e)), ref.retr(torch.zeros_like(_tall(e)), _tall(e)), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_oblique_equals_geoopt_sphere_per_column(shape, device):
    ours, ref = get_manifold("oblique"), geoopt.Sphere()
    cols = lambda t: _tall(t).transpose(-1, -2)  # noqa: E731  (columns of the tall view as rows)
    e = _randn(16, *shape, seed=7, device=device)
    x = ours.projx(e)
    torch.testing.assert_close(cols(x), ref.projx(cols(e)), rtol=0, atol=1e-12)
    g = _randn(16, *shape, seed=8, device=device)
    u = ours.proju(x, g)
    torch.testing.assert_close(cols(u), ref.proju(cols(x), cols(g)), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        cols(ours.retr(x, 5 * u)), ref.retr(cols(x), 5 * cols(u)), rtol=0, atol=1e-12
    )


# ---------------------------------------------------------------------- long random walks
@settings(max_examples=30, suppress_health_check=FIXTURE_OK)
@given(
    name=st.sampled_from(BUILTIN_MANIFOLDS),
    batch=batch_shapes(max_dims=2, max_side=3),
    shape=kernel_shapes(),
    dtype=dtypes(),
    seed=seeds(),
)
def test_hundred_large_retractions_stay_on_the_manifold(name, batch, shape, dtype, seed, device):
    man = get_manifold(name)
    gen = torch.Generator().manual_seed(seed)
    full = (*batch, *shape)

    def draw(*size):
        return torch.randn(*size, dtype=torch.float64, generator=gen).to(device, dtype)

    x = man.projx(draw(*full))
    for _ in range(100):
        u = man.proju(x, draw(*full)).double()
        norm = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True)
        radius = 10 * torch.rand((*batch, 1, 1), dtype=torch.float64, generator=gen)
        u = (u * radius.to(device) / norm.clamp_min(1e-30)).to(dtype)
        x = man.retr(x, u)
    assert x.dtype == dtype and x.shape == full
    assert bool(torch.isfinite(x).all())
    ok, why = man.check_point_on_manifold(x, explain=True, atol=_tol(dtype), rtol=0)
    assert ok, why


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 3), (7, 7), (6, 4), (1, 7)], ids=str)
def test_stiefel_orthogonality_error_is_a_few_eps(shape, dtype):
    """CGS2 keeps ||Q^T Q - I||_max at a few eps (a single Gram-Schmidt pass does not)."""
    man = get_manifold("stiefel")
    q = _tall(man.projx(_randn(4096, *shape, seed=9, dtype=dtype)))
    gram = q.transpose(-1, -2).double() @ q.double()
    err = float((gram - torch.eye(gram.shape[-1], dtype=torch.float64)).abs().max())
    assert err <= 8 * torch.finfo(dtype).eps, err


# ---------------------------------------------------------------------- numerical safety
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BUILTIN_MANIFOLDS)
def test_zero_kernel_projects_to_a_point(name, dtype, device):
    man = get_manifold(name)
    for shape in DEFAULT_SHAPES:
        x = _randn(3, *shape, seed=10, dtype=dtype, device=device)
        x[1] = 0
        x[2] = torch.finfo(dtype).tiny  # below every normalisation threshold
        y = man.projx(x)
        assert bool(torch.isfinite(y).all()), (name, shape)
        ok, why = man.check_point_on_manifold(y, explain=True, atol=_tol(dtype), rtol=0)
        assert ok, (name, shape, why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_stiefel_rank_deficient_kernels_project_to_points(dtype):
    man = get_manifold("stiefel")
    col = _randn(5, 1, seed=11, dtype=dtype)
    kernels = torch.stack(
        [
            col.expand(5, 3).clone(),  # three equal columns
            torch.cat([col, torch.zeros(5, 2, dtype=dtype)], dim=1),  # zero columns
            torch.cat([col, 2 * col, _randn(5, 1, seed=12, dtype=dtype)], dim=1),
        ]
    )
    y = man.projx(kernels)
    ok, why = man.check_point_on_manifold(y, explain=True, atol=_tol(dtype), rtol=0)
    assert ok, why
    # The first column keeps its direction: still the QR convention diag(R) > 0.
    torch.testing.assert_close(y[:, :, 0], (col / col.norm()).squeeze(1).expand(3, 5))


@pytest.mark.parametrize("name", BUILTIN_MANIFOLDS)
def test_projx_accepts_channels_last(name, device):
    man = get_manifold(name)
    x = _randn(8, 6, 3, 3, seed=13, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    torch.testing.assert_close(man.projx(cl), man.projx(x), rtol=0, atol=1e-14)
    coll = build_collection(tuple(x.shape), "pio", (name,), seed=0)
    out = coll.projx(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, coll.projx(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", BUILTIN_MANIFOLDS)
def test_half_dtypes_match_float32_maths(name, dtype, device):
    """16-bit inputs are computed in float32 and rounded once: the result is float32's."""
    man = get_manifold(name)
    x = _randn(10, 5, 5, seed=14, dtype=dtype, device=device)
    u = _randn(10, 5, 5, seed=15, dtype=dtype, device=device)
    y = man.projx(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, man.projx(x.float()).to(dtype), rtol=0, atol=0)
    ref = man.retr(y.float(), man.proju(y, u).float()).to(dtype)
    torch.testing.assert_close(man.retr(y, man.proju(y, u)), ref, rtol=0, atol=2e-2)
