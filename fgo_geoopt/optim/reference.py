"""FG-SGD written literally, one POM and one kernel at a time (Algorithm 1, Ozay 2019).

For tests and documentation only: it loops over POMs and kernels in Python and calls LAPACK
per kernel, so it is far too slow for training. The optimizer's batched and fused paths must
agree with it step by step.
"""

from __future__ import annotations

import math

import torch

from ..collections import KernelCollection

__all__ = ["reference_step"]


def _tall(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (w.t(), True) if w.shape[0] < w.shape[1] else (w, False)


def _project(kind: str, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tangent projection of ``u`` at the kernel ``x`` (both ``A x B``, tall)."""
    if kind == "sphere":
        return u - torch.sum(x * u) * x
    if kind == "oblique":
        return u - torch.sum(x * u, dim=0, keepdim=True) * x
    if kind == "stiefel":
        s = x.t() @ u
        return u - x @ (0.5 * (s + s.t()))
    return u


def _retract(kind: str, y: torch.Tensor) -> torch.Tensor:
    """Retraction of the moved kernel ``y = x + u`` (tall)."""
    if kind == "sphere":
        return y / torch.linalg.norm(y)
    if kind == "oblique":
        return y / torch.linalg.norm(y, dim=0, keepdim=True)
    if kind == "stiefel":
        q, r = torch.linalg.qr(y)
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        return q * signs  # QR with a positive diagonal of R
    return y


def reference_step(
    coll: KernelCollection,
    weight: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    adaptive: bool = True,
    metric: str = "unit",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One FG-SGD step; returns the new weight and the new momentum buffer.

    ``buf`` is ``None`` on the first step; buffers are ``(K, A, B)`` in unit coordinates.
    ``metric="stored"`` takes the gradient of the stored weights, ``dL/dW / R``, in unit
    coordinates instead of ``R * dL/dW`` (``FGSGD``'s ``metric``).
    Built-in manifold names only (``sphere``, ``oblique``, ``stiefel``, ``euclidean``).
    """
    a, b = coll.kernel_shape
    w_k = weight.detach().reshape(coll.num_kernels, a, b).clone()
    g_k = grad.detach().reshape(coll.num_kernels, a, b)
    scale = None
    if coll.scale is not None:
        scale = coll.elem_scale(weight.device, weight.dtype).view(-1, a, b)
    kernel_pom = coll.kernel_pom.tolist()
    pom_type = coll.pom_type.tolist()
    members: dict[int, list[int]] = {}
    for k, g in enumerate(kernel_pom):
        members.setdefault(g, []).append(k)
    new_buf = torch.zeros_like(w_k) if momentum else None
    for g, kernels in members.items():  # every POM
        kind = coll.manifold_names[pom_type[g]]
        # Line 5: Riemannian gradient of every kernel, in unit coordinates.
        units, rgrads = {}, {}
        for k in kernels:
            s = 1.0 if scale is None or kind == "euclidean" else scale[k % coll.kernels_per_row]
            x = w_k[k] / s
            e = g_k[k] / s if metric == "stored" else g_k[k] * s
            if kind == "euclidean" and weight_decay:
                e = e + weight_decay * w_k[k]
            xt, flipped = _tall(x)
            et, _ = _tall(e)
            units[k] = (xt, flipped, s)
            rgrads[k] = _project(kind, xt, et)
        # Eq. (7): tau_g = sqrt(max{1, R^2 (2 + R)^2}) with R the norm over the POM.
        big_r = math.sqrt(sum(float(torch.sum(rgrads[k] ** 2)) for k in kernels))
        tau = math.sqrt(max(1.0, big_r**2 * (2.0 + big_r) ** 2)) if adaptive else 1.0
        for k in kernels:
            xt, flipped, s = units[k]
            r = rgrads[k] / tau
            # Line 6: momentum (torch.optim.SGD semantics).
            if momentum:
                old = None if buf is None else _tall(buf[k])[0]
                b_k = r if old is None else momentum * old + (1.0 - dampening) * r
                d = r + momentum * b_k if nesterov else b_k
            else:
                d = r
            # Line 7: retraction, then the buffer is transported by projection.
            y = _retract(kind, xt - lr * d)
            if momentum:
                moved = _project(kind, y, b_k)
                new_buf[k] = moved.t() if flipped else moved
            w_k[k] = (y.t() if flipped else y) * s
    return w_k.reshape(weight.shape), new_buf
