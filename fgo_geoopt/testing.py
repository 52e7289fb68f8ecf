"""Public test helpers: the manifold contract and hypothesis strategies.

A manifold registered with :func:`fgo_geoopt.register_manifold` must behave like the built-in
ones, because collections and the optimizer call it blindly. :func:`check_manifold_contract`
checks that behaviour in one call, and the strategies below draw the shapes, dtypes, seeds and
collection configurations this library's own tests use, so extensions are tested the same way::

    from fgo_geoopt.testing import check_manifold_contract

    check_manifold_contract(MyManifold())  # raises AssertionError naming the failed property

The strategies need ``hypothesis`` (a test dependency only); it is imported when a strategy is
built, so :func:`check_manifold_contract` works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import geoopt
import torch

from .manifolds import list_manifolds
from .manifolds._base import default_atol

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from .collections import KernelCollection

__all__ = [
    "BUILTIN_MANIFOLDS",
    "DEFAULT_SHAPES",
    "DTYPES",
    "batch_shapes",
    "check_manifold_contract",
    "collections",
    "dtypes",
    "kernel_shapes",
    "layer_shapes",
    "manifold_names",
    "seeds",
    "strategies_and_manifolds",
]

#: Kernel shapes ``(A, B)`` every per-kernel manifold is checked on: the square conv kernels,
#: the factorised 1x7 / 7x1 kernels and wide / tall matrices.
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1),
    (3, 3),
    (5, 5),
    (7, 7),
    (1, 7),
    (7, 1),
    (6, 4),
    (4, 6),
)
#: The dtypes weights are stored in.
DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BUILTIN_MANIFOLDS: tuple[str, ...] = ("sphere", "oblique", "stiefel", "euclidean")
#: Kernel sizes of the conv layers drawn by :func:`layer_shapes`.
KERNEL_SIZES: tuple[int | tuple[int, int], ...] = (1, 3, 5, 7, (1, 7))


# ---------------------------------------------------------------------- the contract
class _Contract:
    """State of one contract run: where the tensors live and how to report a failure."""

    def __init__(self, manifold, shape, dtype, device, atol):
        self.manifold = manifold
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.atol = default_atol(dtype) if atol is None else float(atol)
        label = getattr(manifold, "name", None) or type(manifold).__name__
        self.where = f"manifold {label} ({type(manifold).__name__}) at shape {self.shape}"
        self.where += f", {dtype}, {self.device}"

    def fail(self, prop: str, detail: str) -> None:
        raise AssertionError(f"contract property '{prop}' failed for {self.where}: {detail}")

    def tensor(self, gen: torch.Generator) -> torch.Tensor:
        # Drawn in float64 on the CPU, then cast: the same numbers on every device and dtype.
        t = torch.randn(self.shape, dtype=torch.float64, generator=gen)
        return t.to(device=self.device, dtype=self.dtype)

    def result(self, prop: str, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            self.fail(prop, f"returned {type(out).__name__}, not a tensor")
        if tuple(out.shape) != self.shape:
            self.fail(prop, f"returned shape {tuple(out.shape)}, expected {self.shape}")
        if out.dtype != self.dtype:
            self.fail(prop, f"returned dtype {out.dtype}, expected {self.dtype}")
        if not bool(torch.isfinite(out).all()):
            self.fail(prop, "returned non-finite values")
        return out

    def on_manifold(self, prop: str, x: torch.Tensor) -> None:
        ok, why = self.manifold.check_point_on_manifold(
            x, explain=True, atol=self.atol, rtol=self.atol
        )
        if not ok:
            self.fail(prop, f"point is off the manifold: {why}")

    def tangent(self, prop: str, x: torch.Tensor, u: torch.Tensor) -> None:
        ok, why = self.manifold.check_vector_on_tangent(
            x, u, ok_point=True, explain=True, atol=self.atol, rtol=self.atol
        )
        if not ok:
            self.fail(prop, f"vector is not tangent: {why}")

    def close(self, prop: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a64, b64 = a.double(), b.double()
        err = float((a64 - b64).abs().max()) if a.numel() else 0.0
        magnitude = float(b64.abs().max()) if b.numel() else 0.0
        tol = self.atol * (1.0 + magnitude)
        if not err <= tol:
            self.fail(prop, f"max abs difference {err:.3e} > tolerance {tol:.3e}")


def _point_shapes(manifold, shapes, batch_shape) -> list[tuple[int, ...]]:
    fixed = getattr(manifold, "shape", None)
    if isinstance(fixed, (tuple, torch.Size)):
        # A manifold over a whole tensor of one shape (a KernelCollection): check it there.
        fixed = tuple(int(s) for s in fixed)
        if shapes is not DEFAULT_SHAPES and any(tuple(s) != fixed for s in shapes):
            raise ValueError(
                f"{type(manifold).__name__} has the fixed point shape {fixed}; "
                f"leave `shapes` at its default or pass [{fixed}]"
            )
        return [fixed]
    out = []
    for s in shapes:
        s = tuple(int(v) for v in s)
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"kernel shapes are (A, B) with A, B >= 1, got {s}")
        out.append((*batch_shape, *s))
    return out


def _check_one(c: _Contract, gen: torch.Generator) -> None:
    m = c.manifold
    full_precision = torch.finfo(c.dtype).bits >= 32

    # projx: lands on the manifold, is idempotent, and a zero input still gives a point.
    x = c.result("projx lands on the manifold", m.projx(c.tensor(gen)))
    c.on_manifold("projx lands on the manifold", x)
    c.close("projx is idempotent", c.result("projx is idempotent", m.projx(x)), x)
    zero = torch.zeros(c.shape, dtype=c.dtype, device=c.device)
    x0 = c.result("projx(0) is on the manifold", m.projx(zero))
    c.on_manifold("projx(0) is on the manifold", x0)

    # proju: tangent and idempotent; egrad2rgrad tangent too (the optimizer's entry point).
    e = c.tensor(gen)
    u = c.result("proju is tangent", m.proju(x, e))
    c.tangent("proju is tangent", x, u)
    c.close("proju is idempotent", c.result("proju is idempotent", m.proju(x, u)), u)
    g = c.result("egrad2rgrad is tangent", m.egrad2rgrad(x, e))
    c.tangent("egrad2rgrad is tangent", x, g)

    # retr: the zero step stays put, every step lands on the manifold, and the retraction is
    # first order, R_x(t u) = x + t u + O(t^2) (the definition of a retraction).
    y0 = c.result("retr(x, 0) == x", m.retr(x, torch.zeros_like(u)))
    c.close("retr(x, 0) == x", y0, x)
    for step in (1e-3, 1.0, 10.0):
        y = c.result("retr(x, u) is on the manifold", m.retr(x, step * u))
        c.on_manifold(f"retr(x, u) is on the manifold (|u| scaled by {step:g})", y)
    if full_precision:
        t = torch.finfo(c.dtype).eps ** (1.0 / 3.0)
        yt = c.result("retr is first order", m.retr(x, t * u))
        slope = (yt.double() - x.double()) / t
        scale = 1.0 + float(u.double().abs().max()) ** 2
        err = float((slope - u.double()).abs().max())
        if not err <= 20.0 * t * scale:
            c.fail(
                "retr is first order",
                f"(retr(x, t u) - x) / t differs from u by {err:.3e} at t={t:.1e}",
            )

    # transp: the moved vector is tangent at the new point; retr_transp agrees.
    y = c.result("retr(x, u) is on the manifold", m.retr(x, u))
    v = c.result("proju is tangent", m.proju(x, c.tensor(gen)))
    w = c.result("transp is tangent at the new point", m.transp(x, y, v))
    c.tangent("transp is tangent at the new point", y, w)
    y2, w2 = m.retr_transp(x, u, v)
    c.close("retr_transp == (retr, transp)", c.result("retr_transp", y2), y)
    c.close("retr_transp == (retr, transp)", c.result("retr_transp", w2), w)

    # inner: symmetric, non-negative, and inner(x, u) == inner(x, u, u).
    uv, vu = m.inner(x, u, v), m.inner(x, v, u)
    if uv.shape != vu.shape or not bool(torch.isfinite(uv).all()):
        c.fail("inner is symmetric", f"inner gave shapes {uv.shape} / {vu.shape} or non-finite")
    c.close("inner is symmetric", uv, vu)
    uu = m.inner(x, u, u)
    if bool((uu.double() < -c.atol).any()):
        c.fail("inner is non-negative", f"inner(x, u, u) has min {float(uu.min()):.3e}")
    c.close("inner(x, u) == inner(x, u, u)", m.inner(x, u), uu)


def check_manifold_contract(
    manifold: geoopt.Manifold | KernelCollection,
    shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    atol: float | None = None,
    batch_shape: Sequence[int] = (2, 3),
) -> None:
    """Check that ``manifold`` behaves as every manifold of this library must.

    Per-kernel manifolds act on the trailing two dimensions ``(A, B)``; they are checked on
    tensors of shape ``(*batch_shape, A, B)`` for every ``(A, B)`` in ``shapes``. A manifold
    over a whole tensor of one shape (an attribute ``shape``, as a
    :class:`~fgo_geoopt.collections.KernelCollection` has) is checked at that shape only.

    Properties, each reported by name on failure:

    - ``projx`` lands on the manifold (``check_point_on_manifold``), is idempotent, and maps a
      zero tensor to a valid point;
    - ``proju`` (and ``egrad2rgrad``) give tangent vectors, ``proju`` is idempotent;
    - ``retr(x, 0) == x``; ``retr(x, u)`` is on the manifold for small and large (10x) steps;
      in 32/64-bit floats ``retr`` is first order, ``retr(x, t u) = x + t u + O(t^2)``;
    - ``transp(x, y, v)`` is tangent at ``y``; ``retr_transp`` agrees with ``retr``/``transp``;
    - ``inner`` is symmetric and non-negative, and ``inner(x, u) == inner(x, u, u)``;
    - every result keeps the input's shape and dtype and is finite.

    Args:
        manifold: The manifold instance to check.
        shapes: Kernel shapes ``(A, B)`` for a per-kernel manifold.
        dtype: Dtype of the test tensors.
        device: Device of the test tensors.
        seed: Seed of the private generator drawing the test tensors.
        atol: Tolerance of every check; default ``50 * finfo(dtype).eps`` (``1e-2`` for
            16-bit floats).
        batch_shape: Leading dimensions of the test tensors of a per-kernel manifold.

    Raises:
        AssertionError: Naming the failed property, the manifold and the shape.
        ValueError: For shapes that the manifold cannot take.
    """
    if not isinstance(manifold, geoopt.Manifold):
        raise ValueError(f"expected a geoopt.Manifold, got {type(manifold).__name__}")
    gen = torch.Generator().manual_seed(int(seed))
    for shape in _point_shapes(manifold, shapes, tuple(batch_shape)):
        _check_one(_Contract(manifold, shape, dtype, device, atol), gen)


# ---------------------------------------------------------------------- hypothesis strategies
def _st():
    from hypothesis import strategies

    return strategies


def kernel_shapes(max_side: int = 7) -> SearchStrategy[tuple[int, int]]:
    """Kernel shapes ``(A, B)``: the :data:`DEFAULT_SHAPES` or any ``A, B <= max_side``."""
    st = _st()
    side = st.integers(1, max_side)
    return st.one_of(st.sampled_from(DEFAULT_SHAPES), st.tuples(side, side))


def batch_shapes(max_dims: int = 2, max_side: int = 4) -> SearchStrategy[tuple[int, ...]]:
    """Leading (batch) dimensions of a tensor of kernels, possibly none."""
    st = _st()
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


def dtypes(half: bool = True) -> SearchStrategy[torch.dtype]:
    """Storage dtypes: float64 and float32, plus bfloat16 and float16 when ``half``."""
    return _st().sampled_from(DTYPES if half else DTYPES[:2])


def seeds() -> SearchStrategy[int]:
    """Seeds for ``torch.Generator.manual_seed`` and ``build_collection(seed=...)``."""
    return _st().integers(0, 2**32 - 1)


def manifold_names(names: Sequence[str] | None = None) -> SearchStrategy[str]:
    """Registered manifold names (default: every name registered when the strategy is built)."""
    return _st().sampled_from(tuple(names) if names is not None else tuple(list_manifolds()))


def layer_shapes(
    max_channels: int = 64,
    kernel_sizes: Sequence[int | tuple[int, int]] = KERNEL_SIZES,
    linear: bool = True,
) -> SearchStrategy[tuple[int, ...]]:
    """Layer weight shapes: ``(c_out, c_in, k_h, k_w)`` convs and, if ``linear``, ``(out, in)``.

    Args:
        max_channels: Largest ``c_out`` / ``c_in``.
        kernel_sizes: Conv kernel sizes, an int ``k`` for ``k x k`` or a pair ``(k_h, k_w)``.
        linear: Also draw 2-D linear weights.
    """
    st = _st()
    channels = st.integers(1, max_channels)
    sizes = [(k, k) if isinstance(k, int) else tuple(k) for k in kernel_sizes]
    conv = st.tuples(channels, channels, st.sampled_from(sizes)).map(lambda t: (t[0], t[1], *t[2]))
    return st.one_of(conv, st.tuples(channels, channels)) if linear else conv


def strategies_and_manifolds(
    manifolds: Sequence[str] = BUILTIN_MANIFOLDS,
    strategies: Sequence[str] = ("pi", "po", "pio", "single"),
    presets: bool = True,
) -> SearchStrategy[tuple[str, tuple[str, ...] | None]]:
    """``(strategy, manifolds)`` pairs for :func:`~fgo_geoopt.build_collection`.

    A plain strategy comes with a non-empty mix of distinct names from ``manifolds``; a preset
    (``euc``, ``st``, ``poms_st``, ``pio3``, ``pio4``) with ``None``, since it fixes its own.
    """
    from .collections import PRESETS

    st = _st()
    mixes = st.lists(st.sampled_from(tuple(manifolds)), min_size=1, unique=True).map(tuple)
    plain = st.tuples(st.sampled_from(tuple(strategies)), mixes)
    if not presets:
        return plain
    return st.one_of(plain, st.tuples(st.sampled_from(tuple(PRESETS)), st.none()))


def collections(
    shapes: SearchStrategy[tuple[int, ...]] | None = None,
    configs: SearchStrategy[tuple[str, tuple[str, ...] | None]] | None = None,
    seed_strategy: SearchStrategy[int] | None = None,
) -> SearchStrategy[KernelCollection]:
    """Collections built from drawn layer shapes, ``(strategy, manifolds)`` pairs and seeds."""
    from .collections import build_collection

    def build(shape: tuple[int, ...], cfg: tuple, seed: int) -> KernelCollection:
        return build_collection(shape, cfg[0], cfg[1], seed=seed)

    st = _st()
    return st.builds(
        build,
        shapes if shapes is not None else layer_shapes(),
        configs if configs is not None else strategies_and_manifolds(),
        seed_strategy if seed_strategy is not None else seeds(),
    )
