"""How fast can the hidden-state policies' dot products be, with their arithmetic unchanged?

trajectory and gate-lookahead score E = 8 experts per token and layer with E dot products of length
D, each summed in float64 in d order (tracekit.policies.base.dot_in_d_order), so that the
pure-Python reference, replay and live agree bit for bit. This times, per set of E dot products,
with float64 (trajectory's centroids) and float32 (gate-lookahead's router) matrices:
  scalar loop      tracekit.policies.base.dot_in_d_order_scalar (e innermost, d unrolled by 4;
                   numba's loop vectorizer vectorizes it over e, the sums going through memory
                   every 4 terms), what both policies used before session 18
  registers        the same sums with 8 scalar accumulators held in registers (trajectory's loop
                   before session 18; defined here)
  vector lanes     tracekit.policies.base.dot_in_d_order at E = 8: the 8 sums as the lanes of one
                   LLVM vector (tracekit.policies.simd.lanes8_dot), what both policies use now
each in a process with numba's default settings and in one with NUMBA_SLP_VECTORIZE=1 (LLVM's SLP
vectorizer, which numba leaves off by default since numba PR #8852 because of miscompilations). It
checks that all three give bit-identical sums.

Usage: python bench/dot_products.py [--dims 64,4096]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def measure(dims: list[int]) -> None:
    import numpy as np
    from numba import njit

    from tracekit.policies.base import dot_in_d_order, dot_in_d_order_scalar

    @njit(inline="always")
    def registers(M, hid, acc):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        hh = 0.0
        for d in range(hid.shape[0]):
            h = hid[d]
            hh += h * h
            a0 += h * M[d, 0]
            a1 += h * M[d, 1]
            a2 += h * M[d, 2]
            a3 += h * M[d, 3]
            a4 += h * M[d, 4]
            a5 += h * M[d, 5]
            a6 += h * M[d, 6]
            a7 += h * M[d, 7]
        acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7] = a0, a1, a2, a3, a4, a5, a6, a7
        return hh

    def timing_loop(dot):
        @njit
        def loop(M, H, acc, reps):
            s = 0.0
            for r in range(reps):
                s += dot(M, H[r % H.shape[0]], acc)
            return s
        return loop

    loops = (("scalar loop", dot_in_d_order_scalar), ("registers", registers), ("vector lanes", dot_in_d_order))
    slp = os.environ.get("NUMBA_SLP_VECTORIZE", "0")
    for D in dims:
        for dtype in (np.float64, np.float32):
            rng = np.random.default_rng(0)
            M = rng.standard_normal((D, 8)).astype(dtype)
            H = rng.standard_normal((16, D)).astype(np.float32)
            sums = [[(float(dot(M, H[i], acc := np.zeros(8))), acc.tolist()) for i in range(16)]
                    for _, dot in loops]
            same = all(s == sums[0] for s in sums)
            reps = max(1000, 20_000_000 // D)
            for name, dot in loops:
                fn, acc = timing_loop(dot), np.zeros(8)
                fn(M, H, acc, 10)
                best = min(_timed(fn, M, H, acc, reps) for _ in range(5))
                print(f"| {D} | {np.dtype(dtype).name} | {name} | {slp} | {best / reps * 1e9:,.0f} | "
                      f"{'yes' if same else 'NO'} |", flush=True)


def _timed(fn, M, H, acc, reps) -> float:
    t = time.perf_counter()
    fn(M, H, acc, reps)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,4096")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    dims = [int(x) for x in a.dims.split(",")]
    if a.child:
        measure(dims)
        return 0
    print("| D | matrix | loop | SLP | ns per 8 dot products | bit-identical |\n|---|---|---|---|---|---|",
          flush=True)
    for slp in ("0", "1"):
        env = dict(os.environ, NUMBA_SLP_VECTORIZE=slp)
        subprocess.run([sys.executable, __file__, "--dims", a.dims, "--child"], env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
