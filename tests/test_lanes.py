"""The vector transposes of the fused 3x3 step and the gradient bounds built on them."""

from __future__ import annotations

import numpy as np
import pytest

from fgo_geoopt.optim import cpu

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="numba fused backend unavailable")

if cpu.AVAILABLE:
    from numba import njit

    from fgo_geoopt.optim.cpu import _bounds3x3, _columns, _flags
    from fgo_geoopt.optim.cpu._lanes import GROUP, from_lanes, to_lanes

    @njit(cache=False)
    def _in(flat, offset, tile, col):
        to_lanes(flat, offset, tile, col)

    @njit(cache=False)
    def _out(tile, col, flat, offset):
        from_lanes(tile, col, flat, offset)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("first", "col"), [(0, 0), (7, 16), (33, 48)])
def test_lanes_are_numpy_transposes(dtype, first, col):
    rng = np.random.default_rng(first)
    kernels = rng.standard_normal((64, 9)).astype(dtype)
    tile = np.full((9, 80), np.nan, dtype)
    _in(kernels, first * 9, tile, col)
    np.testing.assert_array_equal(tile[:, col : col + GROUP], kernels[first : first + GROUP].T)
    assert np.isnan(np.delete(tile, np.s_[col : col + GROUP], axis=1)).all()  # nothing else

    back = np.full_like(kernels, np.nan)
    _out(tile, col, back, first * 9)
    np.testing.assert_array_equal(back[first : first + GROUP], kernels[first : first + GROUP])
    assert np.isnan(np.delete(back, np.s_[first : first + GROUP], axis=0)).all()


def test_lanes_reject_non_contiguous_arrays():
    from numba.core.errors import TypingError

    kernels = np.zeros((32, 18), np.float32)[:, ::2]
    with pytest.raises(TypingError):
        _in(kernels, 0, np.zeros((9, 16), np.float32), 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("scaled", "weight_decay", "sign"),
    [(False, 0.0, 1.0), (False, 1e-2, 1.0), (True, 0.0, 1.0), (True, 1e-2, -1.0)],
)
@pytest.mark.parametrize(("k0", "k1"), [(0, 200), (128, 131), (5, 77)])
def test_3x3_bounds_equal_the_general_bounds(dtype, scaled, weight_decay, sign, k0, k1):
    """The 16-kernel lanes of ``_bounds3x3.bounds`` give the per-kernel sums of the general
    code, with Euclidean kernels under weight decay, scales and leftover kernels."""
    rng = np.random.default_rng(3)
    num_k, kpr, poms = 200, 10, 23
    x = rng.standard_normal((num_k, 9)).astype(dtype)
    g = rng.standard_normal((num_k, 9)).astype(dtype)
    s = (0.5 + rng.random(kpr)).astype(dtype)  # per kernel on the 3x3 path, per entry below
    kidx = rng.integers(0, poms, num_k).astype(np.uint16)
    tcode = np.array([_flags.SPHERE, _flags.OBLIQUE, _flags.STIEFEL, _flags.EUCLIDEAN], np.int8)[
        rng.integers(0, 4, poms)
    ]
    hp = _flags.hyper_array(
        dtype, lr=0.1, c_old=0.9, c_new=1.0, a_r=0.0, a_b=1.0, weight_decay=weight_decay, sign=sign
    )
    fast, general = np.zeros(poms), np.zeros(poms)
    _bounds3x3.bounds(x, g, s, kpr, scaled, kidx, tcode, k0, k1, hp, fast)
    per_entry = np.repeat(s.astype(np.float64), 9)
    _columns.bounds(x, g, per_entry, kpr, scaled, kidx, tcode, k0, k1, hp, general)
    assert (general > 0).sum() >= min(poms, k1 - k0) // 2  # the range touched most POMs
    np.testing.assert_allclose(fast, general, rtol=1e-5 if dtype == np.float32 else 1e-12)
