"""Bit tricks for the numba replay loops and policies."""

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def lowest_bit(typingctx, m):
    """Index of the lowest set bit of a uint64 m != 0 (LLVM's cttz: one instruction on x86-64)."""
    if m != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.cttz", [i64], ir.FunctionType(i64, [i64, ir.IntType(1)]))
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.uint64(types.uint64), codegen


@njit(cache=True, inline="always")
def bit(i):
    """The uint64 mask with only bit i set (0 <= i < 64)."""
    return np.uint64(1) << np.uint64(i)
