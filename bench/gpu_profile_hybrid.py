"""Where the GPU's time goes in a hybrid live run (issue 5): a torch.profiler trace of trace-driven live.

  python3 bench/gpu_profile_hybrid.py --out $OUT --traces DIR [--profile P] [--split] [--layers 4] [--tokens 30]

Runs lru C=2 (whole-expert copies) with --hybrid (and --split) under torch.profiler (CPU + CUDA) and
writes OUT/hybrid_profile.json: per CUDA stream, busy time by op name, and the compute stream's idle time
spent waiting for the host to launch its next op (host_bound_idle_us, by pair of ops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tracekit.live import host_ffn  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads libgomp)


def analyse(trace: dict) -> dict:
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_stream = defaultdict(list)
    for e in gpu:
        by_stream[e["args"].get("stream", e.get("tid"))].append(e)
    streams = {}
    for s, es in by_stream.items():
        es.sort(key=lambda e: e["ts"])
        busy = defaultdict(float)
        for e in es:
            busy[e["name"][:60]] += e["dur"]
        t0, t1 = es[0]["ts"], es[-1]["ts"] + es[-1]["dur"]
        streams[str(s)] = {"ops": len(es), "span_us": t1 - t0, "busy_us": sum(busy.values()),
                           "top": sorted(busy.items(), key=lambda kv: -kv[1])[:8]}
    # the compute stream (most ops): idle gaps whose next op was launched by the host only after the
    # previous op had finished, i.e. the GPU waited for the host (grouped by the pair of op names)
    comp = max(by_stream.values(), key=len)
    launch = {e["args"]["correlation"]: e for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_bound = defaultdict(lambda: [0.0, 0])
    for a, b in zip(comp, comp[1:]):
        end = a["ts"] + a["dur"]
        lb = launch.get(b["args"].get("correlation"))
        if lb is None or b["ts"] <= end or lb["ts"] + lb["dur"] <= end:
            continue
        g = host_bound[f"{a['name'][:40]} -> {b['name'][:40]}"]
        g[0] += min(b["ts"] - end, lb["ts"] + lb["dur"] - end)
        g[1] += 1
    top = sorted(host_bound.items(), key=lambda kv: -kv[1][0])[:8]
    return {"streams": streams, "host_bound_idle_us": sum(v[0] for v in host_bound.values()),
            "host_bound_top": [(k, round(v[0]), v[1]) for k, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces", default="../shared/traces")
    ap.add_argument("--profile", default="h100-calibrated")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=15)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from tracekit import policies as P
    from tracekit.live.compare import load_with_extras, profile_for
    from tracekit.live.executor import MIXTRAL, TraceExecutor, make_context
    from tracekit.live.session import prepare
    from tracekit.live.store import ExpertStore

    os.makedirs(a.out, exist_ok=True)
    tr, plan, shapes = prepare(os.path.join(a.traces, "mixtral8x7b_humaneval_2probs_decode.parquet"), a.layers,
                               a.tokens, MIXTRAL)
    prof, raw = load_with_extras(a.profile)
    store = ExpertStore(shapes.L, shapes.E, shapes.numel, pin=True)
    ex = TraceExecutor(shapes, 2, "cuda", store, chunk_mb=0.0, max_tokens=8, cpu_threads=a.threads)
    p = profile_for(prof, len(ex.rows), 0.0, raw)
    spec = P.get("lru")
    ctx = make_context(plan, 2, tr)
    out = {}
    try:
        ex.run(spec, plan, 2, 2, ctx, warmup_steps=2, hybrid=p, split=a.split)       # warm
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
            res = ex.run(spec, plan, 2, 2, ctx, hybrid=p, split=a.split)
        path = os.path.join(a.out, "trace.json")
        pr.export_chrome_trace(path)
        out = analyse(json.load(open(path)))
        n = max(1, res.decode_tokens)
        out["per_token_ms"] = {k: getattr(res, k) / n * 1e3 for k in
                               ("decode_s", "stall_s", "compute_s", "gap_s", "cpu_wait_s", "cpu_busy_s")}
        out["cpu_jobs_per_token"] = res.cpu_jobs / n
        out["counters"] = res.counters
    finally:
        ex.close()
        store.free()
    with open(os.path.join(a.out, "hybrid_profile.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1)[:6000])


if __name__ == "__main__":
    sys.exit(main())
