"""Count what a step dispatches: ATen ops (views excluded) and host reads of device data.

On an accelerator every ATen op is at least one kernel launch, and every host read of a
tensor's value (``.item()``, ``bool(t)``, ``nonzero``, ...) waits for the device to finish
all queued work. :class:`DispatchCounter` counts both for whatever runs under it, on any
device (on CPU the same code paths dispatch the same ops), and with ``forbid_sync=True`` raises
at the first host read, naming it: that is how the tests hold the flat steps to zero syncs.

.. code-block:: python

    with DispatchCounter() as counter:
        optimizer.step()
    print(counter.ops, counter.syncs, counter.by_name.most_common(5))
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["READS_HOST", "DispatchCounter", "HostSyncError"]

#: Ops that read device data on the host (or size their output by it).
READS_HOST = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "nonzero",
        "equal",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
    }
)


class HostSyncError(RuntimeError):
    """A forbidden host read of device data (``DispatchCounter(forbid_sync=True)``)."""


def _reads_host(func: Any, args: tuple, kwargs: dict) -> bool:
    name = func.overloadpacket.__name__
    if name in READS_HOST:
        return True
    if name == "repeat_interleave":  # tensor repeats size the output unless output_size does
        return func._overloadname != "self_int" and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):  # a boolean mask means a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in indices or ()
        )
    if name in ("_to_copy", "copy_"):  # device -> host copies
        src = args[1] if name == "copy_" else args[0]
        dst_cpu = (
            args[0].device.type == "cpu"
            if name == "copy_"
            else str(kwargs.get("device", src.device)).startswith("cpu")
        )
        return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu
    return False


class DispatchCounter(TorchDispatchMode):
    """Counts non-view ATen ops (``ops``, ``by_name``) and host reads (``syncs``,
    ``sync_names``) dispatched while active; ``forbid_sync=True`` raises
    :class:`HostSyncError` at the first host read instead."""

    def __init__(self, forbid_sync: bool = False):
        super().__init__()
        self.forbid_sync = forbid_sync
        self.ops = 0
        self.syncs = 0
        self.by_name: collections.Counter[str] = collections.Counter()
        self.sync_names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _reads_host(func, args, kwargs):
            if self.forbid_sync:
                raise HostSyncError(f"host read of device data: aten.{name}")
            self.syncs += 1
            self.sync_names[name] += 1
        if not func.is_view:
            self.ops += 1
            self.by_name[name] += 1
        return func(*args, **kwargs)
