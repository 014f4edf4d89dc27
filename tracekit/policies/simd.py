"""Eight experts at once: float64 sums in d order as LLVM vectors, bit for bit the scalar sums.

trajectory and gate-lookahead keep per-layer matrices [D, E] (centroids, the transposed router)
and sum over d in d order, so that the pure-Python reference, replay and live agree bit for bit.
With E = 8 (Mixtral) a row M[d, e0:e0 + 8] is one <8 x double> (or <8 x float>): each lane runs its
own expert's sum in d order, with the same IEEE operations as the scalar loop (no reassociation, no
fused multiply-add), so the results are identical. numba leaves LLVM's SLP vectorizer off (it
miscompiled code), so a scalar loop stays scalar; this intrinsic writes the vector operations
directly, and LLVM lowers them to whatever the CPU has (SSE2, AVX2, AVX-512). Against the scalar
loop, at D = 64 and 4096: about 2x faster on an AMD EPYC (AVX2), 1.3x (float64) and 1.6x (float32) on
an Intel Xeon (AVX-512) (docs/benchmarks.md, session 18; `python bench/dot_products.py`).

  lanes8_dot(M, hid, acc, e0) -> hh     acc[e0 + i] = sum_d hid[d] * M[d, e0 + i]   (i < 8)
                                        hh = sum_d float64(hid[d] * hid[d])
      M [D, >= e0 + 8] C order, float64 or float32; hid float32[D]; acc float64[:].
      Products in numpy's types: float32 x float64 -> float64, float32 x float32 -> float32 (then
      widened); sums in float64 from 0.0.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_F64, _F32, _I32 = ir.DoubleType(), ir.FloatType(), ir.IntType(32)


def _is_array(t, ndim, dtypes, layout=None):
    return (isinstance(t, types.Array) and t.ndim == ndim and t.dtype in dtypes
            and (layout is None or t.layout == layout))


class _Arr:
    # an array argument inside codegen: pointer to element [idx...]
    def __init__(self, context, builder, ty, value):
        self.c, self.b, self.ty = context, builder, ty
        self.a = context.make_array(ty)(context, builder, value)
        self.shape = cgutils.unpack_tuple(builder, self.a.shape)
        self.strides = cgutils.unpack_tuple(builder, self.a.strides)

    def ptr(self, *idx):
        return cgutils.get_item_pointer2(self.c, self.b, self.a.data, self.shape, self.strides, self.ty.layout,
                                         list(idx))

    def const(self, i):
        return ir.Constant(self.shape[0].type, i)

    def load8(self, d, e0, vty):
        # M[d, e0:e0 + 8] as one vector (the row is contiguous: C order)
        align = 8 if vty.element == _F64 else 4
        return self.b.load(self.b.bitcast(self.ptr(d, e0), vty.as_pointer()), align=align)


def _broadcast(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _lanes(builder, arr, v, i0):
    # arr[i0 + i] = v[i] for i < 8
    for i in range(8):
        builder.store(builder.extract_element(v, ir.Constant(_I32, i)), arr.ptr(builder.add(i0, arr.const(i))))


@intrinsic
def lanes8_dot(typingctx, M, hid, acc, e0):
    if not (_is_array(M, 2, (types.float64, types.float32), "C") and _is_array(hid, 1, (types.float32,))
            and _is_array(acc, 1, (types.float64,)) and isinstance(e0, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        m, h, a = (_Arr(context, builder, t, v) for t, v in zip(sig.args[:3], args[:3]))
        first = context.cast(builder, args[3], sig.args[3], types.intp)
        f32m = sig.args[0].dtype == types.float32
        v8d, v8m = ir.VectorType(_F64, 8), ir.VectorType(_F32 if f32m else _F64, 8)
        accp = cgutils.alloca_once_value(builder, ir.Constant(v8d, None))      # zeros
        hhp = cgutils.alloca_once_value(builder, ir.Constant(_F64, 0.0))
        with cgutils.for_range(builder, h.shape[0]) as loop:
            d = loop.index
            hv = builder.load(h.ptr(d))                                         # float32
            builder.store(builder.fadd(builder.load(hhp), builder.fpext(builder.fmul(hv, hv), _F64)), hhp)
            hb = _broadcast(builder, hv if f32m else builder.fpext(hv, _F64), v8m)
            pr = builder.fmul(hb, m.load8(d, first, v8m))
            if f32m:
                pr = builder.fpext(pr, v8d)
            builder.store(builder.fadd(builder.load(accp), pr), accp)
        _lanes(builder, a, builder.load(accp), first)
        return builder.load(hhp)

    return types.float64(M, hid, acc, e0), codegen
