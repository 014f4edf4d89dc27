"""Host-CPU expert FFN for a few tokens: one fused, memory-bound pass over the live layout (numba).

The hybrid's CPU miss is a matrix-vector product over 352 MB of bf16 weights, so its time is the
time to read them. torch's bf16 matmuls read the gate, up and down parts in three strided passes
(7.0 ms per expert-token on an H200 host's 15 threads; this kernel 3.8 ms; docs/results_live.md).
This kernel reads each expert ONCE, in store order: the live layout w [F, 3, H] keeps, for every
intermediate row f, the gate row, the up row and the down column side by side (24 KB at H = 4096),
so one thread streams a contiguous block of rows f0..f1:

  g[i] = bf16(sum_h x[i, h] * gate[f, h])          float32 sums, as the GPU's bf16 matmul
  u[i] = bf16(sum_h x[i, h] * up[f, h])
  a[i] = bf16(bf16(silu(g[i])) * u[i])              rounded where transformers' eager expert rounds
  part[block, i, :] += a[i] * down[f, :]            float32, one partial sum per block
  out[i, :] = bf16(sum over blocks of part[:, i, :])

bf16 is handled as its bits (uint16 -> float32 by a shift; float32 -> bf16 round to nearest even),
since numba has no bf16 type. The sums run in another order than the GPU's, so results differ from
it in the last bf16 bit at some outputs, as torch's own host matmuls do (tests/test_hybrid.py).
"""

from __future__ import annotations

import os

# The kernel's numba threads (OpenMP layer) must sleep when a job ends, not spin: spinning threads took
# the cores and memory bandwidth the main thread needs to keep the GPU fed (H200 host, lru C=2 --split:
# GPU idle waiting for the host 4.9-8.8 -> 3.1-3.8 ms per token, CPU job 4.9 -> 4.3 ms, same call;
# docs/results_live.md). libgomp reads it once, when it loads, and `import torch` loads it: so import
# this module before torch (the live CLI and bench/gpu_hybrid.py do; set after torch, it had no effect on
# the H200 host: 2 cores' worth of spinning either way). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Above this many tokens the host path uses torch's matmuls: the fused kernel converts each weight row
# once per token, and on the H200 host's Xeon (15 threads, weights not in cache) it took 3.8 / 5.4 /
# 8.6 ms for 1 / 2 / 4 tokens against torch's 7.0 / 6.5 / 6.8 ms (bench/host_read_bandwidth.py).
FUSED_MAX_TOKENS = 2


@intrinsic
def _bits_to_f32(typingctx, u):
    # bf16 bits (uint16) -> float32
    if not isinstance(u, types.Integer) or u.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        v = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(v, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _f32_to_u32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@intrinsic
def _u32_to_f32(typingctx, u):
    # the low 32 bits of an integer, as float32 bits
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif u.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@njit(cache=True, inline="always")
def _bf16_bits(x):
    # float32 -> bf16 bits, round to nearest even (finite inputs)
    b = _f32_to_u32(x)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, inline="always")
def _round_bf16(x):
    # float32 -> float32 holding the nearest bf16
    return _u32_to_f32(np.uint32(_bf16_bits(x)) << np.uint32(16))


@njit(cache=True, inline="always")
def _act_bf16(g, u):
    # bf16(bf16(silu(bf16(g))) * bf16(u)): rounded where transformers' eager expert rounds
    g = _round_bf16(g)
    s = _round_bf16(g / (np.float32(1.0) + np.exp(-g)))
    return _round_bf16(s * _round_bf16(u))


@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def ffn_fused(x, w, part, out):
    # x float32 [n, H]; w uint16 [F, 3, H] (bf16 bits; gate row, up row, down column per f);
    # part float32 [B, n, H] scratch, one block of rows per B; out uint16 [n, H] (bf16 bits)
    n, H = x.shape
    F = w.shape[0]
    B = part.shape[0]
    for b in prange(B):
        f0 = b * F // B
        f1 = (b + 1) * F // B
        p = part[b]
        for i in range(n):
            for h in range(H):
                p[i, h] = np.float32(0.0)
        for f in range(f0, f1):
            for i in range(n):
                g = np.float32(0.0)
                u = np.float32(0.0)
                for h in range(H):
                    g += x[i, h] * _bits_to_f32(w[f, 0, h])
                    u += x[i, h] * _bits_to_f32(w[f, 1, h])
                a = _act_bf16(g, u)
                if a != 0.0:
                    for h in range(H):
                        p[i, h] += a * _bits_to_f32(w[f, 2, h])
    for h in prange(H):
        for i in range(n):
            acc = np.float32(0.0)
            for b in range(B):
                acc += part[b, i, h]
            out[i, h] = _bf16_bits(acc)


@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def ffn_fused_hf(x, gu, dn, f0, a, out):
    # The same maths on transformers' layout (model-driven mode), intermediate rows f0..F only:
    # x float32 [n, H]; gu uint16 [2F, H] (gate rows, then up rows); dn uint16 [H, F]; a float32 [n, F]
    # scratch; out uint16 [n, H] (bf16 bits) = bf16(sum_{f >= f0} a[:, f] * dn[:, f]). Two passes: the
    # intermediate rows (parallel over f), then the down projection (parallel over h, contiguous in f).
    n, H = x.shape
    F = dn.shape[1]
    for f in prange(f0, F):
        for i in range(n):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for h in range(H):
                g += x[i, h] * _bits_to_f32(gu[f, h])
                u += x[i, h] * _bits_to_f32(gu[F + f, h])
            a[i, f] = _act_bf16(g, u)
    for h in prange(H):
        d = dn[h, f0:]                 # views from 0: a loop over range(f0, F) indexing dn[h, f] was not
        for i in range(n):             # vectorized (5x slower; likely numba's negative-index wrap-around)
            ai = a[i, f0:]
            acc = np.float32(0.0)
            for j in range(d.shape[0]):
                acc += ai[j] * _bits_to_f32(d[j])
            out[i, h] = _bf16_bits(acc)


def torch_ffn(x, w, out) -> None:
    """out[n, H] = FFN of expert w [F, 3, H] (live layout) on x [n, H], on the host with torch's bf16
    matmuls (no copies of w: the strided gate/up/down views go to the BLAS with their leading dimension)."""
    import torch
    import torch.nn.functional as Fn

    g = torch.mm(x, w[:, 0].t())
    u = torch.mm(x, w[:, 1].t())
    torch.mm(Fn.silu(g).mul_(u), w[:, 2], out=out)


KERNELS = ("fused", "torch")


class HostFFN:
    """out [n, H] (bf16 torch) = the FFN of expert w [F, 3, H] (bf16 torch, host) on x [n, H].
    kernel "fused": ffn_fused with `threads` numba threads for n <= FUSED_MAX_TOKENS, torch_ffn above;
    "torch": torch_ffn always. Build and call it from one thread (numba's thread count is per thread);
    building it compiles (or loads from numba's cache) the fused kernel."""

    def __init__(self, H: int, threads: int, kernel: str = "fused"):
        import numba

        if kernel not in KERNELS:
            from tracekit.errors import UserError

            raise UserError(f"CPU kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.max_fused = FUSED_MAX_TOKENS if kernel == "fused" else 0
        self.threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
        self.H = H
        self.part = np.zeros(self.threads * FUSED_MAX_TOKENS * H, dtype=np.float32)
        if self.max_fused:
            numba.set_num_threads(self.threads)
            ffn_fused(np.zeros((1, H), np.float32), np.zeros((1, 3, H), np.uint16), self._part(1),
                      np.zeros((1, H), np.uint16))

    def _part(self, n: int) -> np.ndarray:
        # C-contiguous [threads, n, H] (a slice [:, :n] of a [threads, 8, H] array is not, and numba then
        # does not vectorize the down projection's accumulation)
        return self.part[: self.threads * n * self.H].reshape(self.threads, n, self.H)

    def __call__(self, x, w, out) -> None:
        n = x.shape[0]
        if n > self.max_fused:
            torch_ffn(x, w, out)
            return
        import numba
        import torch

        numba.set_num_threads(self.threads)
        xf = x.to(torch.float32).numpy()
        wb = w.view(torch.int16).numpy().view(np.uint16)
        ob = out.view(torch.int16).numpy().view(np.uint16)
        ffn_fused(xf, wb, self._part(n), ob)
