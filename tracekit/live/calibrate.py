"""`tracekit live --calibrate`: measure this machine and write a hardware profile for replay.

Measures, with CUDA events (median of repeats, after warm-up):
  h2d_GBps          one whole expert copied from registered pinned memory (expert size)
  h2d_chunk_GBps    the same expert copied in chunks of 1/4/16/64 MB back to back
  copy_overhead_us  GPU time of one tiny (4 KB) copy; copy_enqueue_us: host time to enqueue one
  ffn_ms            one expert's FFN (live layout, unchunked) for 1..B tokens
  ffn_chunked_ms    the same FFN split into ~16 MB chunks (1 token)
  attn_ms, attn_ms_per_token   the non-expert stand-in per layer (QKV, O, router)
  cpu_ffn_ms, cpu_threads, act_copy_us, contention_copy, contention_cpu   the hybrid path
                    (tracekit/live/calib_cpu.py)
The JSON has the fields of tracekit/replay/profiles/h100-pcie5.json (extra keys are ignored by replay).
"""

from __future__ import annotations

import json
import statistics
import time

from tracekit.live.executor import MIXTRAL, Shapes
from tracekit.live.ffn import NonExpert, chunk_rows, ffn_rows


def _time(fn, reps: int, stream=None) -> float:
    """Median milliseconds of fn() over reps, with events on `stream` (default: current)."""
    import torch

    st = stream or torch.cuda.current_stream()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(st)
        fn()
        b.record(st)
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def calibrate(shapes: Shapes = MIXTRAL, batch: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256),
              chunk_mb: tuple = (1, 4, 16, 64), reps: int = 5, name: str = "calibrated", log=print,
              cpu: bool = True, cpu_threads: int | None = None, cpu_kernel: str = "fused") -> dict:
    import torch

    from tracekit.live.store import ExpertStore

    dev = torch.device("cuda")
    numel = shapes.numel
    nbytes = shapes.expert_bytes
    store = ExpertStore(1, 2, numel, pin=True)
    try:
        src = store.layers[0]                                     # [2, numel] pinned
        dst = torch.empty(numel, dtype=torch.bfloat16, device=dev)
        cs = torch.cuda.Stream()
        k = [0]

        def whole():
            with torch.cuda.stream(cs):
                dst.copy_(src[k[0] % 2], non_blocking=True)
            k[0] += 1

        _time(whole, 2, cs)
        t_whole = _time(whole, reps, cs)
        h2d = nbytes / (t_whole * 1e-3) / 1e9
        log(f"H2D whole expert ({nbytes / 1e6:.0f} MB): {t_whole:.2f} ms = {h2d:.1f} GB/s")
        chunk_bw = {}
        for mb in chunk_mb:
            step = max(1, int(mb * 1e6 // 2))

            def chunked():
                with torch.cuda.stream(cs):
                    s = src[k[0] % 2]
                    for a in range(0, numel, step):
                        dst[a:a + step].copy_(s[a:a + step], non_blocking=True)
                k[0] += 1

            _time(chunked, 1, cs)
            t = _time(chunked, reps, cs)
            chunk_bw[str(mb)] = round(nbytes / (t * 1e-3) / 1e9, 2)
            log(f"H2D in {mb} MB chunks: {t:.2f} ms = {chunk_bw[str(mb)]:.1f} GB/s")
        small = 2048
        n_small = 200

        def tiny():
            with torch.cuda.stream(cs):
                for i in range(n_small):
                    dst[:small].copy_(src[i % 2, :small], non_blocking=True)

        _time(tiny, 1, cs)
        t_tiny = _time(tiny, reps, cs) / n_small
        torch.cuda.synchronize()
        h0 = time.perf_counter()
        tiny()
        enq = (time.perf_counter() - h0) / n_small
        torch.cuda.synchronize()
        log(f"tiny copy: {t_tiny * 1e3:.2f} us GPU, {enq * 1e6:.2f} us to enqueue")
        dst = None  # free the GPU buffer
    finally:
        store.free()

    # FFN per expert (live layout), rotating among 4 resident experts
    g = torch.Generator(device=dev).manual_seed(3)
    w = (torch.randn(4, shapes.F, 3, shapes.H, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    x = torch.randn(max(batch), shapes.H, generator=g, device=dev).to(torch.bfloat16)
    y = torch.zeros_like(x)
    ffn = {}
    for n in batch:
        def one(n=n):
            ffn_rows(x[:n], w[k[0] % 4], y[:n], 0, shapes.F)
            k[0] += 1

        _time(one, 3)
        ffn[str(n)] = round(_time(one, max(reps, 10)), 4)
    log("FFN ms per expert: " + ", ".join(f"{n}: {v}" for n, v in ffn.items()))
    rows = chunk_rows(shapes.F, shapes.H, 16.0)

    def chunked_ffn():
        for f0, f1 in rows:
            ffn_rows(x[:1], w[k[0] % 4], y[:1], f0, f1)
        k[0] += 1

    _time(chunked_ffn, 3)
    t_cffn = _time(chunked_ffn, max(reps, 10))
    log(f"FFN chunked ({len(rows)} chunks of ~16 MB), 1 token: {t_cffn:.4f} ms")
    w = None  # free the experts
    ne = NonExpert(1, shapes.H, shapes.E, shapes.kvdim, dev)
    attn = {}
    for n in (1, 128):
        _time(lambda n=n: ne(0, x[:n]), 3)
        attn[n] = _time(lambda n=n: ne(0, x[:n]), max(reps, 10))
    per_tok = max(0.0, (attn[128] - attn[1]) / 127)
    log(f"attention stand-in per layer: {attn[1]:.4f} ms at 1 token, {attn[128]:.4f} ms at 128")
    torch.cuda.empty_cache()
    hyb = {}
    if cpu:
        from tracekit.live.calib_cpu import calibrate_cpu

        hyb = calibrate_cpu(shapes, reps=reps, log=log, threads=cpu_threads, kernel=cpu_kernel)
    return hyb | {
        "name": name,
        "card": torch.cuda.get_device_name(0),
        "source": f"tracekit live --calibrate (torch {torch.__version__}); attention = QKV/O/router stand-in "
                  f"of the live executor, no KV-cache attention" + ("" if cpu else "; cpu_ffn_ms not measured"),
        "h2d_GBps": round(h2d, 2),
        "copy_overhead_us": round(t_tiny * 1e3, 2),
        "expert_MB": round(nbytes / 1e6, 2),
        "attn_ms": round(attn[1], 4),
        "attn_ms_per_token": round(per_tok, 6),
        "chunks": 1,
        "ffn_ms": ffn,
        "act_copy_us": hyb.get("act_copy_us", 20.0),
        "contention": 1.0,
        "h2d_chunk_GBps": chunk_bw,
        "copy_enqueue_us": round(enq * 1e6, 2),
        "ffn_chunked_ms": {"1": round(t_cffn, 4), "chunk_mb": 16, "chunks": len(rows)},
        "shapes": {"H": shapes.H, "F": shapes.F, "E": shapes.E},
    }


def write(profile: dict, path: str) -> None:
    from tracekit.outfiles import write_atomically

    def dump(tmp: str) -> None:           # never leave a half-written profile behind
        with open(tmp, "w") as f:
            json.dump(profile, f, indent=2)
            f.write("\n")

    write_atomically(path, path + ".partial", dump)
