"""2-D host->device copies (copier.memcpy2d_h2d, one cuMemcpy2DAsync) against a linear copy of the same bytes:
the column blocks [H, r] of a pinned [H, F] bf16 matrix (Mixtral's down projection, H = 4096, F = 14336), as
model-driven --split copies them. Run on the GPU machine: python3 bench/gpu_copy2d.py (prints ms and GB/s).
"""
import json

import torch

from tracekit.live.copier import memcpy2d_h2d

H, F = 4096, 14336
src = torch.randn(H, F).to(torch.bfloat16).pin_memory()
st = torch.cuda.Stream()
res = {}
for r in (1792, 3584, 7168, 10752):
    dst = torch.empty(H, r, device="cuda", dtype=torch.bfloat16)
    lin = torch.empty(H * r, device="cuda", dtype=torch.bfloat16)
    flat = src.view(-1)[: H * r]
    for name, fn in (("2d", lambda: memcpy2d_h2d(dst, src[:, :r], st)),
                     ("linear", lambda: lin.copy_(flat, non_blocking=True))):
        with torch.cuda.stream(st):
            fn()
            st.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(st)
            for _ in range(5):
                fn()
            b.record(st)
        b.synchronize()
        ms = a.elapsed_time(b) / 5
        res[f"{name}_{r}"] = (round(ms, 3), round(H * r * 2 / ms / 1e6, 1))
    print(r, res[f"2d_{r}"], res[f"linear_{r}"], flush=True)
print(json.dumps(res))
