"""Launching the Triton kernels over a flat plan: per bucket and manifold kind, the rows of that
kind (built once, kept with the plan), two kernels; torch ops only to concatenate the weights
and gradients, zero the POM sums, count the skipped POMs and copy the weights back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import torch_step
from .._flat_plan import Bucket, FlatPlan
from .._records import Hyper, Layer
from .._state import Workspace
from . import _kernels as k
from ._env import interpreting

__all__ = ["launch", "triton_step"]

_KINDS = {"sp": 0, "ob": 1, "st": 2, "eu": 3}
_F32 = torch.finfo(torch.float32)
TINY, REL = _F32.tiny, 16.0 * _F32.eps


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Every kernel launch of the backend goes through here (the tests count them)."""
    kernel[grid](*args, **kwargs)


@dataclass
class _Rows:
    """The rows of one manifold kind in one bucket (``rows`` are bucket-local)."""

    kind: int
    rows: torch.Tensor  # int32
    count: int


@dataclass
class _BucketPlan:
    kinds: list[_Rows]
    pom: torch.Tensor  # global POM of every kernel (int64)
    start: torch.Tensor | None = None  # column buckets: first entry of every kernel (int64)
    length: torch.Tensor | None = None  # and its length (int32)
    dot: torch.Tensor | None = None  # <x, g> of every kernel, from pass 1 to pass 2
    heads: torch.Tensor | None = None  # the first sub-row of every kernel (int64)


def _bucket_plan(bucket: Bucket) -> _BucketPlan:
    m, device = bucket.masks, bucket.pom.device
    if bucket.kind == "matrix":
        kinds = {name: m[name].view(-1) for name in ("sp", "ob", "st", "eu")}
        pom = bucket.pom
        extra = {}
    else:
        st, con = m["st"], m["con"]
        kinds = {"sp": con & ~st, "st": st, "eu": ~con}  # a column: sphere = oblique
        heads = torch.nonzero(m["head"].view(-1)).view(-1)
        pom = bucket.pom.index_select(0, heads)
        lengths = torch.tensor([shape.numel() // n for n, shape in bucket.layers])
        per_row = torch.repeat_interleave(lengths, torch.tensor([n for n, _ in bucket.layers]))
        start = torch.zeros_like(per_row)
        start[1:] = per_row.cumsum(0)[:-1]
        extra = {
            "start": start.to(device),
            "length": per_row.to(device=device, dtype=torch.int32),
            "dot": torch.empty(bucket.rows, dtype=torch.float32, device=device),
            "heads": heads,
        }
    rows = []
    for name, mask in kinds.items():
        idx = torch.nonzero(mask).view(-1)
        if idx.numel():
            rows.append(_Rows(_KINDS[name], idx.to(torch.int32), int(idx.numel())))
    return _BucketPlan(rows, pom, **extra)


def _plans(plan: FlatPlan) -> list[_BucketPlan]:
    for bucket in plan.buckets:
        if "triton" not in bucket.cache:
            bucket.cache["triton"] = _bucket_plan(bucket)
    return [bucket.cache["triton"] for bucket in plan.buckets]


def _row_coefficients(plan: FlatPlan, ordered, hyper: Hyper, bplans) -> list:
    """Per bucket: ``None`` (first step everywhere), a number, or a float32 per-kernel tensor
    (the factor of ``r`` in the momentum update; see ``torch_step._coefficients``)."""
    coefs = torch_step._coefficients(plan, ordered, hyper)
    out = []
    for bucket, bp, coef in zip(plan.buckets, bplans, coefs, strict=True):
        if isinstance(coef, torch.Tensor):
            if bucket.kind == "column" and bucket.sub_row is not None:
                coef = coef.view(-1).index_select(0, bp.heads)
            coef = coef.reshape(-1).to(torch.float32)
        out.append(coef)
    return out


def _block_rows(bucket: Bucket) -> int:
    a, b = bucket.shape
    ap, bp = triton_next_pow2(max(a, b)), triton_next_pow2(min(a, b))
    budget = 1 << 16 if interpreting() else 1 << 12  # elements of the largest temporary
    return max(1, budget // (ap * bp * bp))


def triton_next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def triton_step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> torch.Tensor | None:
    """The step of ``layers`` (one device and dtype, all accepted)."""
    plan, ordered, x, g = torch_step.prepare(layers, hyper, workspace)
    bplans = _plans(plan)
    pom_sq = torch.zeros(plan.num_poms, dtype=torch.float64, device=plan.device)
    sign = -1.0 if hyper.maximize else 1.0
    momentum = hyper.momentum != 0
    coefs = _row_coefficients(plan, ordered, hyper, bplans) if momentum else [None] * len(bplans)
    lr_tensor = isinstance(hyper.lr, torch.Tensor)
    common = {
        "sign": sign,
        "wd": float(hyper.weight_decay),
        "STORED": hyper.metric == "stored",
    }
    for bucket, bp in zip(plan.buckets, bplans, strict=True):
        span = slice(bucket.start, bucket.stop)
        xs, gs = x[span], g[span]
        scale = bucket.scale.view(-1) if bucket.scale is not None else xs
        for rows in bp.kinds:
            if bucket.kind == "matrix":
                launch(k.matrix_pass1, (triton_cdiv(rows.count, _block_rows(bucket)),),
                       xs, gs, scale, rows.rows, bp.pom, pom_sq, rows.count,
                       KIND=rows.kind, HAS_SCALE=bucket.scale is not None,
                       BLOCK_R=_block_rows(bucket), **_shape(bucket), **common)  # fmt: skip
            else:
                launch(k.column_pass1, (rows.count,), xs, gs, scale, bp.start, bp.length,
                       rows.rows, bp.pom, pom_sq, bp.dot, KIND=rows.kind,
                       HAS_SCALE=bucket.scale is not None and rows.kind != 3,
                       BLOCK=_column_block(), **common)  # fmt: skip
    lr = 0.0 if lr_tensor else float(hyper.lr)
    lr_ptr = hyper.lr if lr_tensor else pom_sq
    for bucket, bp, coef in zip(plan.buckets, bplans, coefs, strict=True):
        span = slice(bucket.start, bucket.stop)
        xs, gs = x[span], g[span]
        scale = bucket.scale.view(-1) if bucket.scale is not None else xs
        buf = plan.buffer[span] if momentum else xs
        step_args = {
            "ADAPTIVE": hyper.adaptive,
            "HAS_MOMENTUM": momentum,
            "FIRST": momentum and coef is None,
            "ROW_COEF": isinstance(coef, torch.Tensor),
            "NESTEROV": hyper.nesterov,
            "LR_TENSOR": lr_tensor,
        }
        coef_ptr = coef if isinstance(coef, torch.Tensor) else pom_sq
        coef_val = coef if isinstance(coef, float) else 1.0
        for rows in bp.kinds:
            if bucket.kind == "matrix":
                launch(k.matrix_pass2, (triton_cdiv(rows.count, _block_rows(bucket)),),
                       xs, gs, scale, buf, coef_ptr, lr_ptr, rows.rows, bp.pom, pom_sq,
                       rows.count, lr=lr, momentum=float(hyper.momentum), coef=coef_val,
                       KIND=rows.kind, HAS_SCALE=bucket.scale is not None, TINY=TINY, REL=REL,
                       BLOCK_R=_block_rows(bucket), **_shape(bucket, rows.kind), **step_args,
                       **common)  # fmt: skip
            elif rows.kind == 3:
                launch(k.euclid_column_pass2, (rows.count,), xs, gs, buf, coef_ptr, lr_ptr,
                       bp.start, bp.length, rows.rows, bp.pom, pom_sq, lr=lr,
                       momentum=float(hyper.momentum), coef=coef_val, BLOCK=_column_block(),
                       sign=sign, wd=common["wd"], **step_args)  # fmt: skip
            else:
                launch(k.column_pass2, (rows.count,), xs, gs, scale, buf, coef_ptr, lr_ptr,
                       bp.start, bp.length, rows.rows, bp.pom, pom_sq, bp.dot, lr=lr,
                       momentum=float(hyper.momentum), coef=coef_val, KIND=rows.kind,
                       HAS_SCALE=bucket.scale is not None, TINY=TINY, REL=REL,
                       BLOCK=_column_block(), **step_args, **common)  # fmt: skip
    sources = [
        v.view(layer.param.shape) for v, layer in zip(x.split(plan.sizes), ordered, strict=True)
    ]
    torch._foreach_copy_([layer.param for layer in ordered], sources)
    if not hyper.check:
        return None
    return pom_sq.isfinite().logical_not().sum()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _column_block() -> int:
    return 1024 if interpreting() else 256


def _shape(bucket: Bucket, kind: int | None = None) -> dict:
    a, b = bucket.shape
    tall, short = max(a, b), min(a, b)
    extra = {} if kind is None else {"UNIT": (a * b if kind == 0 else tall) ** -0.5}
    return {
        **extra,
        "A": tall,
        "B": short,
        "AP": triton_next_pow2(tall),
        "BP": triton_next_pow2(short),
        "SA": b if a >= b else 1,  # strides of the tall view in the stored (a, b) kernel
        "SB": 1 if a >= b else b,
    }
