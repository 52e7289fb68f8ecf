"""FG-Adam written literally, one POM and one kernel at a time.

For tests and documentation only: it loops over POMs and kernels in Python and calls LAPACK
per kernel. ``FGAdam``'s batched step must agree with it step by step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..collections import KernelCollection
from .reference import _project, _retract, _tall

__all__ = ["reference_adam_step"]


def reference_adam_step(
    coll: KernelCollection,
    weight: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any] | None,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    moment: str = "pom",
    metric: str = "unit",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One FG-Adam step; returns the new weight and the new state.

    ``state`` is ``None`` on the first step, then what the previous call returned: ``step``
    (an int), ``exp_avg`` (``(K, A, B)``, unit coordinates, each kernel in its stored
    orientation), ``exp_avg_sq`` (``(P,)`` for ``moment="pom"``, ``(K,)`` for ``"kernel"``)
    and, with ``amsgrad``, ``max_exp_avg_sq``. Built-in manifold names only.
    """
    beta1, beta2 = betas
    a, b = coll.kernel_shape
    n = a * b
    w_k = weight.detach().reshape(coll.num_kernels, a, b).clone()
    g_k = grad.detach().reshape(coll.num_kernels, a, b)
    scale = None
    if coll.scale is not None:
        scale = coll.elem_scale(weight.device, weight.dtype).view(-1, a, b)
    if state is None:
        slots = coll.num_poms if moment == "pom" else coll.num_kernels
        state = {
            "step": 0,
            "exp_avg": torch.zeros_like(w_k),
            "exp_avg_sq": torch.zeros(slots, dtype=weight.dtype),
            "max_exp_avg_sq": torch.zeros(slots, dtype=weight.dtype),
        }
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    m, v, v_max = state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"]
    t = state["step"] = state["step"] + 1
    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
    kernel_pom = coll.kernel_pom.tolist()
    pom_type = coll.pom_type.tolist()
    members: dict[int, list[int]] = {}
    for k, g in enumerate(kernel_pom):
        members.setdefault(g, []).append(k)
    for g, kernels in members.items():  # every POM
        kind = coll.manifold_names[pom_type[g]]
        # The Riemannian gradient of every kernel, in unit coordinates.
        units, rgrads = {}, {}
        for k in kernels:
            s = 1.0 if scale is None or kind == "euclidean" else scale[k % coll.kernels_per_row]
            x = w_k[k] / s
            e = g_k[k] / s if metric == "stored" else g_k[k] * s
            if maximize:
                e = -e
            xt, flipped = _tall(x)
            et, _ = _tall(e)
            units[k] = (xt, flipped, s)
            rgrads[k] = _project(kind, xt, et)
        # The squared norm of every kernel's gradient in the metric of the step: that of the
        # unit kernels, or |R r_k|^2, that of the stored weights (metric="stored").
        sq = {}
        for k in kernels:
            xt, flipped, s = units[k]
            r = rgrads[k].t() if flipped else rgrads[k]
            sq[k] = float(torch.sum((s * r) ** 2 if metric == "stored" else r**2))
        # The second moment: the mean squared entry of the gradient, per POM or per kernel.
        if moment == "pom":
            mean_sq = sum(sq.values()) / (len(kernels) * n)
            v[g] = beta2 * v[g] + (1.0 - beta2) * mean_sq
            if amsgrad:
                v_max[g] = max(float(v_max[g]), float(v[g]))
        else:
            for k in kernels:
                v[k] = beta2 * v[k] + (1.0 - beta2) * sq[k] / n
                if amsgrad:
                    v_max[k] = max(float(v_max[k]), float(v[k]))
        for k in kernels:
            xt, flipped, s = units[k]
            slot = g if moment == "pom" else k
            second = float(v_max[slot] if amsgrad else v[slot])
            denom = math.sqrt(second) / math.sqrt(bias2) + eps
            m_k = beta1 * _tall(m[k])[0] + (1.0 - beta1) * rgrads[k]
            d = m_k / bias1 / denom
            if kind == "euclidean" and weight_decay:
                xt = xt * (1.0 - lr * weight_decay)  # decoupled decay, as AdamW
            y = _retract(kind, xt - lr * d)
            m_k = _project(kind, y, m_k)  # the first moment moves to the new point
            m[k] = m_k.t() if flipped else m_k
            w_k[k] = (y.t() if flipped else y) * s
    return w_k.reshape(weight.shape), state
