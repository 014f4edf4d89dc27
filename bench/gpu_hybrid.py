"""GPU measurements for hybrid miss handling (issue 5): run on the GPU machine; writes under --out.

  python3 bench/gpu_hybrid.py --out $OUT --traces DIR [--base-profile h100-calibrated] [--layers 8]

1. hybrid calibration (CPU FFN table, threads, activation round trip, contention) merged into the base
   profile's keys -> OUT/<card>-calibrated.json (commit as tracekit/replay/profiles/<card>-calibrated.json)
2. trace-driven live on the two Mixtral traces, C=2 and 4, whole-expert copies, each policy with and
   without --hybrid (and with --hybrid --split when --split is given), beside replay's prediction with
   the same (new) profile
Writes OUT/hybrid_results.json after every row and OUT/hybrid_results.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tracekit.live import host_ffn  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads libgomp)

TRACES = ["mixtral8x7b_humaneval_2probs_decode.parquet", "mixtral8x7b_humaneval0_prefill_decode.parquet"]


from gpu_live import device_card, log  # noqa: E402  (same folder: the script's own sys.path entry)


def markdown(rows, card, prof) -> str:
    h = ("| trace | policy | C | hybrid | live tok/s | pred tok/s | pred/live | hybrid speed-up | hit | "
         "CPU share of misses | split share | MB/token | stall ms/tok | CPU wait ms/tok | compute ms/tok | CPU ms/job | "
         "GB/s | = replay |")
    out = [f"Card: {card}. CPU: {prof.get('cpu_threads')} threads, {prof.get('cpu_kernel', 'torch')} kernel; "
           f"contention_copy "
           f"{prof.get('contention_copy')}, contention_cpu {prof.get('contention_cpu')}.", "", h,
           "|" + "---|" * (h.count("|") - 1)]
    base = {(r["trace"], r["policy"], r["capacity"]): r["live_tok_s"] for r in rows if not r["hybrid"]}
    for r in rows:
        b = base.get((r["trace"], r["policy"], r["capacity"]))
        sp = f"{r['live_tok_s'] / b:.2f}x" if (r["hybrid"] and b) else ""
        cpj = "" if r["cpu_ms_per_job"] != r["cpu_ms_per_job"] else f"{r['cpu_ms_per_job']:.2f}"
        out.append(f"| {r['trace'].replace('.parquet', '')} | {r['policy']} | {r['capacity']} | "
                   f"{'split' if r.get('split') else 'yes' if r['hybrid'] else 'no'} | {r['live_tok_s']:.2f} | "
                   f"{r['pred_tok_s']:.2f} | {r['ratio_pred_live']:.2f} | {sp} | {r['hit_rate']:.3f} | "
                   f"{r['cpu_share']:.2f} | {r.get('split_share', 0.0):.2f} | "
                   f"{r['bytes_per_token_MB']:.0f} | {r['stall_ms_per_token']:.1f} | {r['cpu_wait_ms_per_token']:.1f} | "
                   f"{r['compute_ms_per_token']:.2f} | {cpj} | {r['achieved_GBps']:.1f} | {r['bookkeeping_equal']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces", default="../shared/traces")
    ap.add_argument("--base-profile", default="h100-calibrated", help="GPU keys come from here")
    ap.add_argument("--profile", default=None, help="skip calibration, use this profile")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--policies", default="lru,belady")
    ap.add_argument("--capacities", default="2,4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-kernel", default="fused", help="fused | torch (tracekit/live/host_ffn.py)")
    ap.add_argument("--split", action="store_true", help="also run --hybrid --split")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    import torch

    from tracekit.live.calib_cpu import calibrate_cpu
    from tracekit.live.calibrate import write
    from tracekit.live.compare import load_with_extras
    from tracekit.live.executor import MIXTRAL
    from tracekit.live.session import trace_sweep

    os.makedirs(a.out, exist_ok=True)
    name, card = device_card()
    log(f"device: {name}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    if a.profile:
        prof_path = a.profile
        _, raw = load_with_extras(prof_path)
    else:
        _, raw = load_with_extras(a.base_profile)
        hyb = calibrate_cpu(MIXTRAL, threads=a.threads, reps=3 if a.smoke else 5, log=log, kernel=a.cpu_kernel)
        raw = dict(raw) | hyb
        # the base profile's own hybrid-keys note (if any) no longer holds: those keys are replaced
        base_src = raw.get("source", "").replace("; cpu_ffn_ms not measured", "").split("; hybrid keys (")[0]
        raw["source"] = (base_src + f"; hybrid keys (cpu_ffn_ms, cpu_threads, act_copy_us, contention_*) measured "
                         f"on {name} by bench/gpu_hybrid.py (tracekit/live/calib_cpu.py); GPU keys from "
                         f"{a.base_profile}")
        prof_path = os.path.join(a.out, f"{card}-calibrated.json")
        write(raw, prof_path)
        log(f"hybrid calibration: {time.perf_counter() - t0:.1f} s")
    layers, maxtok = (2, 10) if a.smoke else (a.layers, a.max_tokens)
    caps = [int(c) for c in a.capacities.split(",")]
    rows: list = []
    res_path = os.path.join(a.out, "hybrid_results.json")

    def dump(_r=None):
        with open(res_path, "w") as f:
            json.dump({"card": name, "profile": raw, "layers": layers, "max_tokens": maxtok, "rows": rows},
                      f, indent=1, default=str)

    for tname in TRACES[:1] if a.smoke else TRACES:
        t1 = time.perf_counter()
        trace_sweep(os.path.join(a.traces, tname), a.policies.split(","), caps, 2, (0.0,), layers, maxtok,
                    prof_path, "cuda", log=log, hybrids=(False, True, "split") if a.split else (False, True),
                    cpu_threads=a.threads, cpu_kernel=a.cpu_kernel,
                    on_row=lambda r: (rows.append(r), dump()))
        log(f"{tname}: {time.perf_counter() - t1:.1f} s")
    md = markdown(rows, name, raw)
    with open(os.path.join(a.out, "hybrid_results.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
