"""The fused step of 16 3x3 kernels at a time, in vector registers.

``_tiles3x3`` steps a tile of kernels through entry-major buffers: the kernels are transposed
into them, two loops over the lanes compute, and the results are transposed back. Every one of
those passes goes through memory. Here a group of 16 kernels goes from the stored weights,
gradients and momentum to the stored results in one straight piece of code: the kernels are
transposed into nine vectors of 16 lanes (``_lanes.load_kernels``), the whole step happens in
registers, and the results are transposed back on the way out (what it buys:
docs/performance.md).

The arithmetic is not written twice: the lane helpers of ``_maths3x3`` (the normal part, the
Riemannian gradient, Eq. (7) for one-kernel POMs, the momentum step, the retraction, the
transport) are evaluated here on ``_Vec`` values, whose operators emit LLVM instructions on 16
lanes. The helpers take their branches through ``_where`` / ``_and`` / ``_not``, which become
selects and mask operations on vectors.

A group whose step is not plain (a degenerate retraction, a skipped POM or kernel) stores
nothing; ``_tiles3x3`` redoes it with the tile code, which handles those cases. Steps without
momentum, leftover kernels and scaled groups that straddle two rows take the tile code too.
"""

from __future__ import annotations

import types as pytypes

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from . import _maths3x3
from ._flags import (
    _A_B,
    _A_R,
    _C_NEW,
    _C_OLD,
    _EPS16SQ,
    _HALF,
    _LR,
    _ONE,
    _SIGN,
    _TINY2,
    _TWO,
    _WD,
    _ZERO,
    EUCLIDEAN,
    FLAG_ADAPTIVE,
    FLAG_CHECK,
    FLAG_OWN,
    FLAG_SCALED,
)
from ._lanes import GROUP, load_kernels, store_kernels

__all__ = ["step16"]

_I1, _I8, _I16, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(64)
_CONTRACT = ("contract",)  # let products and sums fuse, as the tile code's ``fastmath`` does


class _Vec:
    """16 lanes of a value during code generation (float, int8 codes or a mask)."""

    __slots__ = ("b", "v")
    __hash__ = None

    def __init__(self, builder, value):
        self.b, self.v = builder, value

    @property
    def _is_float(self):
        return isinstance(self.v.type.element, (ir.FloatType, ir.DoubleType))

    def _operand(self, other):
        if isinstance(other, _Vec):
            return other.v
        return ir.Constant(self.v.type, [ir.Constant(self.v.type.element, other)] * GROUP)

    def _arith(self, name, other, swap=False):
        a, b = self.v, self._operand(other)
        if swap:
            a, b = b, a
        return _Vec(self.b, getattr(self.b, name)(a, b, flags=_CONTRACT))

    def __add__(self, other):
        return self._arith("fadd", other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._arith("fsub", other)

    def __rsub__(self, other):
        return self._arith("fsub", other, swap=True)

    def __mul__(self, other):
        return self._arith("fmul", other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._arith("fdiv", other)

    def __rtruediv__(self, other):
        return self._arith("fdiv", other, swap=True)

    def __neg__(self):
        return _Vec(self.b, self.b.fneg(self.v, flags=_CONTRACT))

    def _compare(self, op, other):
        if self._is_float:
            return _Vec(self.b, self.b.fcmp_ordered(op, self.v, self._operand(other)))
        return _Vec(self.b, self.b.icmp_signed(op, self.v, self._operand(other)))

    def __gt__(self, other):
        return self._compare(">", other)

    def __lt__(self, other):
        return self._compare("<", other)

    def __eq__(self, other):
        return self._compare("==", other)

    def __bool__(self):
        raise TypeError("a lane value was used as a Python condition: use _where/_and/_not")


def _call(builder, name, value, fastmath=()):
    fnty = ir.FunctionType(value.type, [value.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, [value], fastmath=fastmath)


def _intrinsic_name(base, vty):
    kind = "f32" if isinstance(vty.element, ir.FloatType) else "f64"
    return f"llvm.{base}.v{GROUP}{kind}"


class _VecNumpy:
    """What the lane helpers use of numpy, on ``_Vec`` values."""

    @staticmethod
    def sqrt(a):
        return _Vec(a.b, _call(a.b, _intrinsic_name("sqrt", a.v.type), a.v))

    @staticmethod
    def isfinite(a):
        inf = ir.Constant(a.v.type, [ir.Constant(a.v.type.element, float("inf"))] * GROUP)
        magnitude = _call(a.b, _intrinsic_name("fabs", a.v.type), a.v)
        return _Vec(a.b, a.b.fcmp_ordered("<", magnitude, inf))  # false for inf and NaN


# float32 lanes: LLVM may use the target's estimates (reciprocal square root, reciprocal)
# refined by a Newton step for these forms; within a few units in the last place
_FAST = ("afn", "arcp", "contract", "nnan", "ninf", "nsz")


def _fast32(v):
    return isinstance(v.v.type.element, ir.FloatType)


def _vsqrt(v):
    fast = _FAST if _fast32(v) else ()
    return _Vec(v.b, _call(v.b, _intrinsic_name("sqrt", v.v.type), v.v, fast))


def _vrecip(one, v):
    if not _fast32(v):
        return one / v
    return _Vec(v.b, v.b.fdiv(one.v, v.v, flags=_FAST))


def _vrsqrt(one, v):
    return _vrecip(one, _vsqrt(v))


def _vmax(a, b):
    fnty = ir.FunctionType(a.v.type, [a.v.type, a.v.type])
    fn = cgutils.get_or_insert_function(a.b.module, fnty, _intrinsic_name("maxnum", a.v.type))
    return _Vec(a.b, a.b.call(fn, [a.v, a._operand(b)]))


def _vwhere(c, a, b):
    return _Vec(c.b, c.b.select(c.v, a.v, b.v))


def _vand(a, b):
    return _Vec(a.b, a.b.and_(a.v, b.v))


def _vnot(a):
    return _Vec(a.b, a.b.not_(a.v))


_HELPERS: dict = {}


def _helpers() -> dict:
    """The lane helpers of ``_maths3x3`` rebound to work on ``_Vec`` values (built once)."""
    if not _HELPERS:
        env = dict(vars(_maths3x3))
        for name, value in vars(_maths3x3).items():
            if isinstance(value, CPUDispatcher):
                fn = value.py_func
                env[name] = pytypes.FunctionType(
                    fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__
                )
        env.update(_where=_vwhere, _and=_vand, _not=_vnot, np=_VecNumpy, max=_vmax)
        env.update(_rsqrt=_vrsqrt, _sqrt=_vsqrt, _recip=_vrecip)
        _HELPERS.update(env)
    return _HELPERS


def _splat(builder, value, vty):
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), GROUP), [0] * GROUP)
    return builder.shuffle_vector(one, undef, zeros)


def _bit(builder, flags, bit):
    """Whether ``flags`` has ``bit`` (a scalar ``i1``)."""
    return builder.icmp_unsigned(
        "!=", builder.and_(flags, ir.Constant(_I64, bit)), ir.Constant(_I64, 0)
    )


def _flag(builder, flags, bit):
    """``_bit`` on all 16 lanes."""
    return _Vec(builder, _splat(builder, _bit(builder, flags, bit), ir.VectorType(_I1, GROUP)))


def _valid(x, g, m, s, kidx, bounds, fac, hp):
    arrays = (x, g, m, s, kidx, bounds, fac, hp)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
        return False
    dtype = x.dtype
    return (
        dtype in (types.float32, types.float64)
        and x.ndim == g.ndim == 2
        and all(a.dtype == dtype for a in (g, m, s, fac, hp))
        and kidx.dtype in (types.int8, types.uint16, types.int32)
        and bounds.dtype == types.int64
    )


def _codes(builder, kidx_ty, data, k, bounds_data):
    """The manifold codes of kernels ``[k, k + 16)``: how many of the three ``bounds`` their
    index reaches (``_plan.build_plan`` numbers POMs in the order of their codes)."""
    width = kidx_ty.dtype.bitwidth
    ity = ir.IntType(width)
    ptr = builder.bitcast(builder.gep(data, [k]), ir.VectorType(ity, GROUP).as_pointer())
    index = builder.load(ptr, align=1)
    wide = ir.VectorType(_I64, GROUP)
    extend = builder.sext if kidx_ty.dtype.signed else builder.zext
    index = extend(index, wide)
    code = ir.Constant(ir.VectorType(_I8, GROUP), [0] * GROUP)
    for i in range(3):
        bound = builder.load(builder.gep(bounds_data, [ir.Constant(_I64, i)]))
        reached = builder.icmp_signed(">=", index, _splat(builder, bound, wide))
        code = builder.add(code, builder.zext(reached, ir.VectorType(_I8, GROUP)))
    return code


@intrinsic
def step16(typingctx, x, g, m, s, k, kpr, mrow, stride, kidx, bounds, fac, hp, flags):
    """One momentum step of the 16 kernels ``[k, k + 16)`` of ``x`` (``(K, 9)``, with their
    gradients ``g``), in place; ``True`` if done, ``False`` if nothing was stored because the
    group needs the general code.

    ``s``: with ``FLAG_SCALED``, the scale of each kernel of a row of ``kpr`` kernels (the 16
    must lie in one row: ``k % kpr + 16 <= kpr``); the step works in unit coordinates, as
    the tile code does.
    ``m``: the flat tile-major momentum buffer, entry ``j`` of the 16 kernels at
    ``m[mrow + j * stride :][:16]``; ``kidx``: the plan's kernel indices, whose codes are
    ``(kidx >= bounds[0]) + (kidx >= bounds[1]) + (kidx >= bounds[2])``; ``fac``: the 16
    Eq. (7) factors (unused with ``FLAG_OWN``: then each kernel's own); ``hp``: the
    hyper-parameter array (``_flags``); ``flags``: ``_flags.FLAG_*`` bits
    (ownership, Eq. (7) and the checks are read). Contiguous arrays, one float dtype; no bounds
    are checked.
    """
    if not _valid(x, g, m, s, kidx, bounds, fac, hp):
        return None
    i = types.intp
    sig = types.boolean(x, g, m, s, i, i, i, i, kidx, bounds, fac, hp, i)

    def codegen(context, builder, signature, args):
        h = _helpers()
        x_ty, g_ty, m_ty, s_ty = signature.args[:4]
        kidx_ty, bounds_ty, fac_ty, hp_ty = signature.args[8:12]
        ax, ag, am, a_s, akidx, abounds, afac, ahp = (
            context.make_array(t)(context, builder, v)
            for t, v in zip(
                (x_ty, g_ty, m_ty, s_ty, kidx_ty, bounds_ty, fac_ty, hp_ty),
                (*args[0:4], *args[8:12]),
                strict=True,
            )
        )
        k, kpr, mrow, stride, flags = args[4], args[5], args[6], args[7], args[12]
        elem = context.get_value_type(x_ty.dtype)
        vty = ir.VectorType(elem, GROUP)

        def vec(value):
            return _Vec(builder, value)

        def hyper(index):
            value = builder.load(builder.gep(ahp.data, [ir.Constant(_I64, index)]))
            return vec(_splat(builder, value, vty))

        def vload(data, offset, ty):
            ptr = builder.bitcast(builder.gep(data, [offset]), ty.as_pointer())
            return builder.load(ptr, align=1)

        first = builder.mul(k, ir.Constant(_I64, 9))
        xv = [vec(v) for v in load_kernels(builder, ax.data, first, vty)]
        sign = hyper(_SIGN)
        gv = [vec(v) * sign for v in load_kernels(builder, ag.data, first, vty)]
        rows = [builder.add(mrow, builder.mul(ir.Constant(_I64, j), stride)) for j in range(9)]
        mv = [vec(vload(am.data, r, vty)) for r in rows]
        tp = vec(_codes(builder, kidx_ty, akidx.data, k, abounds.data))
        fac_in = vec(vload(afac.data, ir.Constant(_I64, 0), vty))
        zero, half, one, two = (hyper(i) for i in (_ZERO, _HALF, _ONE, _TWO))
        step = tuple(hyper(i) for i in (_LR, _C_OLD, _C_NEW, _A_R, _A_B))
        adaptive, check = (_flag(builder, flags, b) for b in (FLAG_ADAPTIVE, FLAG_CHECK))

        def when(bit, values, alternative):
            """``values()`` (a list of vectors) where ``flags`` has ``bit``, else
            ``alternative``: a branch on the flag, not a select per lane."""
            before = builder.basic_block
            with builder.if_then(_bit(builder, flags, bit)):
                done = [v.v for v in values()]
                block = builder.basic_block
            out = []
            for v, other in zip(done, alternative, strict=True):
                merged = builder.phi(v.type)
                merged.add_incoming(v, block)
                merged.add_incoming(other.v, before)
                out.append(vec(merged))
            return out

        # scales: unit coordinates, as the tile code (Euclidean kernels are not scaled)
        def unit_coordinates():
            sv = vec(vload(a_s.data, builder.srem(k, kpr), vty))
            s_eff = _vwhere(tp == EUCLIDEAN, one, sv)
            inv = h["_recip"](one, s_eff)
            return [s_eff] + [v * inv for v in xv] + [v * s_eff for v in gv]

        s_eff, *xg = when(FLAG_SCALED, unit_coordinates, [one, *xv, *gv])
        xv, gv = xg[:9], xg[9:]

        # the same helpers, in the same order, as the lane loops of ``_tiles3x3.pass2``, but
        # the retraction from the Gram matrix (``_retract_gram``: half the latency)
        r = h["_rgrad"](tp, zero, half, hyper(_WD), tuple(xv), tuple(gv))
        # the kernels' own Eq. (7) factors only where they are used (a square root and a
        # division on every lane otherwise)
        (factor,) = when(
            FLAG_OWN,
            lambda: [h["_own_factor"](h["_sqnorm"](r), adaptive, check, one, two)],
            [fac_in],
        )
        r = h["_scale9"](factor, r)
        y, b = h["_move"](tuple(xv), r, tuple(mv), step)
        xn, bad = h["_retract_gram"](tp, zero, one, 0.25, hyper(_TINY2), hyper(_EPS16SQ), y)
        bn = h["_transport"](tp, zero, half, xn, b)
        xn = when(FLAG_SCALED, lambda: [v * s_eff for v in xn], list(xn))

        general = builder.or_(bad.v, (factor < 0.0).v)  # degenerate or skipped lanes
        plain = builder.icmp_unsigned("==", builder.bitcast(general, _I16), ir.Constant(_I16, 0))
        with builder.if_then(plain, likely=True):
            store_kernels(builder, [v.v for v in xn], ax.data, first, vty)
            for v, row in zip(bn, rows, strict=True):
                ptr = builder.bitcast(builder.gep(am.data, [row]), vty.as_pointer())
                builder.store(v.v, ptr, align=1)
        return plain

    return sig, codegen
