"""Checks shared by the optimizers: group values, loaded state, non-finite gradients.

"Non-finite" means NaN / inf entries in a gradient, and only that: a huge but finite gradient
is stepped (overflow in the step's own arithmetic is the kernels' business, see
docs/optimizer.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..collections import KernelCollection

__all__ = [
    "ADAM_BACKENDS",
    "BACKENDS",
    "METRICS",
    "NONFINITE_POLICIES",
    "check_loaded_state",
    "check_lr_device",
    "check_number",
    "finite_flags",
    "raise_if_nonfinite",
    "validate",
]

NONFINITE_POLICIES = ("skip", "raise", "none")
BACKENDS = ("auto", "fused", "torch", "triton")
#: FGAdam's backends: no Triton kernels (on CUDA ``"auto"`` takes the batched torch step).
ADAM_BACKENDS = ("auto", "fused", "torch")
#: Metrics of the step on re-scaled collections (see ``FGSGD``).
METRICS = ("unit", "stored")


def check_number(
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


def _validate_shared(group: dict[str, Any]) -> None:
    """The keys FGSGD and FGAdam groups share: ``nonfinite``, ``metric``, ``stabilize``."""
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {group['nonfinite']!r}"
        )
    if group["metric"] not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {group['metric']!r}")
    stabilize = group.get("stabilize")
    if stabilize is not None and (
        isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1
    ):
        raise ValueError(f"stabilize must be None or a positive int, got {stabilize!r}")


def validate(group: dict[str, Any]) -> None:
    capturable = group.get("capturable", False)
    if not isinstance(capturable, bool):
        raise ValueError(f"capturable must be a bool, got {capturable!r}")
    lr = group["lr"]
    if capturable and isinstance(lr, torch.Tensor):
        # its value lives on the device: reading it here would synchronise every step
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError("lr must be a number or a one-element floating-point tensor")
    else:
        check_number("lr", lr)
    check_number("momentum", group["momentum"], high=1.0, high_open=True)
    check_number("dampening", group["dampening"], high=1.0)
    check_number("weight_decay", group["weight_decay"])
    for key in ("nesterov", "maximize", "adaptive_step"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    _validate_shared(group)
    if group["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {group['backend']!r}")
    stabilize = group.get("stabilize")
    if capturable and (group["nonfinite"] == "raise" or stabilize is not None):
        raise ValueError(
            "capturable=True steps without reading the device: nonfinite='raise' (which "
            "reads the gradients) and stabilize (a re-projection every N steps) do not fit it"
        )


def check_loaded_state(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
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


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
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


def raise_if_nonfinite(params: list[torch.Tensor]) -> None:
    flags = finite_flags([p.grad for p in params])
    bad = [i for i, ok in enumerate(flags) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient (NaN / inf entries) in {len(bad)} parameter(s) (positions "
            f"{bad} of the group with gradients); nothing was updated"
        )


def check_lr_device(lr: torch.Tensor, params: list[torch.Tensor]) -> None:
    devices = {p.device for p in params}
    if devices and devices != {lr.device}:
        raise ValueError(
            f"with capturable=True a tensor lr must be on the parameters' device "
            f"({', '.join(sorted(map(str, devices)))}), not on {lr.device}: a CPU number would "
            "be captured as a constant"
        )


# ---------------------------------------------------------------------------- FG-Adam
#: Granularities of FG-Adam's second moment on collections.
ADAM_MOMENTS = ("pom", "kernel")
#: Group keys that only torch's own Adam / AdamW save (FGAdam has none of them).
TORCH_ADAM_KEYS = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def validate_adam(group: dict[str, Any]) -> None:
    """Check the values of an FGAdam parameter group (``ValueError`` naming the bad one)."""
    check_number("lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
    check_number("beta1", betas[0], high=1.0, high_open=True)
    check_number("beta2", betas[1], high=1.0, high_open=True)
    check_number("eps", group["eps"])
    if float(group["eps"]) <= 0.0:
        raise ValueError(
            f"Invalid eps: {group['eps']} (expected > 0: a POM whose gradient is zero would "
            "divide 0 by 0)"
        )
    check_number("weight_decay", group["weight_decay"])
    for key in ("amsgrad", "maximize"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
    if group["backend"] not in ADAM_BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(ADAM_BACKENDS)}, got {group['backend']!r}"
        )
    if group["moment"] not in ADAM_MOMENTS:
        raise ValueError(
            f"moment must be one of {', '.join(ADAM_MOMENTS)}, got {group['moment']!r}"
        )
    _validate_shared(group)


def check_adam_state(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Refuse moments that ``FGAdam.step()`` would misread (see ``FGAdam.load_state_dict``)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return  # torch's own check names that mismatch
    saved_state = state_dict.get("state", {})
    fix = (
        "resume from a state dict saved by FGAdam on the wrapped model (create the optimizer "
        "after fgo_geoopt.wrap), or do not load the optimizer state and start the moments fresh"
    )
    for g, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        foreign = any(key in saved for key in TORCH_ADAM_KEYS)
        moment = saved.get("moment", "pom")
        for i, (p, pid) in enumerate(zip(group["params"], saved.get("params", []), strict=False)):
            st = saved_state.get(pid, {})
            if not st:
                continue
            where = f"parameter {i} of group {g} (shape {tuple(p.shape)})"
            manifold = getattr(p, "manifold", None)
            if isinstance(manifold, KernelCollection):
                if foreign:
                    raise ValueError(
                        f"the state of {where} was saved by another optimizer (a torch one, "
                        "such as AdamW): its moments are in the weight's layout, while FGAdam "
                        f"keeps them in unit coordinates on manifold parameters; {fix}"
                    )
                second = (manifold.num_poms,) if moment == "pom" else (manifold.num_kernels,)
                expected = {
                    "exp_avg": (manifold.num_kernels, manifold.kernel_numel),
                    "exp_avg_sq": second,
                    "max_exp_avg_sq": second,
                }
            elif manifold is not None and not _is_euclidean(manifold):
                expected = {"exp_avg": tuple(p.shape), "exp_avg_sq": (), "max_exp_avg_sq": ()}
            else:
                shape = tuple(p.shape)
                expected = {"exp_avg": shape, "exp_avg_sq": shape, "max_exp_avg_sq": shape}
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
            if missing:
                raise ValueError(f"the state of {where} has no {', '.join(missing)}; {fix}")
            for key, shape in expected.items():
                buf = st.get(key)
                if buf is None:
                    continue
                if not isinstance(buf, torch.Tensor):
                    raise ValueError(f"the {key} of {where} is not a tensor; {fix}")
                if tuple(buf.shape) != shape:
                    raise ValueError(
                        f"the {key} of {where} has shape {tuple(buf.shape)}, FGAdam expects "
                        f"{shape} (moment={moment!r}); {fix}"
                    )


def _is_euclidean(manifold: Any) -> bool:
    import geoopt

    return isinstance(manifold, geoopt.Euclidean)
