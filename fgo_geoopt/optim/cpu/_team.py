"""Run the split phases of the fused step on torch's own OpenMP team.

After every parallel torch op, torch's OpenMP workers keep spinning on their cores for
milliseconds. Threads of our own would share those cores with them at half speed; the team's
threads are the spinning workers themselves, so a layer's update runs on all cores at once
(figures in docs/performance.md).

Where torch runs on GNU OpenMP from its own ``libgomp`` (Linux wheels), ``GOMP_parallel`` of
that library is called through ctypes with a numba ``cfunc`` that does thread ``t``'s share of a
phase. The work is described by int64 arrays, one per layer (``describe``, ``phase``); one team
call per kernel path and index type does a phase of all their layers. Float32 layers with one-
or two-byte kernel indices, the common case, have entry points (compiled on first use, cached
on disk); everything else keeps the Python thread pool of ``_schedule``.
``FGO_DISABLE_OMP_TEAM=1`` switches this off. ``load`` finds the runtime (``_schedule`` asks once
per process); where finding it, compiling an entry point or calling it fails, ``_schedule`` warns
once and runs on its thread pool. A descriptor's addresses point at arrays of the layer that
owns it; those of a step's arrays are set by ``refresh`` and dropped by ``clear`` after the step.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from . import _bounds3x3, _columns, _tiles3x3
from ._flags import FLAG_SCALED, TEAM_BOUNDS, TEAM_NORMS, TEAM_UPDATE, _jit

__all__ = [
    "BOUNDS",
    "KEYS",
    "NORMS",
    "UPDATE",
    "clear",
    "describe",
    "entry",
    "load",
    "phase",
    "refresh",
    "run",
]

BOUNDS, NORMS, UPDATE = TEAM_BOUNDS, TEAM_NORMS, TEAM_UPDATE
# int64 descriptor of one phase of one layer
(
    _KIND,
    _K,
    _N,
    _KPR,
    _FLAGS,
    _ALIGN,
    _X,
    _G,
    _M,
    _S,
    _LEN_S,
    _KIDX,
    _TCODE,
    _LEN_TCODE,
    _PFAC,
    _LEN_PFAC,
    _NEED,
    _LEN_NEED,
    _HP,
    _R2,
    _P,
    _OUT,
    _ROWS,
) = range(23)
DESC_LEN = 23

#: Int64 slots before the descriptors in a team call's table: the number of layers and the
#: addresses of torch's ``omp_get_thread_num`` / ``omp_get_num_threads`` (read at each call,
#: so nothing is bound process-wide and no address is kept between calls).
_HEAD = 3


@intrinsic
def _ptr(typingctx, address):
    """An int64 address as a ``void *`` (for ``carray``)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@intrinsic
def _call_int(typingctx, address):
    """Call the C function ``int f(void)`` at the int64 ``address``."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])

    return types.int32(address), codegen


@njit(**_jit)
def _share(d, tid, nth):
    k = d[_K]
    align = d[_ALIGN]
    k0 = min(k, k * tid // nth // align * align)
    k1 = k if tid + 1 >= nth else min(k, k * (tid + 1) // nth // align * align)
    return k0, k1


@njit(**_jit)
def _body(d, is3x3, x, g, m, s, s32, kidx, tcode, pfac, need, hp, tid, nth):
    """Thread ``tid``'s share of one phase of one layer. Scales: per kernel in float32
    (``s32``) on the 3x3 path, per entry in float64 (``s``) on the columns path."""
    flags = d[_FLAGS]
    scaled = flags & FLAG_SCALED != 0
    k0, k1 = _share(d, tid, nth)
    kpr, kind = d[_KPR], d[_KIND]
    if kind == UPDATE:
        if is3x3:
            skipped = _tiles3x3.pass2(x, g, m, s32, kpr, kidx, tcode, pfac, k0, k1, hp, flags)
        else:
            skipped = _columns.pass2(x, g, m, s, kpr, kidx, tcode, pfac, k0, k1, hp, flags)
        carray(_ptr(d[_OUT]), (d[_ROWS],), np.int64)[tid] = skipped
        return
    r2 = carray(_ptr(d[_R2]), (d[_ROWS], d[_P]), np.float64)[tid]
    if kind == BOUNDS and is3x3:
        _bounds3x3.bounds(x, g, s32, kpr, scaled, kidx, tcode, k0, k1, hp, r2)
    elif kind == BOUNDS:
        _columns.bounds(x, g, s, kpr, scaled, kidx, tcode, k0, k1, hp, r2)
    elif is3x3:
        _tiles3x3.pass1(x, g, s32, kpr, scaled, kidx, tcode, need, k0, k1, hp, r2)
    else:
        _columns.pass1(x, g, s, kpr, scaled, kidx, tcode, need, k0, k1, hp, r2)


@njit(**_jit)
def _arrays_f32(d):
    k, n = d[_K], d[_N]
    return (
        carray(_ptr(d[_X]), (k, n), np.float32),
        carray(_ptr(d[_G]), (k, n), np.float32),
        carray(_ptr(d[_M]), (k, n), np.float32),
        carray(_ptr(d[_S]), (d[_LEN_S],), np.float64),
        carray(_ptr(d[_S]), (d[_LEN_S],), np.float32),  # the same address: the 3x3 path's
        carray(_ptr(d[_TCODE]), (d[_LEN_TCODE],), np.int8),
        carray(_ptr(d[_PFAC]), (d[_LEN_PFAC],), np.float32),
        carray(_ptr(d[_NEED]), (d[_LEN_NEED],), np.uint8),
        carray(_ptr(d[_HP]), (15,), np.float32),
    )


@njit(**_jit)
def _layers(table, is3x3, kidx_type, tid, nth):
    """Thread ``tid`` of ``nth``: its share of every layer described in ``table``."""
    for i in range(table[0]):
        d = table[_HEAD + i * DESC_LEN : _HEAD + (i + 1) * DESC_LEN]
        x, g, m, s, s32, tcode, pfac, need, hp = _arrays_f32(d)
        kidx = carray(_ptr(d[_KIDX]), (d[_K],), kidx_type)
        _body(d, is3x3, x, g, m, s, s32, kidx, tcode, pfac, need, hp, tid, nth)


def _find_libgomp():
    """torch's own GNU OpenMP runtime, loaded already; ``None`` where the team does not apply
    (not Linux, switched off, torch not on OpenMP). Raises ``RuntimeError`` where torch runs on
    OpenMP but no such runtime with the entry points is loaded from torch's ``lib`` folder
    (another OpenMP runtime, a build that links it elsewhere)."""
    if sys.platform != "linux" or os.environ.get("FGO_DISABLE_OMP_TEAM", "0") == "1":
        return None
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libgomp*.so*"))):
        try:  # RTLD_NOLOAD: only a library that the process has loaded already
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        if all(hasattr(lib, n) for n in ("GOMP_parallel", *_OMP_NAMES)):
            return lib
    raise RuntimeError(f"torch runs on OpenMP, but no loaded libgomp in {libdir} provides it")


_OMP_NAMES = ("omp_get_thread_num", "omp_get_num_threads")
#: ``(path, kernel index dtype name)`` pairs with a team entry point (empty: no team here)
KEYS: frozenset[tuple[str, str]] = frozenset()
_ENTRIES: dict[tuple[str, str], int] = {}  # entry point addresses, compiled on first use
_GOMP: list = []  # torch's ``GOMP_parallel``, once ``load`` found it
# One entry point per (path, kernel index type), float32.
_SIG = types.void(types.voidptr)
_CF = {"nopython": True, "cache": True}


def load() -> bool:
    """Find torch's GNU OpenMP runtime and bind the names that the entry points call to it;
    whether the team runs here. Raises where it should but cannot (see ``_find_libgomp``)."""
    global KEYS
    lib = _find_libgomp()
    if lib is None:
        return False
    gomp_parallel = lib.GOMP_parallel
    gomp_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp_parallel.restype = None
    # the entry points call torch's runtime through these, passed with every call
    _GOMP[:] = [gomp_parallel, *(getattr(lib, name) for name in _OMP_NAMES)]
    KEYS = frozenset((path, kidx) for path in ("3x3", "columns") for kidx in ("uint16", "int8"))
    return True


def _entry(is3x3, kidx_type):
    """The team function for float32 layers of one path and kernel index type."""

    @cfunc(_SIG, **_CF)
    def entry(data):
        layers = carray(data, (1,), np.int64)[0]
        table = carray(data, (_HEAD + layers * DESC_LEN,), np.int64)
        _layers(table, is3x3, kidx_type, _call_int(table[1]), _call_int(table[2]))

    return entry


def entry(key: tuple[str, str]) -> int:
    """The address of the team function for ``key`` (one of ``KEYS``), compiled on first use:
    a fresh install spends seconds on each, so only the ones a model needs are built (numba
    caches them on disk for later processes)."""
    address = _ENTRIES.get(key)
    if address is None:
        path, kidx = key
        address = _ENTRIES[key] = _entry(path == "3x3", getattr(np, kidx)).address
    return address


def run(path: str, kidx_name: str, descs: list[np.ndarray], threads: int) -> None:
    """Run the phases described by ``descs`` (layers of one path and index type) on a team of
    ``threads`` threads: one team call for all of them. Blocks until done."""
    gomp_parallel, thread_num, num_threads = _GOMP
    head = [len(descs), *(ctypes.cast(f, ctypes.c_void_p).value for f in (thread_num, num_threads))]
    table = np.concatenate([np.array(head, np.int64), *descs])
    gomp_parallel(entry((path, kidx_name)), table.ctypes.data, threads, 0)


def describe(*, k, n, kpr, align, kidx, tcode, pfac, need, hp):
    """The int64 descriptor of a layer, its parts fixed for the layer's life (the arrays must
    outlive it); ``refresh`` sets the step's parts, ``phase`` the phase and outputs."""
    desc = np.zeros(DESC_LEN, np.int64)
    desc[[_K, _N, _KPR, _ALIGN]] = k, n, kpr, align
    desc[_KIDX], desc[_HP] = kidx.ctypes.data, hp.ctypes.data
    for slot, size, arr in (
        (_TCODE, _LEN_TCODE, tcode),
        (_PFAC, _LEN_PFAC, pfac),
        (_NEED, _LEN_NEED, need),
    ):
        desc[slot], desc[size] = arr.ctypes.data, arr.size
    return desc


def refresh(desc: np.ndarray, flags: int, x, g, m, s) -> None:
    """Update what may change between steps: the flags and the step's arrays."""
    desc[_FLAGS], desc[_X], desc[_G], desc[_M] = flags, x.ctypes.data, g.ctypes.data, m.ctypes.data
    desc[_S], desc[_LEN_S] = s.ctypes.data, s.size


def clear(desc: np.ndarray) -> None:
    """Forget the step's arrays (set by ``refresh``): no address of a freed array is kept."""
    desc[[_X, _G, _M, _S, _LEN_S]] = 0


def phase(
    desc: np.ndarray, kind: int, r2: np.ndarray, out: np.ndarray, flags: int = 0
) -> np.ndarray:
    """A copy of the layer descriptor ``desc`` for phase ``kind``: POM sums go to the rows of
    ``r2`` (one per thread), skipped counts to ``out`` (one per thread); ``flags`` are added
    to the step's."""
    d = desc.copy()
    d[_FLAGS] |= flags
    d[_KIND], d[_R2], d[_P], d[_ROWS], d[_OUT] = (
        kind,
        r2.ctypes.data,
        r2.shape[1],
        r2.shape[0],
        out.ctypes.data,
    )
    return d
