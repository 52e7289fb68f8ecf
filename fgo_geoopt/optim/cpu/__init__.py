"""The fused CPU backend of FG-SGD (and FG-Adam): numba loops that read and write every kernel
once per step.

The entry points, nothing else is used from outside:

* :func:`accepts` - can this backend step this parameter (on this collection)?
* :func:`step` - step these layers (``_records.Layer``) with these settings (``Hyper``).
* :func:`adam_step` - FG-Adam's step of these layers (``adam_step.AdamHyper``), on the same
  threads (``_schedule``) and manifold codes (``_plan``), with its own kernels (``_adam``).

Inside, imports run one way, from the top down:

.. code-block:: text

    __init__      the entry points
    _schedule     threads: runs the layers' phases together (pool, or torch's OpenMP _team)
    _jobs         one layer's step as phases; _plan: per-collection constants, manifold codes
    _adam_jobs    FG-Adam: one layer's step as phases, over the kernels of _adam
    _tiles3x3 / _columns / _soa / _aos    the kernel paths (by kernel shape)
    _vec16 / _lanes / _maths3x3           vector-register code and shared maths
    _flags / _layout / _numba_cache       codes, flag bits, records, tile size, cache stamp

Each layer takes the path that suits its kernel shape: 3x3 kernels in memory order, 16 at a
time in vector registers, with entry-major tiles for what that cannot do (``_tiles3x3``);
one-column kernels (1x1 convs and linear layers, filter view) in memory order
(``_columns``); other small kernels in structure-of-arrays blocks of POMs (``_soa``); large
kernels a POM at a time (``_aos``). The maths is that of ``torch_step``; tests keep every path
equal to ``reference.py``. Why it is built this way, with measurements: docs/performance.md.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import adam_step as batched
from .. import torch_step
from .._records import Hyper, Layer
from .._state import Workspace, momentum_buffer
from ._flags import AVAILABLE
from ._layout import TILE

if AVAILABLE:  # the kernels; without numba the batched torch step takes every layer
    from ._adam_jobs import AdamJob, adam_plan
    from ._jobs import FusedJob
    from ._plan import build_plan, codes_of
    from ._schedule import run_jobs

__all__ = ["AVAILABLE", "accepts", "adam_step", "reason_refused", "step"]

_DTYPES = (torch.float32, torch.float64)
#: Squared POM norms from here up may overflow the float32 sums of the kernels (a margin of
#: 1e-3 for their rounding): such POMs are re-examined after a step that skipped any.
_F32_SQUARE_LIMIT = float(torch.finfo(torch.float32).max) * (1.0 - 1e-3)


def accepts(coll: Any, param: torch.Tensor, workspace: Workspace | None = None) -> bool:
    """Whether :func:`step` can step ``param`` on ``coll``: numba present, a float32 / float64
    CPU tensor, and only manifolds the kernels implement (the built-in classes, exactly)."""
    if not AVAILABLE or param.device.type != "cpu" or param.dtype not in _DTYPES:
        return False
    if workspace is None:
        return codes_of(coll) is not None
    cache = workspace.of(coll)
    if "cpu codes" not in cache:  # a collection's manifolds are fixed: decide once
        cache["cpu codes"] = codes_of(coll) is not None
    return cache["cpu codes"]


def reason_refused(coll: Any, param: torch.Tensor) -> str | None:
    """Why :func:`accepts` says no, in words (``None`` where it says yes)."""
    if not AVAILABLE:
        return "numba is not importable, or FGO_DISABLE_NUMBA=1 switches the fused step off"
    if param.device.type != "cpu":
        return f"the fused step runs on the CPU, not on {param.device}"
    if param.dtype not in _DTYPES:
        return f"the fused step takes float32 / float64 weights, not {param.dtype}"
    if codes_of(coll) is None:
        return f"a manifold of {coll.manifold_names} has no fused implementation"
    return None


def step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> int:
    """One FG-SGD step of every layer (all accepted), together; returns the skipped POMs.

    Momentum buffers are created (zeros) or converted into this backend's layout: tile-major
    for 3x3 kernels, ``(K, n)`` otherwise.
    """
    jobs, copies = [], []
    for layer in layers:
        p, coll = layer.param, layer.coll
        cache = workspace.of(coll)
        plan = cache.get("cpu plan")
        if plan is None:
            plan = cache["cpu plan"] = build_plan(coll)
        k, n = coll.num_kernels, coll.kernel_numel
        buf = None
        if hyper.momentum != 0:
            tiles = TILE if plan.path == "3x3" else None
            buf = momentum_buffer(layer.state, p, (k, n), tiles)
        x = p if p.is_contiguous() else p.contiguous()
        g = layer.grad
        if hyper.metric == "stored" and coll.scale is not None:
            g = torch_step.stored_metric_grad(coll, g, workspace)
        g = g if g.is_contiguous() else g.contiguous()
        jobs.append(
            FusedJob(
                coll,
                plan,
                cache,
                x.detach().view(k, n).numpy(),
                g.detach().view(k, n).numpy(),
                None if buf is None else buf.numpy(),
                hyper,
                layer.first,
                key=p.data_ptr(),
                state=layer.state,
            )
        )
        if x is not p:
            copies.append((p, x))
    skipped = run_jobs(jobs)
    for p, x in copies:
        p.copy_(x)
    if skipped and hyper.check:
        skipped -= _step_overflowed(layers, hyper, workspace)
    return skipped


def _step_overflowed(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> int:
    """Step the POMs that the float32 kernels skipped although their gradient is finite.

    The kernels square float32 entries in float32, so a POM with an entry above about 1e19 has
    a non-finite squared norm there and is skipped, weights and buffer untouched. "Non-finite"
    means NaN / inf entries only, on every backend: after a step that skipped any POM (rare),
    the torch backend's per-layer step, which sums the squares in float64, steps exactly the
    POMs whose finite squared norm is beyond float32's range (their buffers leave the tile
    layout; the next fused step converts them back). Returns how many it stepped.
    """
    stepped = 0
    for layer in layers:
        if layer.param.dtype != torch.float32:
            continue  # float64 squares overflow only above 1e154, on both backends alike
        count = torch_step.layer_step(layer, hyper, workspace, only_above=_F32_SQUARE_LIMIT)
        stepped += layer.coll.num_poms - int(count)
    return stepped


def adam_step(layers: list[Layer], hyper: Any, workspace: Workspace) -> int:
    """One FG-Adam step of every layer (all accepted), together; returns the skipped POMs.

    ``hyper`` is an ``adam_step.AdamHyper``. The moments are created (zeros) where missing;
    a first moment kept in the torch backend's blocks (``adam_step.BLOCKS``) returns to the
    ``(K, n)`` kernel-major layout this backend steps in.
    """
    jobs, copies = [], []
    for layer in layers:
        p, coll, st = layer.param, layer.coll, layer.state
        t = batched.advance(layer, hyper)
        batched.set_kernel_major(st, coll, workspace)
        cache = workspace.of(coll)
        plan = cache.get("cpu adam plan")
        if plan is None:
            plan = cache["cpu adam plan"] = adam_plan(coll)
        k, n = coll.num_kernels, coll.kernel_numel
        x = p if p.is_contiguous() else p.contiguous()
        g = layer.grad
        g = g if g.is_contiguous() else g.contiguous()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in st and not st[key].is_contiguous():
                st[key] = st[key].contiguous()
        vmax = st["max_exp_avg_sq"].numpy() if hyper.amsgrad else None
        jobs.append(
            AdamJob(
                coll,
                plan,
                x.detach().view(k, n).numpy(),
                g.detach().view(k, n).numpy(),
                st["exp_avg"].view(k, n).numpy(),
                st["exp_avg_sq"].numpy(),
                vmax,
                hyper,
                t,
            )
        )
        if x is not p:
            copies.append((p, x))
    skipped = run_jobs(jobs)
    for p, x in copies:
        p.copy_(x)
    return skipped
