"""Host DRAM read bandwidth against the CPU expert FFN time (issue 5: is 8.7 ms per expert-token the
host's memory wall?). Runs on any machine; on the GPU host it pins the weights like the live store.

  python3 bench/host_read_bandwidth.py [--threads 16,8,4] [--pin] [--tokens 1,2,4] [--copies 4]

For each thread count: GB/s of a full read of one expert's bf16 weights (sum over 352 MB), and the
time of one expert's FFN for `--tokens` tokens (default 1) three ways: torch's matmuls on
transformers' layout (gate_up [2F, H], down [H, F]), and the CPU worker's two kernels on the live
layout [F, 3, H] (tracekit/live/host_ffn.py: `torch` and the one-pass numba `fused`, which hands
more than FUSED_MAX_TOKENS tokens to torch's matmuls, as the CPU worker does), and the model-driven
kernel on transformers' layout (`ffn_fused_hf`, up to FUSED_MAX_TOKENS tokens). Prints one line
per thread count and a JSON summary on the last line. Times are medians of 9 calls, each on the next
of `--copies` copies of the weights, so that no call reads from the CPU's caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def median_ms(fn, reps: int = 9) -> float:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


def numba_read(B: int):
    """A numba read probe with the fused kernel's access pattern: B threads each stream a contiguous
    block of rows of the live layout [F, 3, H] (bf16 bits -> float32, summed); no FFN arithmetic."""
    import numpy as np
    from numba import njit, prange

    from tracekit.live.host_ffn import _bits_to_f32

    @njit(parallel=True, nogil=True, fastmath={"reassoc", "contract"})
    def probe(w, part):
        F, H = w.shape[0], w.shape[2]
        for b in prange(B):
            s = np.float32(0.0)
            for f in range(b * F // B, (b + 1) * F // B):
                for j in range(3):
                    for h in range(H):
                        s += _bits_to_f32(w[f, j, h])
            part[b] = s

    part = np.zeros(B, np.float32)
    return lambda w: probe(w, part)


class Rotate:
    """Each call uses the next of `k` copies of the weights, so no call finds its weights in the CPU's
    caches (the last-level cache can hold a good part of one 352 MB expert)."""

    def __init__(self, k: int):
        self.k, self.i = k, 0

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.k
        return self.i


def main() -> int:
    import torch
    import torch.nn.functional as Fn

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="16,8,4")
    ap.add_argument("--pin", action="store_true", help="pinned host memory (needs CUDA)")
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--F", type=int, default=14336)
    ap.add_argument("--tokens", default="1", help="token counts for the live-layout kernels, e.g. 1,4,8")
    ap.add_argument("--copies", type=int, default=4, help="weight copies used in turn (defeats the caches)")
    a = ap.parse_args()
    import numba
    import numpy as np

    from tracekit.live.host_ffn import FUSED_MAX_TOKENS, HostFFN, ffn_fused_hf

    def bits(t):
        return t.view(torch.int16).numpy().view(np.uint16)

    H, F = a.H, a.F
    GU, DN, WL = [], [], []
    for _ in range(a.copies):
        gu = torch.randn(2 * F, H, dtype=torch.bfloat16)
        dn = torch.randn(H, F, dtype=torch.bfloat16)
        wl = torch.empty(F, 3, H, dtype=torch.bfloat16)        # the live layout of the same weights
        wl[:, 0], wl[:, 1], wl[:, 2] = gu[:F], gu[F:], dn.t()
        if a.pin:
            gu, dn, wl = gu.pin_memory(), dn.pin_memory(), wl.pin_memory()
        GU.append(gu), DN.append(dn), WL.append(wl)
    nxt = Rotate(a.copies)
    x = torch.randn(1, H, dtype=torch.bfloat16)
    nbytes = (GU[0].numel() + DN[0].numel()) * 2
    out = {"expert_MB": nbytes / 1e6, "pinned": a.pin, "copies": a.copies, "numba_threading_layer": None,
           "timing": "median of 9 calls, each on the next weight copy", "rows": []}
    toks = [int(t) for t in a.tokens.split(",") if t]
    xs = torch.randn(max(toks), H, dtype=torch.bfloat16)
    ys = torch.empty(max(toks), H, dtype=torch.bfloat16)

    def ffn():
        i = nxt()
        g, u = Fn.linear(x, GU[i]).chunk(2, dim=-1)
        return Fn.linear(Fn.silu(g) * u, DN[i])

    def read():        # the same bytes as float32 (a vectorized reduction: a read-bandwidth probe)
        i = nxt()
        return GU[i].view(torch.float32).sum() + DN[i].view(torch.float32).sum()

    with torch.no_grad():
        for n in [int(t) for t in a.threads.split(",") if t]:
            torch.set_num_threads(n)
            r_ms, f_ms = median_ms(read), median_ms(ffn)
            row = {"threads": n, "read_GBps": nbytes / r_ms / 1e6, "read_ms": r_ms, "ffn_ms": f_ms,
                   "ffn_GBps": nbytes / f_ms / 1e6}
            numba.set_num_threads(n)
            probe = numba_read(n)
            p_ms = median_ms(lambda: probe(WL[nxt()].view(torch.int16).numpy().view("uint16")))
            row["numba_read_GBps"], row["numba_read_ms"] = nbytes / p_ms / 1e6, p_ms
            for kernel in ("torch", "fused"):
                k = HostFFN(H, n, kernel)
                for t in toks:
                    row[f"{kernel}_live_ms_{t}tok"] = median_ms(lambda: k(xs[:t], WL[nxt()], ys[:t]))
            scratch = np.zeros((FUSED_MAX_TOKENS, F), np.float32)
            for t in [t for t in toks if t <= FUSED_MAX_TOKENS]:       # model-driven: transformers' layout
                xf = xs[:t].float().numpy()

                def hf(t=t, xf=xf):
                    i = nxt()
                    ffn_fused_hf(xf, bits(GU[i]), bits(DN[i]), 0, scratch[:t], bits(ys[:t]))
                row[f"fused_hf_ms_{t}tok"] = median_ms(hf)
            out["numba_threading_layer"] = numba.threading_layer()
            out["rows"].append(row)
            live = ", ".join(f"{k.replace('_live_ms_', ' ')} {v:.2f} ms" for k, v in row.items() if "_live_ms_" in k)
            live += "; transformers' layout: " + ", ".join(f"fused {k[12:]} {v:.2f} ms" for k, v in row.items()
                                                         if k.startswith("fused_hf_ms_"))
            print(f"threads {n:2d}: read {row['read_GBps']:6.1f} GB/s ({r_ms:.2f} ms; numba, live layout: "
                  f"{row['numba_read_GBps']:.1f} GB/s), expert FFN 1 token "
                  f"{f_ms:.2f} ms ({row['ffn_GBps']:.1f} GB/s of weights); live layout: {live}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
