"""FG-SGD: Riemannian SGD over collections of products of manifolds (Ozay, NeurIPS 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import geoopt
import torch
from geoopt.optim import RiemannianSGD

from ..collections import KernelCollection
from . import cpu, gpu, torch_step
from ._checks import (
    NONFINITE_POLICIES,
    check_loaded_state,
    check_lr_device,
    raise_if_nonfinite,
    validate,
)
from ._dispatch import backend_of, load_keeping_backends
from ._plain import generic_step, plain_step, split_params
from ._records import Hyper, Layer, total_count
from ._state import Workspace, plain_buffer, to_tiles

__all__ = ["FGSGD", "NONFINITE_POLICIES", "fgsgd"]

_FG_DEFAULTS = {
    "maximize": False,
    "adaptive_step": True,
    "nonfinite": "skip",
    "backend": "auto",
    "metric": "unit",
    "capturable": False,
}


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
        backend: ``"auto"`` (the fused numba step on CPU where possible, the Triton kernels on
            CUDA where triton is importable, the flat torch step otherwise), ``"fused"`` or
            ``"triton"`` (require that one), or ``"torch"`` (the flat torch step everywhere).
        metric: The metric of the step on re-scaled collections (``W = R * w``). ``"unit"``
            (default, the paper read literally): the Riemannian gradient of the unit kernels
            ``w``, ``R * dL/dW``. ``"stored"``: that of the stored weights ``W``, which is
            ``dL/dW / R`` in unit coordinates, so a constrained kernel moves as far, relative to
            its size, as SGD would move it, and as the unscaled Euclidean kernels of its filter
            do. Identical where a collection has no scales. See ``docs/optimizer.md``.
        capturable: Allow ``lr`` to be a one-element tensor on the parameters' device and read
            nothing on the host in ``step()``, so that the step can be captured in a CUDA graph
            (``docs/optimizer.md``). Not with ``nonfinite="raise"`` nor ``stabilize``.

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
        capturable: bool = False,
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
            "capturable": capturable,
            "stabilize": stabilize,
        }
        validate(defaults)
        if backend == "fused" and not cpu.AVAILABLE:
            raise ValueError("backend='fused' needs numba, which is not importable here")
        if backend == "triton" and not gpu.AVAILABLE:
            raise ValueError("backend='triton' needs triton, which is not importable here")
        self._fg_defaults = {k: defaults[k] for k in _FG_DEFAULTS}
        self._skipped_host = 0
        self._skipped_device: dict[torch.device, torch.Tensor] = {}
        self._workspace = Workspace()  # the backends' caches; never saved
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
        validate(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_fg_defaults"):
            self._fg_defaults = dict(_FG_DEFAULTS)
        if not hasattr(self, "_skipped_host"):
            self._skipped_host = int(state.get("nonfinite_count", 0))
            self._skipped_device = {}
        self.__dict__.pop("nonfinite_count", None)  # pickles of earlier versions
        self._workspace = Workspace()
        for group in self.param_groups:
            for key, value in _FG_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("stabilize", None)

    @property
    def nonfinite_count(self) -> int:
        """Skipped POMs and parameters so far (``nonfinite="skip"``). The flat steps count on
        the device; reading this property reads those counters (a host sync), the step never
        does."""
        return self._skipped_host + sum(int(t) for t in self._skipped_device.values())

    @nonfinite_count.setter
    def nonfinite_count(self, value: int) -> None:
        self._skipped_host = int(value)
        self._skipped_device = {}

    def _count_skipped(self, skipped: int | torch.Tensor) -> None:
        if isinstance(skipped, torch.Tensor):
            total = self._skipped_device.get(skipped.device)
            if total is None:
                total = self._skipped_device[skipped.device] = torch.zeros_like(skipped)
            total.add_(skipped)
        else:
            self._skipped_host += int(skipped)

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
        check_loaded_state(self.param_groups, state_dict)
        state_dict = dict(state_dict)
        count = state_dict.pop("nonfinite_count", 0)
        load_keeping_backends(self, super().load_state_dict, state_dict)
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
            validate(group)
            if group["nonfinite"] == "raise":
                raise_if_nonfinite([p for p in group["params"] if p.grad is not None])
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
                workspace=self._workspace,
                capturable=group["capturable"],
            )
            self._count_skipped(skipped)
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
            buf = plain_buffer(st)
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
        return plain_buffer(self.state.get(p, {}))


_FUNCTIONAL_WORKSPACE = Workspace()  # caches of ``fgsgd`` called without an optimizer


def fgsgd(
    params: list[torch.Tensor],
    state: dict[torch.Tensor, dict[str, Any]],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    adaptive_step: bool,
    nonfinite: str,
    backend: str,
    metric: str = "unit",
    workspace: Workspace | None = None,
    capturable: bool = False,
) -> int | torch.Tensor:
    """Functional FG-SGD step over ``params`` (all with gradients); returns the skipped count.

    Plain parameters take torch's SGD step (on one flat buffer per device and dtype);
    collection parameters go to a backend (the fused CPU one, the Triton one or the flat torch
    one, as ``backend`` and the parameter allow), all layers of a backend together; parameters
    on other geoopt manifolds take the generic step. The count is an int where only the CPU
    backend counted, else a tensor on the device (``int()`` of it waits for the device).
    """
    workspace = _FUNCTIONAL_WORKSPACE if workspace is None else workspace
    hyper = Hyper(
        lr=lr if capturable and isinstance(lr, torch.Tensor) else float(lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        weight_decay=weight_decay,
        adaptive=adaptive_step,
        check=nonfinite == "skip",
        metric=metric,
    )
    plain, colls, other = split_params(params)
    if nonfinite == "raise":
        raise_if_nonfinite(params)
    if isinstance(hyper.lr, torch.Tensor):
        check_lr_device(hyper.lr, params)
    counts: list[int | torch.Tensor] = []
    if plain:
        counts += plain_step(plain, state, hyper, workspace, flat=backend in ("torch", "triton"))
    chosen: dict[str, list[Layer]] = {"cpu": [], "gpu": [], "torch": []}
    for p in colls:
        layer = Layer(param=p, coll=p.manifold, grad=p.grad, state=state[p],
                      first="momentum_buffer" not in state[p])  # fmt: skip
        chosen[backend_of(p, backend, workspace)].append(layer)
    for name, module in (("torch", torch_step), ("gpu", gpu)):
        if chosen[name]:
            counts += module.step(chosen[name], hyper, workspace)
    if chosen["cpu"]:
        counts.append(cpu.step(chosen["cpu"], hyper, workspace))
    for p in other:
        count = generic_step(p, state, hyper)
        if count is not None:
            counts.append(count)
    return total_count(counts)
