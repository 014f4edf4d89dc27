"""Host DRAM read bandwidth against the CPU expert FFN time (issue 5: is 8.7 ms per expert-token the
host's memory wall?). Runs on any machine; on the GPU host it pins the weights like the live store.

  python3 bench/host_read_bandwidth.py [--threads 16,8,4] [--pin]

For each thread count: GB/s of a full read of one expert's bf16 weights (sum over 352 MB), and the
time of one expert's FFN for `--tokens` tokens (default 1) three ways: torch's matmuls on
transformers' layout (gate_up [2F, H], down [H, F]), and the CPU worker's two kernels on the live
layout [F, 3, H] (tracekit/live/host_ffn.py: `torch` and the one-pass numba `fused`). Prints one line
per thread count and a JSON summary on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def best_ms(fn, reps: int = 7) -> float:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t) * 1e3


def main() -> int:
    import torch
    import torch.nn.functional as Fn

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="16,8,4")
    ap.add_argument("--pin", action="store_true", help="pinned host memory (needs CUDA)")
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--F", type=int, default=14336)
    ap.add_argument("--tokens", default="1", help="token counts for the live-layout kernels, e.g. 1,4,8")
    a = ap.parse_args()
    import numba

    from tracekit.live.host_ffn import HostFFN

    H, F = a.H, a.F
    gu = torch.randn(2 * F, H, dtype=torch.bfloat16)
    dn = torch.randn(H, F, dtype=torch.bfloat16)
    wl = torch.empty(F, 3, H, dtype=torch.bfloat16)        # the live layout of the same weights
    wl[:, 0], wl[:, 1], wl[:, 2] = gu[:F], gu[F:], dn.t()
    if a.pin:
        gu, dn, wl = gu.pin_memory(), dn.pin_memory(), wl.pin_memory()
    x = torch.randn(1, H, dtype=torch.bfloat16)
    nbytes = (gu.numel() + dn.numel()) * 2
    out = {"expert_MB": nbytes / 1e6, "pinned": a.pin, "numba_threading_layer": None, "rows": []}
    toks = [int(t) for t in a.tokens.split(",") if t]
    xs = torch.randn(max(toks), H, dtype=torch.bfloat16)
    ys = torch.empty(max(toks), H, dtype=torch.bfloat16)

    def ffn():
        g, u = Fn.linear(x, gu).chunk(2, dim=-1)
        return Fn.linear(Fn.silu(g) * u, dn)

    def read():        # the same bytes as float32 (a vectorized reduction: a read-bandwidth probe)
        return gu.view(torch.float32).sum() + dn.view(torch.float32).sum()

    with torch.no_grad():
        for n in [int(t) for t in a.threads.split(",") if t]:
            torch.set_num_threads(n)
            r_ms, f_ms = best_ms(read), best_ms(ffn)
            row = {"threads": n, "read_GBps": nbytes / r_ms / 1e6, "read_ms": r_ms, "ffn_ms": f_ms,
                   "ffn_GBps": nbytes / f_ms / 1e6}
            for kernel in ("torch", "fused"):
                k = HostFFN(H, n, kernel)
                for t in toks:
                    row[f"{kernel}_live_ms_{t}tok"] = best_ms(lambda: k(xs[:t], wl, ys[:t]))
            out["numba_threading_layer"] = numba.threading_layer()
            out["rows"].append(row)
            live = ", ".join(f"{k.replace('_live_ms_', ' ')} {v:.2f} ms" for k, v in row.items() if "_live_ms_" in k)
            print(f"threads {n:2d}: read {row['read_GBps']:6.1f} GB/s ({r_ms:.2f} ms), expert FFN 1 token "
                  f"{f_ms:.2f} ms ({row['ffn_GBps']:.1f} GB/s of weights); live layout: {live}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
