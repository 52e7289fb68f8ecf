"""The 16-kernel step in registers (``_vec16``) against the tile code of ``_tiles3x3``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgo_geoopt import build_collection
from fgo_geoopt.optim import cpu

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="numba fused backend unavailable")

if cpu.AVAILABLE:
    from numba import njit

    from fgo_geoopt.optim._state import to_tiles
    from fgo_geoopt.optim.cpu import _flags, _maths3x3, _tiles3x3
    from fgo_geoopt.optim.cpu._flags import (
        FLAG_ADAPTIVE,
        FLAG_CHECK,
        FLAG_OWN,
        FLAG_SCALED,
        FLAG_USE_MOM,
    )
    from fgo_geoopt.optim.cpu._layout import TILE
    from fgo_geoopt.optim.cpu._plan import build_plan
    from fgo_geoopt.optim.cpu._vec16 import step16

    @njit(cache=False)
    def _tiles_only(x, g, m, s, kpr, kidx, tcode, pfac, hp, flags):
        """Every kernel through ``_tile_part`` (the general code), none through ``step16``."""
        bufs = _tiles3x3.tile_buffers(x)
        mf = m.reshape(-1)
        skipped = 0
        for t0 in range(0, x.shape[0], TILE):
            nt = min(TILE, x.shape[0] - t0)
            skipped += _tiles3x3._tile_part(
                x, g, mf, s, kpr, kidx, tcode, pfac, t0, nt, 0, nt, hp, flags, bufs
            )
        return skipped

    @njit(cache=False, error_model="numpy")  # 1 / 0 is inf, as in the fused step
    def _both_retractions(tp, y, hp):
        """``_retract`` (CGS2) and ``_retract_gram`` (Cholesky QR) of one kernel ``y``."""
        zero, one = hp[_flags._ZERO], hp[_flags._ONE]
        tiny2, eps16sq = hp[_flags._TINY2], hp[_flags._EPS16SQ]
        yt = (y[0], y[1], y[2], y[3], y[4], y[5], y[6], y[7], y[8])
        a, bad_a = _maths3x3._retract(tp, zero, one, tiny2, eps16sq, yt)
        b, bad_b = _maths3x3._retract_gram(tp, zero, one, 0.25, tiny2, eps16sq, yt)
        out = np.empty((2, 9), y.dtype)
        for j in range(9):
            out[0, j], out[1, j] = a[j], b[j]
        return out, bad_a, bad_b

    @njit(cache=False)
    def _step_group(x, g, m, k, kidx, tcode, fac, hp, flags, s=None, kpr=1):
        bounds = np.searchsorted(tcode, np.arange(1, 4)).astype(np.int64)
        t0 = k - k % TILE
        nt = min(TILE, x.shape[0] - t0)
        mrow = t0 * 9 + k - t0
        scales = np.ones(1, x.dtype) if s is None else s
        args = (k, kpr, mrow, nt, kidx, bounds, fac, hp, flags)
        return step16(x, g, m.reshape(-1), scales, *args)


MIX = ("sphere", "oblique", "stiefel", "euclidean")


def _layer(shape, strategy, dtype, manifolds=None, seed=0):
    """A layer's collection, fused plan and ``(x, g, m)`` as ``(K, 9)`` arrays (``m`` tangent
    and tile-major)."""
    coll = build_collection(shape, strategy, manifolds=manifolds, seed=seed)
    plan = build_plan(coll)
    gen = torch.Generator().manual_seed(seed)
    k = coll.num_kernels
    x = coll.projx(torch.randn(shape, generator=gen, dtype=torch.float64))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = coll.proju(x, torch.randn(shape, generator=gen, dtype=torch.float64))
    x, g, m = (t.reshape(k, 9).to(getattr(torch, np.dtype(dtype).name)) for t in (x, g, m))
    return coll, plan, (x.numpy(), g.numpy(), to_tiles(m, TILE).numpy())


def _hyper(dtype, nesterov=False, maximize=False, weight_decay=0.0):
    return _flags.hyper_array(
        dtype,
        lr=0.3,
        c_old=0.9,
        c_new=1.0,
        a_r=1.0 if nesterov else 0.0,
        a_b=0.9 if nesterov else 1.0,
        weight_decay=weight_decay,
        sign=-1.0 if maximize else 1.0,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("strategy", "manifolds", "shape", "options"),
    [
        ("pio4", None, (20, 15, 3, 3), {}),  # 300 kernels: full tiles, a partial one, a tail
        ("pio4", None, (16, 16, 3, 3), {"nesterov": True, "weight_decay": 0.1}),
        ("st", None, (24, 8, 3, 3), {"maximize": True}),
        ("single", MIX, (40, 5, 3, 3), {"weight_decay": 0.1}),
        ("pio4", None, (24, 32, 3, 3), {"scaled": True}),  # rows of two groups
        ("st", None, (16, 48, 3, 3), {"scaled": True, "maximize": True}),
        ("single", MIX, (20, 15, 3, 3), {"scaled": True}),  # every group straddles two rows
    ],
)
def test_pass2_equals_the_tile_code(dtype, strategy, manifolds, shape, options):
    """``pass2`` (groups in registers where they apply) leaves the weights and the buffer as
    the tile code alone does, with POM factors below 1 and a skipped POM (coupled layers) or
    Eq. (7) per kernel and a non-finite gradient (one-kernel POMs); with scales (one per
    kernel of a row), groups within a row in registers, the others in the tile code."""
    options = dict(options)
    scaled = options.pop("scaled", False)
    coll, plan, (x, g, m) = _layer(shape, strategy, dtype, manifolds)
    own = coll.pom_ptr is None
    kidx, tcode, kpr = plan.kidx, plan.tcode, coll.kernels_per_row
    s = np.ones(1, dtype)
    if scaled:  # the stored weights are R w (Euclidean kernels unscaled)
        s = np.random.default_rng(2).uniform(0.05, 2.0, kpr).astype(dtype)
        codes = tcode[kidx]
        for k in range(len(x)):
            if codes[k] != _flags.EUCLIDEAN:
                x[k] *= s[k % kpr]
    pfac = np.ones(1 if own else coll.num_poms, dtype)
    if own:
        g[37, 4] = np.nan  # kernel 37 is skipped: its group goes to the tile code
        skipped_kernels = [37]
    else:
        pfac[:] = np.random.default_rng(1).uniform(0.2, 1.0, pfac.size)
        pfac[kidx[37]] = -1.0  # a skipped POM
        skipped_kernels = np.flatnonzero(pfac[kidx] < 0)
    hp = _hyper(dtype, **options)

    def fac_of(k):
        return np.ones(16, dtype) if own else pfac[kidx[k : k + 16]]

    flags = own * FLAG_OWN + FLAG_ADAPTIVE + FLAG_CHECK + FLAG_USE_MOM + scaled * FLAG_SCALED
    want_x, want_m = x.copy(), m.copy()
    want_skipped = _tiles_only(want_x, g, want_m, s, kpr, kidx, tcode, pfac, hp, flags)
    got_x, got_m = x.copy(), m.copy()
    args = (got_x, g, got_m, s, kpr, kidx, tcode, pfac, 0, coll.num_kernels, hp)
    got_skipped = _tiles3x3.pass2(*args, flags)
    assert got_skipped == want_skipped == len(skipped_kernels)
    assert not np.array_equal(got_x, x)  # the step moved the weights
    single = dtype == np.float32
    tol = {"rtol": 2e-5, "atol": 2e-6} if single else {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(got_x, want_x, **tol)
    np.testing.assert_allclose(got_m, want_m, **tol)
    for k in skipped_kernels:  # left bit for bit
        np.testing.assert_array_equal(got_x[k], x[k])
    # and the registers did the work: every whole group without a skipped kernel (and, with
    # scales, within one row)
    groups = [
        k for t0 in range(0, len(x), TILE) for k in range(t0, min(len(x), t0 + TILE) - 15, 16)
    ]
    if scaled:
        groups = [k for k in groups if k % kpr + 16 <= kpr]
        assert (len(groups) > 0) == (kpr % 16 == 0)
    taken = [
        _step_group(x.copy(), g, m.copy(), k, kidx, tcode, fac_of(k), hp, flags, s, kpr)
        for k in groups
    ]
    plain = [not any(k <= j < k + 16 for j in skipped_kernels) for k in groups]
    assert taken == plain and sum(plain) >= len(groups) // 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_retraction_equals_gram_schmidt(dtype):
    """The registers' retraction (Cholesky QR of the Gram matrix) gives the tile code's
    (Gram-Schmidt twice) on every manifold type, for moved points near the manifold and far
    from it; it hands back what Gram-Schmidt finds degenerate, and Stiefel kernels whose later
    columns lose more than three quarters of their squared norm."""
    rng = np.random.default_rng(0)
    hp = _hyper(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}
    compared = 0
    for tp in range(4):
        for spread in (1e-3, 0.3, 1.0):
            for _ in range(50):
                q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
                y = (q + spread * rng.standard_normal((3, 3))).astype(dtype).reshape(9)
                out, bad_a, bad_b = _both_retractions(tp, y, hp)
                assert not bad_a
                if bad_b:  # only Stiefel kernels far from the manifold are handed back
                    assert tp == _flags.STIEFEL and spread > 0.1
                    continue
                np.testing.assert_allclose(out[1], out[0], **tol)
                compared += 1
    assert compared > 550  # of 600
    # Stiefel: column 1 almost along column 0 (Gram-Schmidt copes, Cholesky hands back)
    y = np.array([1.0, 0.99, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0], dtype)
    _, bad_a, bad_b = _both_retractions(_flags.STIEFEL, y, hp)
    assert not bad_a and bad_b
    # degenerate for both: a zero column (Stiefel, oblique), a zero kernel (sphere)
    y = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype)
    for tp in (_flags.STIEFEL, _flags.OBLIQUE):
        assert _both_retractions(tp, y, hp)[1:] == (True, True)
    assert _both_retractions(_flags.SPHERE, np.zeros(9, dtype), hp)[1:] == (True, True)
    assert _both_retractions(_flags.EUCLIDEAN, np.zeros(9, dtype), hp)[1:] == (False, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step16_hands_back_groups_it_cannot_do(dtype):
    """A plain group is stepped in place; a group with a degenerate retraction (a Stiefel
    kernel with a zero column) or a skipped POM is left untouched (``False``)."""
    _, plan, (x, g, m) = _layer((8, 8, 3, 3), "st", dtype)
    kidx, tcode = plan.kidx, plan.tcode
    hp = _hyper(dtype)
    fac = np.ones(16, dtype)
    x0, m0 = x.copy(), m.copy()
    assert _step_group(x, g, m, 0, kidx, tcode, fac, hp, FLAG_OWN)
    assert not np.array_equal(x[:16], x0[:16]) and not np.array_equal(m, m0)
    np.testing.assert_array_equal(x[16:], x0[16:])

    x[20] = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # columns (1, 1, 0), 0, (0, 0, 1)
    g[20] = 0.0
    before = x.copy(), m.copy()
    no_momentum = hp.copy()
    no_momentum[_flags._C_OLD] = 0.0  # the kernel does not move: its retraction degenerates
    assert not _step_group(x, g, m, 16, kidx, tcode, fac, no_momentum, FLAG_OWN)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(m, before[1])

    # a Stiefel kernel whose second column nearly follows the first: the Gram retraction
    # hands it back, and the tile code (Gram-Schmidt) steps the group
    assert _step_group(x.copy(), g, m.copy(), 16, kidx, tcode, fac, hp, FLAG_OWN)
    x[24] = [1.0, 0.999, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0, 1.0]
    before = x.copy(), m.copy()
    assert not _step_group(x, g, m, 16, kidx, tcode, fac, hp, FLAG_OWN)
    np.testing.assert_array_equal(x, before[0])

    fac[3] = -1.0  # kernel 35's POM is skipped
    assert not _step_group(x, g, m, 32, kidx, tcode, fac, hp, 0)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(m, before[1])
    fac[3] = 0.5
    assert _step_group(x, g, m, 32, kidx, tcode, fac, hp, 0)
    assert not np.array_equal(x[32:48], before[0][32:48])
