"""Bytes held by an optimizer's state and by the kernel collections of its parameters.

Every tensor or array reachable from the state and the collections is reduced to the memory
range of its storage, and the union of the ranges is counted, so views and arrays sharing
memory with a tensor count once.
"""

from __future__ import annotations

import types
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
    elif isinstance(obj, torch.nn.Module) or _plain_object(obj):
        _spans(vars(obj), out, seen)  # modules, and the workspace's plans / per-layer objects


def _plain_object(obj: Any) -> bool:
    """An instance with attributes (a plan, a layer's arrays), not a module, class or callable."""
    return (
        hasattr(obj, "__dict__")
        and not isinstance(obj, (types.ModuleType, type))
        and not callable(obj)
    )


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
    """Bytes of every tensor or array a collection holds (index tensors, cached scales).

    Walks all attributes (``pom_type``, ``pom_ptr``, ``pom_kernels``, ``scale``, buffers);
    arrays that share memory (a ``.numpy()`` view of an index tensor) are counted once.
    """
    out: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), out, seen)
    return _union_bytes(out)


def collection_detail(colls: Iterable[KernelCollection], workspace: Any = None) -> dict[str, int]:
    """Bytes of :func:`collection_bytes` by attribute, and of the optimizer's workspace by
    entry (``workspace[cpu plan]``; summed over layers).

    An entry keyed by a tuple is reported under its first element. Memory shared between two
    entries is counted in both, so the parts may add up to more than the total.
    """
    detail: dict[str, int] = {}
    for coll in colls:
        parts = dict(vars(coll))
        entry = {} if workspace is None else workspace._entries.get(coll, {})
        for key, value in entry.items():
            if key != "scale":  # the collection's own scales, counted above
                parts[f"workspace[{key[0] if isinstance(key, tuple) else key}]"] = value
        for label, value in parts.items():
            spans: list[tuple[str, int, int]] = []
            _spans(value, spans, set())
            if spans:
                detail[label] = detail.get(label, 0) + _union_bytes(spans)
    return detail


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Bytes of the optimizer state (with its workspace of backend caches) plus those of its
    parameters' collections.

    Returns:
        ``state_bytes`` (every tensor in ``optimizer.state`` and the optimizer's workspace),
        ``collection_bytes`` (see :func:`collection_bytes`), ``total_bytes`` (their union) and
        ``collection_detail`` (see :func:`collection_detail`).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: list[tuple[str, int, int]] = []
    workspace = getattr(optimizer, "_workspace", None)
    seen_state: set[int] = set()
    _spans(dict(optimizer.state), state, seen_state)
    if workspace is not None:
        _spans(list(workspace._entries.values()), state, seen_state)
    colls = [c for _, c in kernel_collections(params)]
    index: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), index, seen)
    return {
        "state_bytes": _union_bytes(state),
        "collection_bytes": _union_bytes(index),
        "total_bytes": _union_bytes(state + index),
        "collection_detail": collection_detail(colls, workspace),
    }
