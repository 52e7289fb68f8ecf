"""FG-Adam: Riemannian Adam over collections of products of manifolds.

The second moment is one scalar per POM (or per kernel), the adaptivity rule of Becigneul &
Ganea (ICLR 2019) for products of manifolds; the first moment lives in unit coordinates and is
transported by tangent projection, as FG-SGD's momentum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import geoopt
import torch
from geoopt.optim import RiemannianAdam
from torch.optim.adamw import adamw as _torch_adamw

from ..collections import KernelCollection
from . import adam_step, cpu
from ._checks import (
    NONFINITE_POLICIES,
    TORCH_ADAM_KEYS,
    check_adam_state,
    finite_flags,
    raise_if_nonfinite,
    validate_adam,
)
from ._dispatch import backend_of, load_keeping_backends
from ._plain import split_params
from ._records import Layer
from ._state import Workspace

__all__ = ["NONFINITE_POLICIES", "FGAdam", "fgadam"]

_FG_DEFAULTS = {
    "maximize": False,
    "moment": "pom",
    "nonfinite": "skip",
    "metric": "unit",
    "backend": "auto",
}


class FGAdam(RiemannianAdam):
    r"""Adam on collections of products of weight manifolds (FG-Adam).

    For every POM :math:`g` of every :class:`~fgo_geoopt.KernelCollection` parameter, with
    stored weight :math:`W = R \odot w` (``R = 1`` without re-scaling), at step ``t``:

    .. code-block:: text

        G     = R * dL/dW                         # unit coordinates (dL/dW / R: metric="stored")
        r_k   = proj_{T w_k}(G_k)                 # every kernel k (Sp / Ob / St / Euc)
        v_g   = b2 v_g + (1 - b2) |r_g|^2 / N_g   # N_g: entries of the POM (moment="pom")
        v_k   = b2 v_k + (1 - b2) |r_k|^2 / n     # instead, with moment="kernel"
                                                  # |r|: |R * r| with metric="stored"
        m_k   = b1 m_k + (1 - b1) r_k
        d_k   = m_k / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)    # v: max over steps (amsgrad)
        w_k   = w_k * (1 - lr * weight_decay)     # Euclidean kernels only (AdamW's decay)
        w_k   = retr_{w_k}(-lr * d_k)             # normalise / Gram-Schmidt / add
        m_k   = proj_{T w_k}(m_k)                 # first moment transported; v is a scalar
        W_k   = R * w_k

    Plain tensors (and ``ManifoldParameter`` on :class:`geoopt.Euclidean`) take exactly the step
    of :class:`torch.optim.AdamW`, through its ``foreach`` implementation. Other geoopt manifolds
    take the same Riemannian step with the whole tensor as one POM.

    Args:
        params: Parameters or parameter groups. Group dicts may override every keyword below.
        lr: Learning rate.
        betas: Decay rates of the first and second moments.
        eps: Added to the root of the second moment (``> 0``).
        weight_decay: Decoupled weight decay (AdamW), applied to plain parameters and to the
            Euclidean kernels of collections only; ``torch.optim.AdamW``'s default.
        amsgrad: Divide by the largest second moment seen so far.
        maximize: Maximise the objective instead of minimising it.
        moment: ``"pom"`` (default): one second moment per POM; ``"kernel"``: one per kernel.
        nonfinite: What a NaN / inf gradient does: ``"skip"`` (default; the affected POMs, or
            plain parameters, keep weights and moments, counted in ``nonfinite_count``),
            ``"raise"`` (``FloatingPointError`` before anything is updated) or ``"none"``.
        metric: ``"unit"`` (default) or ``"stored"``: the metric of the step on re-scaled
            collections, that of the unit kernels or that of the stored weights (the gradient
            ``dL/dW / R`` in unit coordinates as in :class:`~fgo_geoopt.FGSGD`, and its norm
            ``|R * r|`` in the second moment, so that a stored weight moves by about ``lr`` per
            entry, as under AdamW).
        stabilize: Re-project parameters and first moments onto their manifolds every this
            many steps (``None``: never).
        backend: ``"auto"`` (the fused numba step for float32 / float64 CPU collections of the
            built-in manifolds, the batched torch step for everything else), ``"fused"``
            (require the fused step: ``ValueError`` where it cannot run) or ``"torch"`` (the
            batched torch step everywhere). Both compute the same step. Not restored by
            :meth:`load_state_dict`: it says how this process runs, not what the run is.

    Note:
        ``step()`` never writes into ``p.grad``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        moment: str = "pom",
        nonfinite: str = "skip",
        metric: str = "unit",
        stabilize: int | None = None,
        backend: str = "auto",
    ):
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, list) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "moment": moment,
            "nonfinite": nonfinite,
            "metric": metric,
            "stabilize": stabilize,
            "backend": backend,
        }
        validate_adam(defaults)
        if backend == "fused" and not cpu.AVAILABLE:
            raise ValueError("backend='fused' needs numba, which is not importable here")
        self._fg_defaults = {k: defaults[k] for k in _FG_DEFAULTS}
        self._stabilize = stabilize
        self.nonfinite_count = 0
        self._workspace = Workspace()  # the step's caches; never saved
        # torch.optim.Adam.__init__ would add its implementation switches (foreach, fused,
        # capturable, ...) to every group; FGAdam has none, and their absence is how a state
        # saved by torch's Adam / AdamW is told apart (see load_state_dict).
        torch.optim.Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in getattr(self, "_fg_defaults", _FG_DEFAULTS).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        validate_adam(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        torch.optim.Optimizer.__setstate__(self, state)
        if not hasattr(self, "_fg_defaults"):
            self._fg_defaults = dict(_FG_DEFAULTS)
        if not hasattr(self, "nonfinite_count"):
            self.nonfinite_count = 0
        self._workspace = Workspace()
        for group in self.param_groups:
            for key in TORCH_ADAM_KEYS:  # a torch AdamW state: its switches mean nothing here
                group.pop(key, None)
            group.setdefault("amsgrad", False)
            for key, value in _FG_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("stabilize", None)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=adam_step._scalar_dtype())

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["nonfinite_count"] = int(self.nonfinite_count)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or by ``torch.optim.AdamW`` for plain
        parameters).

        Raises:
            ValueError: A moment does not fit its parameter: for a parameter on a
                :class:`~fgo_geoopt.KernelCollection`, ``exp_avg`` must be ``(K, n)`` and
                ``exp_avg_sq`` ``(P,)`` (``moment="pom"``) or ``(K,)`` (``"kernel"``), and the
                state must come from FGAdam (``torch.optim.AdamW`` keeps its moments in the
                weight's layout); for a plain parameter, the parameter's shape. Nothing is
                loaded then.
        """
        check_adam_state(self.param_groups, state_dict)
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
        # nonfinite="raise" promises that nothing is updated: check every group first.
        for group in self.param_groups:
            validate_adam(group)
            if group["nonfinite"] == "raise":
                raise_if_nonfinite([p for p in group["params"] if p.grad is not None])
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            self.nonfinite_count += fgadam(
                [p for p in group["params"] if p.grad is not None],
                self.state,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                moment=group["moment"],
                nonfinite="none" if group["nonfinite"] == "raise" else group["nonfinite"],
                metric=group["metric"],
                backend=group["backend"],
                workspace=self._workspace,
            )
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss

    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """Re-project the group's parameters and first moments onto their manifolds."""
        for p in group["params"]:
            manifold = getattr(p, "manifold", None)
            if manifold is None or isinstance(manifold, geoopt.Euclidean):
                continue
            p.copy_(manifold.projx(p))
            st = self.state.get(p, {})
            m = self.exp_avg(p)
            if m is None:
                continue
            if not isinstance(manifold, KernelCollection):
                st["exp_avg"].copy_(manifold.proju(p, m))
                continue
            m = manifold.unit_proju(p, m)
            if st.get(adam_step.BLOCKS):
                m = adam_step.to_blocks(adam_step.plan_of(manifold, m, self._workspace), m)
            st["exp_avg"].copy_(m)

    def exp_avg(self, p: torch.Tensor) -> torch.Tensor | None:
        """The first moment of ``p`` in its documented layout, or ``None`` before its first step.

        For a parameter on a :class:`~fgo_geoopt.KernelCollection` that is the ``(K, n)``
        first moment in unit coordinates, one row per kernel. For layers the step gathers
        (spatial kernels with several columns, or mixed manifold types) ``self.state`` keeps it
        in the step's own layout, one entry-major block per manifold type
        (``state["exp_avg_blocks"] == 1``), which saves gathering and transposing it twice per
        step; for those this returns a converted copy.
        """
        st = self.state.get(p, {})
        manifold = getattr(p, "manifold", None)
        if isinstance(manifold, KernelCollection):
            return adam_step.kernel_major(st, manifold, self._workspace)
        return st.get("exp_avg")


_FUNCTIONAL_WORKSPACE = Workspace()  # caches of ``fgadam`` called without an optimizer


def fgadam(
    params: list[torch.Tensor],
    state: dict[torch.Tensor, dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    moment: str = "pom",
    nonfinite: str = "skip",
    metric: str = "unit",
    backend: str = "auto",
    workspace: Workspace | None = None,
) -> int:
    """Functional FG-Adam step over ``params`` (all with gradients); returns the skipped count.

    Plain parameters take ``torch.optim.adamw.adamw(..., foreach=True)``; collection parameters
    take the fused CPU step (``cpu.adam_step``) or the batched step of :mod:`.adam_step`, as
    ``backend`` and the parameter allow (see :class:`FGAdam`); parameters on other geoopt
    manifolds take the same step with the whole tensor as one POM.
    """
    workspace = _FUNCTIONAL_WORKSPACE if workspace is None else workspace
    hyper = adam_step.AdamHyper(
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        amsgrad=amsgrad,
        maximize=maximize,
        moment=moment,
        metric=metric,
        check=nonfinite == "skip",
    )
    plain, colls, other = split_params(params)
    if nonfinite == "raise":
        raise_if_nonfinite(params)
    skipped: int | torch.Tensor = 0
    if plain:
        skipped = skipped + _plain_step(plain, state, hyper)
    if colls:
        fused, batched = [], []
        for p in colls:
            layer = Layer(param=p, coll=p.manifold, grad=p.grad, state=state[p], first=False)
            on_cpu = backend != "torch" and backend_of(p, backend, workspace) == "cpu"
            (fused if on_cpu else batched).append(layer)
        if fused:
            skipped = skipped + cpu.adam_step(fused, hyper, workspace)
        if batched:
            skipped = skipped + adam_step.step(batched, hyper, workspace)
    for p in other:
        skipped = skipped + _generic_step(p, state[p], hyper)
    return int(skipped)


def _plain_step(params: list[torch.Tensor], state, hyper: adam_step.AdamHyper) -> int:
    """Exactly ``torch.optim.AdamW(foreach=True)``'s step (its own function is called)."""
    skipped = 0
    if hyper.check:
        finite = finite_flags([p.grad for p in params])
        if not all(finite):
            skipped = finite.count(False)
            params = [p for p, ok in zip(params, finite, strict=True) if ok]
    if not params:
        return skipped
    for p in params:  # lazy state, as torch.optim.AdamW creates it
        st = state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0, dtype=adam_step._scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if hyper.amsgrad and "max_exp_avg_sq" not in state[p]:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    sts = [state[p] for p in params]
    _torch_adamw(
        params,
        [p.grad for p in params],
        [st["exp_avg"] for st in sts],
        [st["exp_avg_sq"] for st in sts],
        [st["max_exp_avg_sq"] for st in sts] if hyper.amsgrad else [],
        [st["step"] for st in sts],
        foreach=True,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=hyper.amsgrad,
        beta1=hyper.beta1,
        beta2=hyper.beta2,
        lr=hyper.lr,
        weight_decay=hyper.weight_decay,
        eps=hyper.eps,
        maximize=hyper.maximize,
    )
    return skipped


def _generic_step(p: torch.Tensor, st: dict[str, Any], hyper: adam_step.AdamHyper) -> int:
    """Any other geoopt manifold: the collection step with the whole tensor as one POM."""
    manifold = p.manifold
    grad = -p.grad if hyper.maximize else p.grad
    rg = manifold.egrad2rgrad(p, grad.clone())
    sq = rg.pow(2).sum()
    if hyper.check and not bool(torch.isfinite(sq)):
        return 1
    if "exp_avg" not in st:
        st["step"] = torch.tensor(0.0, dtype=adam_step._scalar_dtype())
        st["exp_avg"] = torch.zeros_like(p)
        st["exp_avg_sq"] = p.new_zeros(())
    if hyper.amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = p.new_zeros(())
    st["step"] += 1
    t = float(st["step"])
    m = st["exp_avg"].lerp_(rg, 1.0 - hyper.beta1)
    v = st["exp_avg_sq"]
    v.mul_(hyper.beta2).add_(sq / p.numel(), alpha=1.0 - hyper.beta2)
    if hyper.amsgrad:
        v = torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
    denom = v.sqrt() / (1.0 - hyper.beta2**t) ** 0.5 + hyper.eps
    coef = hyper.lr / (1.0 - hyper.beta1**t) / denom
    new_p, new_m = manifold.retr_transp(p, -coef * m, m)
    p.copy_(new_p)
    m.copy_(new_m)
    return 0
