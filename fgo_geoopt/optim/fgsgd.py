"""FG-SGD: Riemannian SGD over collections of products of manifolds (Ozay, NeurIPS 2019)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import geoopt
import torch
from geoopt.optim import RiemannianSGD
from torch.optim.sgd import sgd as _torch_sgd

from ..collections import KernelCollection
from . import _fused
from ._batched import batched_collection_step
from ._layout import from_tiles, to_tiles

__all__ = ["FGSGD", "NONFINITE_POLICIES", "fgsgd"]

NONFINITE_POLICIES = ("skip", "raise", "none")
BACKENDS = ("auto", "fused", "torch")
#: Metrics of the step on re-scaled collections (see the class docstring).
METRICS = ("unit", "stored")

_FG_DEFAULTS = {
    "maximize": False,
    "adaptive_step": True,
    "nonfinite": "skip",
    "backend": "auto",
    "metric": "unit",
}


def _check_number(
    name: str, value: Any, *, low: float = 0.0, high: float | None = None, high_open: bool = False
) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"Invalid {name}: {value} (expected a finite value >= {low})")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"Invalid {name}: {value} (expected {bound})")


def _validate(group: dict[str, Any]) -> None:
    _check_number("lr", group["lr"])
    _check_number("momentum", group["momentum"], high=1.0, high_open=True)
    _check_number("dampening", group["dampening"], high=1.0)
    _check_number("weight_decay", group["weight_decay"])
    for key in ("nesterov", "maximize", "adaptive_step"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {group['nonfinite']!r}"
        )
    if group["metric"] not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {group['metric']!r}")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {group['backend']!r}")
    stabilize = group.get("stabilize")
    if stabilize is not None and (
        isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1
    ):
        raise ValueError(f"stabilize must be None or a positive int, got {stabilize!r}")


class FGSGD(RiemannianSGD):
    r"""Fine-grained SGD on collections of products of weight manifolds.

    For every POM :math:`g` of every :class:`~fgo_geoopt.KernelCollection` parameter, with
    stored weight :math:`W = R \odot w` (``R = 1`` without re-scaling):

    .. code-block:: text

        G     = R * dL/dW                          # gradient in unit coordinates
        G     = dL/dW / R                 (metric="stored", constrained kernels)
        r     = proj_{T_w}(G)                      # per kernel (Sp / Ob / St / Euc)
        R_g   = || r ||  over the kernels of g
        tau_g = max(1, R_g (2 + R_g))              # Eq. (7), if adaptive_step
        r     = r / tau_g
        b     = r                        (first step)
        b     = momentum * b + (1 - dampening) * r (later steps)
        d     = r + momentum * b  (nesterov)  or  b
        w'    = retr_w(-lr * d)                    # normalise / Gram-Schmidt / add
        b     = proj_{T_w'}(b)                     # momentum transported by projection
        W     = R * w'

    Plain tensors (and ``ManifoldParameter`` on :class:`geoopt.Euclidean`) take exactly the
    step of :class:`torch.optim.SGD`, through its ``foreach`` implementation. Other geoopt
    manifolds take the same Riemannian step with the whole tensor as one POM.

    Args:
        params: Parameters or parameter groups. Group dicts may override every keyword below.
        lr: Learning rate ``r(t)``; Eq. (7) divides it per POM.
        momentum: Heavy-ball momentum factor in ``[0, 1)``.
        dampening: Dampening for momentum.
        weight_decay: L2 penalty, applied to plain parameters and to Euclidean kernels inside
            collections only.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: Maximise the objective instead of minimising it.
        stabilize: Re-project parameters and buffers onto their manifolds every this many
            steps (``None``: never).
        adaptive_step: Use the per-POM step size of Eq. (7); ``False`` uses ``lr`` for all.
        nonfinite: What a NaN / inf gradient does. ``"skip"`` (default): the affected POMs of a
            manifold parameter, or the affected plain parameter, are left untouched (weights
            and momentum) and counted in ``optimizer.nonfinite_count``. ``"raise"``: raise
            ``FloatingPointError`` before anything is updated. ``"none"``: no check (fastest).
        backend: ``"auto"`` (fused numba step on CPU where possible, batched torch otherwise),
            ``"fused"`` (require it), or ``"torch"`` (batched torch ops everywhere).
        metric: The metric of the step on re-scaled collections (``W = R * w``). ``"unit"``
            (default, the paper read literally): the Riemannian gradient of the unit kernels
            ``w``, ``R * dL/dW``. ``"stored"``: that of the stored weights ``W``, which is
            ``dL/dW / R`` in unit coordinates, so a constrained kernel moves as far, relative to
            its size, as SGD would move it, and as the unscaled Euclidean kernels of its filter
            do. Identical where a collection has no scales. See ``docs/optimizer.md``.

    Note:
        **Momentum** follows :class:`torch.optim.SGD`: the first step stores the (Riemannian,
        Eq. (7)-scaled) gradient itself as the buffer, with no dampening; later steps use
        ``momentum * b + (1 - dampening) * r``. On manifolds the buffer lives in unit
        coordinates and is transported to each new point by tangent projection.

    Note:
        **Weight decay** never applies to kernels on a constrained manifold: their norm is
        fixed, and an L2 pull would only bias the gradient direction. Euclidean kernels inside
        a collection and plain parameters are decayed as by ``torch.optim.SGD``.

    Note:
        ``step()`` never writes into ``p.grad``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        stabilize: int | None = None,
        adaptive_step: bool = True,
        nonfinite: str = "skip",
        backend: str = "auto",
        metric: str = "unit",
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "adaptive_step": adaptive_step,
            "nonfinite": nonfinite,
            "backend": backend,
            "metric": metric,
            "stabilize": stabilize,
        }
        _validate(defaults)
        if backend == "fused" and not _fused.AVAILABLE:
            raise ValueError("backend='fused' needs numba, which is not importable here")
        self._fg_defaults = {k: defaults[k] for k in _FG_DEFAULTS}
        self.nonfinite_count = 0
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            stabilize=stabilize,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in getattr(self, "_fg_defaults", _FG_DEFAULTS).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        _validate(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_fg_defaults"):
            self._fg_defaults = dict(_FG_DEFAULTS)
        if not hasattr(self, "nonfinite_count"):
            self.nonfinite_count = 0
        for group in self.param_groups:
            for key, value in _FG_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("stabilize", None)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["nonfinite_count"] = int(self.nonfinite_count)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or by ``torch.optim.SGD`` for plain
        parameters).

        Every saved group value is restored except ``backend``: the one this optimizer was
        created with is kept.

        Raises:
            ValueError: A momentum buffer does not fit its parameter: not ``(K, n)`` for a
                parameter on a :class:`~fgo_geoopt.KernelCollection`, or saved by another
                optimizer (``torch.optim.SGD`` keeps buffers in the weight's own layout),
                or not the parameter's shape for a plain one. Nothing is loaded then.
        """
        _check_loaded_state(self.param_groups, state_dict)
        state_dict = dict(state_dict)
        count = state_dict.pop("nonfinite_count", 0)
        # ``backend`` says how this process runs the step, not what the run is: the one given
        # to this optimizer wins over the one saved (a checkpoint from a GPU machine must not
        # switch a CPU run to another backend, nor the reverse).
        backends = [group["backend"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, backend in zip(self.param_groups, backends, strict=True):
            group["backend"] = backend
        self.nonfinite_count = int(count)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step (see the class docstring for the algorithm)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # nonfinite="raise" promises that nothing is updated: check every group before any
        # group (or its step counter) changes. Group values may have been changed since
        # construction (schedulers, user code): a NaN lr would silently wreck the weights.
        for group in self.param_groups:
            _validate(group)
            if group["nonfinite"] == "raise":
                _raise_if_nonfinite([p for p in group["params"] if p.grad is not None])
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            skipped = fgsgd(
                [p for p in group["params"] if p.grad is not None],
                self.state,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                adaptive_step=group["adaptive_step"],
                # "raise" groups were checked above; checking again would be a second pass
                nonfinite="none" if group["nonfinite"] == "raise" else group["nonfinite"],
                backend=group["backend"],
                metric=group["metric"],
            )
            if skipped is not None:
                self.nonfinite_count += skipped
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss

    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """Re-project the group's parameters and momentum buffers onto their manifolds."""
        for p in group["params"]:
            manifold = getattr(p, "manifold", None)
            if manifold is None or isinstance(manifold, geoopt.Euclidean):
                continue
            p.copy_(manifold.projx(p))
            st = self.state.get(p, {})
            buf = _plain_buffer(st)
            if buf is None:
                continue
            if isinstance(manifold, KernelCollection):
                buf = manifold.unit_proju(p, buf)
            else:
                buf = manifold.proju(p, buf)
            tiles = st.get("momentum_tiles")
            st["momentum_buffer"].copy_(buf if tiles is None else to_tiles(buf, tiles))

    def momentum_buffer(self, p: torch.Tensor) -> torch.Tensor | None:
        """The momentum buffer of ``p`` in its documented layout, or ``None`` before its first
        step (or without momentum).

        For a parameter on a :class:`~fgo_geoopt.KernelCollection` that is the ``(K, n)``
        buffer in unit coordinates, one row per kernel. The fused CPU step keeps the buffers of
        3x3 kernels tile-major in ``self.state`` (``state["momentum_tiles"]`` holds the tile
        size; it saves transposing them every step); for those this returns a converted copy.
        """
        return _plain_buffer(self.state.get(p, {}))


def _check_loaded_state(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Refuse momentum buffers that ``step()`` would misread (see ``FGSGD.load_state_dict``)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return  # torch's own check names that mismatch
    saved_state = state_dict.get("state", {})
    fix = (
        "resume from a state dict saved by FGSGD on the wrapped model (create the optimizer "
        "after fgo_geoopt.wrap), or do not load the optimizer state and start its momentum fresh"
    )
    for g, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        # torch optimizers save their implementation switches; FGSGD has none
        foreign = "foreach" in saved or "differentiable" in saved
        for i, (p, pid) in enumerate(zip(group["params"], saved.get("params", []), strict=False)):
            buf = saved_state.get(pid, {}).get("momentum_buffer")
            if buf is None:
                continue
            where = f"parameter {i} of group {g} (shape {tuple(p.shape)})"
            if not isinstance(buf, torch.Tensor):
                raise ValueError(f"the momentum buffer of {where} is not a tensor; {fix}")
            coll = getattr(p, "manifold", None)
            if isinstance(coll, KernelCollection):
                expected = (coll.num_kernels, coll.kernel_numel)
                if foreign:
                    raise ValueError(
                        f"the state of {where} was saved by another optimizer (a torch one, "
                        "such as SGD): its momentum is in the weight's layout, while FGSGD "
                        f"keeps a {expected} buffer in unit coordinates on manifold "
                        f"parameters; {fix}"
                    )
            else:
                expected = tuple(p.shape)
            if tuple(buf.shape) != expected:
                raise ValueError(
                    f"the momentum buffer of {where} has shape {tuple(buf.shape)}, FGSGD "
                    f"expects {expected}; {fix}"
                )


def _set_layout(st: dict[str, Any], tiles: int | None, convert: bool = True) -> None:
    """Store the momentum buffer of ``st`` tile-major with ``tiles`` kernels per tile, or
    kernel-major for ``None`` (in place: the tensor object stays)."""
    if convert:
        buf = st["momentum_buffer"]
        plain = _plain_buffer(st)
        buf.copy_(plain if tiles is None else to_tiles(plain, tiles))
    if tiles is None:
        st.pop("momentum_tiles", None)
    else:
        st["momentum_tiles"] = int(tiles)


def _plain_buffer(st: dict[str, Any]) -> torch.Tensor | None:
    buf = st.get("momentum_buffer")
    if buf is not None and st.get("momentum_tiles") is not None:
        return from_tiles(buf, st["momentum_tiles"])
    return buf


def _raise_if_nonfinite(params: list[torch.Tensor]) -> None:
    flags = _finite_flags([p.grad for p in params])
    bad = [i for i, ok in enumerate(flags) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient (NaN / inf entries) in {len(bad)} parameter(s) (positions "
            f"{bad} of the group with gradients); nothing was updated"
        )


def _split(params: list[torch.Tensor]):
    plain, colls, other = [], [], []
    for p in params:
        manifold = getattr(p, "manifold", None)
        if isinstance(manifold, KernelCollection):
            colls.append(p)
        elif manifold is None or isinstance(manifold, geoopt.Euclidean):
            plain.append(p)
        else:
            other.append(p)
    return plain, colls, other


def fgsgd(
    params: list[torch.Tensor],
    state: dict[torch.Tensor, dict[str, Any]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    adaptive_step: bool,
    nonfinite: str,
    backend: str,
    metric: str = "unit",
) -> int | torch.Tensor | None:
    """Functional FG-SGD step over ``params`` (all with gradients); returns skipped counts."""
    lr = float(lr)
    plain, colls, other = _split(params)
    check = nonfinite == "skip"
    if nonfinite == "raise":
        _raise_if_nonfinite(params)
    skipped: int | torch.Tensor = 0
    if plain:
        skipped = skipped + _plain_step(
            plain, state, lr, momentum, dampening, weight_decay, nesterov, maximize, check
        )
    jobs: list[_fused.FusedJob] = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p in colls:
        skipped = skipped + _collection_step(
            p,
            jobs,
            copies,
            state,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            weight_decay=weight_decay,
            adaptive=adaptive_step,
            check=check,
            backend=backend,
            metric=metric,
        )
    if jobs:  # the fused layers of the group run together: one hand-out to the threads
        skipped = skipped + _fused.run_jobs(jobs)
        for p, x in copies:
            p.copy_(x)
    for p in other:
        skipped = skipped + _generic_step(
            p, state, lr, momentum, dampening, nesterov, maximize, adaptive_step, check
        )
    if isinstance(skipped, torch.Tensor):
        skipped = int(skipped)
    return skipped


def _finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor has only finite entries (no NaN, no inf).

    One fused 2-norm per (device, dtype) group and one sync. A finite norm proves every entry
    finite; a non-finite one may also be an overflow of the sum of squares (one entry of 1e20
    in float32), so those few tensors are confirmed entry by entry: a huge but finite gradient
    is not "non-finite".
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    flags = [True] * len(tensors)
    for members in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in members])
        ok = torch.stack(norms).isfinite().tolist()
        for i, good in zip(members, ok, strict=True):
            flags[i] = good or bool(torch.isfinite(tensors[i]).all())
    return flags


def _plain_step(params, state, lr, momentum, dampening, weight_decay, nesterov, maximize, check):
    grads = [p.grad for p in params]
    skipped = 0
    if check:
        finite = _finite_flags(grads)
        if not all(finite):
            skipped = finite.count(False)
            params = [p for p, ok in zip(params, finite, strict=True) if ok]
            grads = [p.grad for p in params]
    if not params:
        return skipped
    bufs = [state[p].get("momentum_buffer") for p in params]
    _torch_sgd(
        params,
        grads,
        bufs,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        foreach=True,
        has_sparse_grad=False,
    )
    if momentum != 0:
        for p, buf in zip(params, bufs, strict=True):
            state[p]["momentum_buffer"] = buf
    return skipped


def _collection_step(
    p,
    jobs,
    copies,
    state,
    *,
    lr,
    momentum,
    dampening,
    nesterov,
    maximize,
    weight_decay,
    adaptive,
    check,
    backend,
    metric="unit",
):
    coll: KernelCollection = p.manifold
    grad = p.grad
    if metric == "stored" and coll.scale is not None:
        grad = grad * _inverse_square_scale(coll, grad)
    st = state[p]
    first = "momentum_buffer" not in st
    k, n = coll.num_kernels, coll.kernel_numel
    use_fused = (
        backend != "torch"
        and p.device.type == "cpu"
        and p.dtype in (torch.float32, torch.float64)
        and _fused.fused_supported(coll)
    )
    if backend == "auto" and not use_fused and p.device.type == "cpu":
        _warn_fallback_once(coll, p)
    if backend == "fused" and not use_fused:
        raise ValueError(
            f"backend='fused' cannot step a {p.dtype} parameter on {p.device} with manifolds "
            f"{coll.manifold_names}: it needs float32/float64 on CPU and built-in manifolds"
        )
    buf = None
    if momentum != 0:
        layout = _fused.buffer_layout(coll) if use_fused else None
        if first:
            # zeros, not empty: the fused step reads the buffer with a zero weight on the first
            # step, and skipped POMs keep it (zeros are the same in every layout)
            st["momentum_buffer"] = torch.zeros((k, n), dtype=p.dtype, device=p.device)
            _set_layout(st, layout, convert=False)
        elif st.get("momentum_tiles") != layout:
            _set_layout(st, layout)
        buf = st["momentum_buffer"]
    hyper = {
        "lr": lr,
        "momentum": momentum,
        "dampening": dampening,
        "nesterov": nesterov,
        "maximize": maximize,
        "weight_decay": weight_decay,
        "adaptive": adaptive,
        "first": first,
        "check": check,
    }
    if not use_fused:
        return batched_collection_step(coll, p, grad, buf, **hyper)
    # Queued: ``fgsgd`` runs the fused steps of all the group's layers together.
    x = p if p.is_contiguous() else p.contiguous()
    g = grad if grad.is_contiguous() else grad.contiguous()
    jobs.append(
        _fused.FusedJob(
            coll,
            x.detach().view(k, n).numpy(),
            g.detach().view(k, n).numpy(),
            None if buf is None else buf.numpy(),
            key=p.data_ptr(),
            state=st,
            **hyper,
        )
    )
    if x is not p:
        copies.append((p, x))
    return 0


_FALLBACK_WARNED: set[str] = set()


def _warn_fallback_once(coll: KernelCollection, p: torch.Tensor) -> None:
    """Say once per reason and process that ``backend="auto"`` steps a CPU collection with
    the batched torch ops, tens of times slower there than the fused step."""
    if not _fused.AVAILABLE:
        reason = (
            "FGO_DISABLE_NUMBA=1 switches the fused step off"
            if os.environ.get("FGO_DISABLE_NUMBA", "0") == "1"
            else "numba is not importable"
        )
    elif p.dtype not in (torch.float32, torch.float64):
        reason = f"the fused step takes float32 / float64 weights, not {p.dtype}"
    else:
        reason = f"a manifold of {coll.manifold_names} has no fused implementation"
    if reason in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(reason)
    warnings.warn(
        f"FG-SGD steps CPU collections with the batched torch ops (much slower than the fused "
        f"step): {reason}. backend='torch' says so explicitly and silences this.",
        UserWarning,
        stacklevel=4,
    )


def _inverse_square_scale(coll: KernelCollection, like: torch.Tensor) -> torch.Tensor:
    """``1 / R^2`` for every entry of the weight (1 on Euclidean kernels), in the layout of
    ``like``: turns ``R * dL/dW``, the unit-coordinate gradient the steps form, into
    ``dL/dW / R`` (``metric="stored"``). Cached with the collection's scales."""
    from ..rescaling import entry_scale

    key = ("scale", "inverse square", str(like.device), like.dtype)  # dropped by set_scale
    out = coll._cache.get(key)
    if out is None:
        factor = entry_scale(coll, dtype=torch.float64, device=like.device)
        out = factor.pow(-2).to(like.dtype)
        coll._cache[key] = out
    return out


def _generic_step(p, state, lr, momentum, dampening, nesterov, maximize, adaptive, check):
    """Any other geoopt manifold: the same step with the whole tensor as a single POM."""
    manifold = p.manifold
    grad = -p.grad if maximize else p.grad
    rg = manifold.egrad2rgrad(p, grad.clone())
    sq = rg.to(torch.float64).pow(2).sum()
    if check and not bool(torch.isfinite(sq)):
        return 1
    if adaptive:
        big_r = float(sq.sqrt())
        rg = rg / max(1.0, big_r * (2.0 + big_r))  # Eq. (7)
    st = state[p]
    if momentum != 0:
        if "momentum_buffer" not in st:
            buf = rg.clone()
        else:
            buf = st["momentum_buffer"].mul(momentum).add_(rg, alpha=1.0 - dampening)
        direction = rg + momentum * buf if nesterov else buf
        new_p, new_buf = manifold.retr_transp(p, -lr * direction, buf)
        st["momentum_buffer"] = new_buf
    else:
        new_p = manifold.retr(p, -lr * rg)
    p.copy_(new_p)
    return 0
