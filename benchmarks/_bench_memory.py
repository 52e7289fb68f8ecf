"""Bytes held by an optimizer's state and by the kernel collections of its parameters.

Every tensor or array reachable from the state and the collections is reduced to the memory
range of its storage, and the union of the ranges is counted, so views and arrays sharing
memory with a tensor count once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from benchmarks._bench_models import kernel_collections
from fgo_geoopt import KernelCollection

__all__ = ["collection_bytes", "collection_detail", "optimizer_state_bytes"]


def _spans(obj: Any, out: list[tuple[str, int, int]], seen: set[int]) -> None:
    """Memory ranges of every tensor / array reachable from ``obj`` (storages, not views).

    Ranges are tagged with their device: CPU and GPU addresses may coincide.
    """
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes():
            start = storage.data_ptr()
            out.append((str(obj.device), start, start + storage.nbytes()))
    elif isinstance(obj, np.ndarray):
        root = obj
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root.nbytes:
            start = root.__array_interface__["data"][0]
            out.append(("cpu", start, start + root.nbytes))
    elif isinstance(obj, dict):
        for value in obj.values():
            _spans(value, out, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _spans(value, out, seen)
    elif isinstance(obj, torch.nn.Module):
        _spans(vars(obj), out, seen)


def _union_bytes(spans: list[tuple[str, int, int]]) -> int:
    total, space, end = 0, None, -1
    for where, lo, hi in sorted(spans):
        if where != space:
            space, end = where, -1
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def collection_bytes(colls: Iterable[KernelCollection]) -> int:
    """Bytes of every tensor or array a collection holds (index tensors and ``_cache``).

    Walks all attributes (``pom_type``, ``pom_ptr``, ``pom_kernels``, ``scale``, buffers,
    ``_cache`` with whatever the optimizer backends cached there); arrays that share memory
    (a ``.numpy()`` view of an index tensor) are counted once.
    """
    out: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), out, seen)
    return _union_bytes(out)


def collection_detail(colls: Iterable[KernelCollection]) -> dict[str, int]:
    """Bytes of :func:`collection_bytes` by attribute and ``_cache`` entry (summed over layers).

    A cache entry keyed by a tuple is reported under its first element (``_cache[idx]``).
    Memory shared between two entries is counted in both, so the parts may add up to more
    than :func:`collection_bytes`.
    """
    detail: dict[str, int] = {}
    for coll in colls:
        parts = {k: v for k, v in vars(coll).items() if k != "_cache"}
        for key, value in coll._cache.items():
            parts[f"_cache[{key[0] if isinstance(key, tuple) else key}]"] = value
        for label, value in parts.items():
            spans: list[tuple[str, int, int]] = []
            _spans(value, spans, set())
            if spans:
                detail[label] = detail.get(label, 0) + _union_bytes(spans)
    return detail


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Bytes of the optimizer state plus those of its parameters' collections.

    Returns:
        ``state_bytes`` (every tensor in ``optimizer.state``), ``collection_bytes`` (see
        :func:`collection_bytes`), ``total_bytes`` (their union) and ``collection_detail``
        (see :func:`collection_detail`).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: list[tuple[str, int, int]] = []
    _spans(dict(optimizer.state), state, set())
    colls = [c for _, c in kernel_collections(params)]
    index: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), index, seen)
    return {
        "state_bytes": _union_bytes(state),
        "collection_bytes": _union_bytes(index),
        "total_bytes": _union_bytes(state + index),
        "collection_detail": collection_detail(colls),
    }
