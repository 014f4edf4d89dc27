"""How fast can the hidden-state policies' dot products be, with their arithmetic unchanged?

trajectory and gate-lookahead score E = 8 experts per token and layer with E dot products of length
D, each summed in float64 in d order (tracekit.policies.base.dot_in_d_order), so that the
pure-Python reference, replay and live agree bit for bit. This times, per set of E dot products:
  dot_in_d_order   the library's loop (e innermost, d unrolled by 4; numba's loop vectorizer
                   vectorizes it over e, with the sums going through memory every 4 terms)
  registers (E=8)  the same sums in the same order with 8 scalar accumulators held in registers
                   (tracekit.policies.base.dot8_in_d_order; trajectory uses it when E = 8)
each in a process with numba's default settings and in one with NUMBA_SLP_VECTORIZE=1 (LLVM's SLP
vectorizer, which numba leaves off by default since numba PR #8852 because of miscompilations). It
checks that both loops give bit-identical sums.

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

    from tracekit.policies.base import dot8_in_d_order as dot8
    from tracekit.policies.base import dot_in_d_order

    def timing_loop(dot):
        @njit
        def loop(M, H, acc, reps):
            s = 0.0
            for r in range(reps):
                s += dot(M, H[r % H.shape[0]], acc)
            return s
        return loop

    loop_lib, loop_reg = timing_loop(dot_in_d_order), timing_loop(dot8)

    slp = os.environ.get("NUMBA_SLP_VECTORIZE", "0")
    for D in dims:
        rng = np.random.default_rng(0)
        M = rng.standard_normal((D, 8))
        H = rng.standard_normal((16, D)).astype(np.float32)
        a, b = np.zeros(8), np.zeros(8)
        same = all(dot_in_d_order(M, H[i], a) == dot8(M, H[i], b) and np.array_equal(a, b) for i in range(16))
        reps = max(1000, 20_000_000 // D)
        for name, fn, acc in (("dot_in_d_order", loop_lib, a), ("registers (E=8)", loop_reg, b)):
            fn(M, H, acc, 10)
            best = min(_timed(fn, M, H, acc, reps) for _ in range(5))
            print(f"| {D} | {name} | {slp} | {best / reps * 1e9:,.0f} | {'yes' if same else 'NO'} |", flush=True)


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
    print("| D | loop | SLP | ns per 8 dot products | bit-identical |\n|---|---|---|---|---|", flush=True)
    for slp in ("0", "1"):
        env = dict(os.environ, NUMBA_SLP_VECTORIZE=slp)
        subprocess.run([sys.executable, __file__, "--dims", a.dims, "--child"], env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
