"""The manifold registry: names, aliases, errors, and a user manifold end to end."""

from __future__ import annotations

import geoopt
import pytest
import torch

from fgo_geoopt import build_collection
from fgo_geoopt.manifolds import (
    KernelEuclidean,
    KernelSphere,
    KernelStiefel,
    Oblique,
    canonical_name,
    get_manifold,
    list_manifolds,
    register_manifold,
    unregister_manifold,
)
from fgo_geoopt.testing import check_manifold_contract


class UnitRows(geoopt.Manifold):
    """Kernels with unit-norm rows, written against geoopt's public API only."""

    name = "UnitRows"
    ndim = 2
    reversible = False

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        norm = torch.linalg.vector_norm(x, dim=-1)
        ok = torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol)
        return ok, None if ok else f"row norms != 1 with atol={atol}"

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        dots = (x * u).sum(-1)
        ok = torch.allclose(dots, torch.zeros_like(dots), atol=atol, rtol=rtol)
        return ok, None if ok else f"<x_i, u_i> != 0 with atol={atol}"

    def projx(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        tiny = torch.finfo(x.dtype).tiny
        fallback = torch.full((), x.shape[-1] ** -0.5, dtype=x.dtype, device=x.device)
        return torch.where(norm > tiny, x / norm.clamp_min(tiny), fallback)

    def proju(self, x, u):
        return u - (x * u).sum(-1, keepdim=True) * x

    egrad2rgrad = proju

    def inner(self, x, u, v=None, *, keepdim=False):
        v = u if v is None else v
        return (u * v).sum(dim=(-2, -1), keepdim=keepdim)

    def retr(self, x, u):
        return self.projx(x + u)

    expmap = retr

    def transp(self, x, y, v):
        return self.proju(y, v)


@pytest.fixture
def unit_rows():
    """Register ``UnitRows`` as ``unit_rows`` (alias ``ur``) for one test, then remove it."""
    register_manifold("unit_rows", UnitRows, aliases=("ur",))
    yield "unit_rows"
    unregister_manifold("unit_rows")


BUILTINS = {
    "sphere": (KernelSphere, "sp"),
    "oblique": (Oblique, "ob"),
    "stiefel": (KernelStiefel, "st"),
    "euclidean": (KernelEuclidean, "euc"),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_names_and_aliases(name):
    cls, alias = BUILTINS[name]
    assert name in list_manifolds()
    assert alias not in list_manifolds()  # aliases are not listed as names
    for key in (name, alias, alias.upper(), f" {name} "):
        assert canonical_name(key) == name
        assert type(get_manifold(key)) is cls
    assert get_manifold(name) is not get_manifold(name)  # fresh instances


@pytest.mark.parametrize("bad", ["nope", "", "spherical", 3, None])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(ValueError, match="unknown manifold") as info:
        get_manifold(bad)
    for name, (_, alias) in BUILTINS.items():
        assert name in str(info.value) and alias in str(info.value)


@pytest.mark.parametrize("key", ["sphere", "sp", "stiefel", "euc"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_builtins_cannot_be_overwritten(key, overwrite):
    with pytest.raises(ValueError, match="built-in"):
        register_manifold(key, UnitRows, overwrite=overwrite)
    with pytest.raises(ValueError, match="built-in"):
        register_manifold("fresh_name", UnitRows, aliases=(key,), overwrite=overwrite)
    assert "fresh_name" not in list_manifolds()
    assert type(get_manifold(key)) is not UnitRows


@pytest.mark.parametrize("name", ["sphere", "oblique", "stiefel", "euclidean"])
def test_builtins_cannot_be_unregistered(name):
    with pytest.raises(ValueError, match="built-in"):
        unregister_manifold(name)
    assert name in list_manifolds()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "UnitRows", "factory": UnitRows}, "lowercase"),
        ({"name": "", "factory": UnitRows}, "lowercase"),
        ({"name": "rows", "factory": UnitRows, "aliases": ("Rows",)}, "lowercase"),
        ({"name": "rows", "factory": "not callable"}, "callable"),
        ({"name": "rows", "factory": lambda: torch.nn.Identity()}, "not a geoopt.Manifold"),
    ],
)
def test_register_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_manifold(**kwargs)
    assert "rows" not in list_manifolds()


def test_user_registration_round_trip(unit_rows):
    assert unit_rows in list_manifolds()
    assert canonical_name("UR") == unit_rows
    assert isinstance(get_manifold("ur"), UnitRows)
    with pytest.raises(ValueError, match="already registered"):
        register_manifold(unit_rows, UnitRows)
    with pytest.raises(ValueError, match="already registered"):
        register_manifold("other", UnitRows, aliases=("ur",))
    # overwrite=True replaces a user registration.
    register_manifold(unit_rows, KernelSphere, aliases=("ur",), overwrite=True)
    assert isinstance(get_manifold("ur"), KernelSphere)
    register_manifold(unit_rows, UnitRows, aliases=("ur",), overwrite=True)
    assert isinstance(get_manifold(unit_rows), UnitRows)
    # the unknown-name message lists user names and aliases too.
    with pytest.raises(ValueError, match=r"unit_rows \(ur\)"):
        get_manifold("nope")


def test_unregister_removes_name_and_aliases():
    register_manifold("unit_rows", UnitRows, aliases=("ur", "rows"))
    try:
        unregister_manifold("ur")  # by alias
    finally:
        if "unit_rows" in list_manifolds():  # never leak a registration into other tests
            unregister_manifold("unit_rows")
    assert "unit_rows" not in list_manifolds()
    for key in ("unit_rows", "ur", "rows"):
        with pytest.raises(ValueError, match="unknown manifold"):
            canonical_name(key)
    with pytest.raises(ValueError, match="unknown manifold"):
        unregister_manifold("unit_rows")


def test_user_manifold_passes_the_contract_in_one_call(unit_rows, device):
    check_manifold_contract(get_manifold(unit_rows), device=device)


def test_user_manifold_in_a_collection(unit_rows, device):
    coll = build_collection((6, 4, 3, 5), "pio", ("sphere", "ur"), seed=3)
    assert coll.manifold_names == ("sphere", unit_rows)
    assert {row["manifold"]: row["poms"] for row in coll.describe()} == {
        "sphere": 5,
        unit_rows: 5,
    }
    check_manifold_contract(coll, device=device)
    x = coll.projx(torch.randn(coll.shape, dtype=torch.float64, device=device))
    rows_type = coll.manifold_names.index(unit_rows)
    kernels = x.reshape(-1, 3, 5)[(coll.kernel_type() == rows_type).to(device)]
    torch.testing.assert_close(
        kernels.norm(dim=-1), torch.ones(kernels.shape[:-1], dtype=torch.float64, device=device)
    )
