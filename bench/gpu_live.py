"""GPU measurements for `tracekit live` (run on the GPU machine; writes under --out).

  python3 bench/gpu_live.py --out $OUT --traces DIR [--smoke] [--layers 8] [--max-tokens 100]

1. calibration -> OUT/<card>-calibrated.json (commit it as tracekit/replay/profiles/<card>-calibrated.json)
2. trace-driven live on the two Mixtral traces, C=2 and 4, chunking off (0) and on (16 MB), for lru,
   markov, belady and replay's best non-oracle policy -> rows beside replay's prediction
3. model-driven: tiny-mixtral and Mixtral-shaped random weights, offloaded vs resident greedy tokens
Writes OUT/live_results.json after every row and OUT/live_results.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def log(msg: str) -> None:
    print(msg, flush=True)


def device_card() -> tuple[str, str]:
    """(GPU name, short card tag for profile names: h100 | h200 | gpu)."""
    import torch

    name = torch.cuda.get_device_name(0)
    return name, "h200" if "H200" in name else "h100" if "H100" in name else "gpu"


def best_policy(trace_path, layers, max_tokens, profile, C=2) -> str:
    from tracekit import policies as P
    from tracekit.live.compare import predict
    from tracekit.live.executor import make_context
    from tracekit.live.session import prepare

    tr, plan, shapes = prepare(trace_path, layers, max_tokens, dry=True, log=log)
    best, best_tok = "markov", -1.0
    for name in P.names():
        spec = P.get(name)
        if spec.kind == "oracle":
            continue
        try:
            _, tok = predict(spec, plan, C, 2, profile, shapes.expert_bytes, make_context(plan, C, tr))
        except Exception as exc:  # noqa: BLE001 - a policy that cannot run on this trace
            log(f"  best-policy scan: {name} skipped ({type(exc).__name__}: {exc})")
            continue
        log(f"  replay {name}: {tok:.2f} tok/s predicted at C={C}")
        if tok > best_tok:
            best, best_tok = name, tok
    return best


def markdown(rows, models, card) -> str:
    h = ("| trace | policy | C | chunks | live tok/s | pred tok/s | pred/live | hit | MB/token | "
         "stall share | stall ms/tok | compute ms/tok | gap ms/tok | policy ms/tok | GB/s | efficiency | = replay |")
    out = [f"Card: {card}. Efficiency = (bytes / calibrated bandwidth + calibrated compute) / measured time, "
           "decode tokens only.", "", h, "|" + "---|" * (h.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['trace'].replace('.parquet', '')} | {r['policy']} | {r['capacity']} | {r['chunks']} | "
                   f"{r['live_tok_s']:.2f} | {r['pred_tok_s']:.2f} | {r['ratio_pred_live']:.2f} | "
                   f"{r['hit_rate']:.3f} | {r['bytes_per_token_MB']:.0f} | {r['stall_share']:.2f} | "
                   f"{r['stall_ms_per_token']:.1f} | {r['compute_ms_per_token']:.2f} | {r['gap_ms_per_token']:.2f} | "
                   f"{r['policy_ms_per_token']:.3f} | {r['achieved_GBps']:.1f} | {r['efficiency']:.2f} | "
                   f"{r['bookkeeping_equal']} |")
    if models:
        out += ["", "| model | layers | policy | C | identical | resident tok/s | offloaded tok/s | hit |",
                "|---|---|---|---|---|---|---|---|"]
        for m in models:
            out.append(f"| {m['model']} | {m['layers']} | {m['policy']} | {m['capacity']} | {m['identical']} | "
                       f"{m['resident_tok_s']:.2f} | {m['offloaded_tok_s']:.2f} | {m['hit_rate']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces", default="../shared/traces")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--profile", default=None, help="skip calibration, use this profile")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--policies", default="lru,markov,belady,lfu",
                    help="lfu: replay's best non-oracle policy at C=4 on the 2probs trace (lru at C=2)")
    ap.add_argument("--prefill-only", action="store_true",
                    help="chunking at prefill batch size: prefill_decode trace, 1 decode token, chunk 0/16/64 MB")
    ap.add_argument("--scan", action="store_true", help="also add replay's best non-oracle policy (slow: compiles all)")
    a = ap.parse_args()
    import torch

    from tracekit.live.calibrate import calibrate, write
    from tracekit.live.compare import load_with_extras
    from tracekit.live.session import model_run, trace_sweep

    os.makedirs(a.out, exist_ok=True)
    name, card = device_card()
    log(f"device: {name}, torch {torch.__version__}")
    t0 = time.perf_counter()
    if a.profile:
        prof_path = a.profile
    else:
        prof = calibrate(name=f"{card}-calibrated", reps=3 if a.smoke else 7,
                         batch=(1, 2, 4, 8, 16, 32, 64, 128, 256), log=log)
        prof_path = os.path.join(a.out, f"{card}-calibrated.json")
        write(prof, prof_path)
        log(f"calibration: {time.perf_counter() - t0:.1f} s")
    profile, _ = load_with_extras(prof_path)
    traces = ["mixtral8x7b_humaneval_2probs_decode.parquet", "mixtral8x7b_humaneval0_prefill_decode.parquet"]
    layers, maxtok = (2, 10) if a.smoke else (a.layers, a.max_tokens)
    caps = (2,) if a.smoke else (2, 4)
    rows, models = [], []
    res_path = os.path.join(a.out, "live_results.json")

    def dump():
        with open(res_path, "w") as f:
            json.dump({"card": name, "profile": prof_path, "layers": layers, "max_tokens": maxtok,
                       "rows": rows, "models": models}, f, indent=1, default=str)

    if not a.skip_model:
        for mdl, lay, ntok in ([("tiny-mixtral", None, 16)] if a.smoke else
                               [("tiny-mixtral", None, 32), ("mixtral", 2, 16)]):
            for pol in ("lru", "markov"):
                t1 = time.perf_counter()
                models.append(model_run(mdl, pol, 2, 2, 16.0, random_weights=True, layers=lay,
                                        max_tokens=ntok, device="cuda", log=log))
                dump()
                log(f"  {time.perf_counter() - t1:.1f} s")
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    if a.prefill_only:
        path = os.path.join(a.traces, traces[1])
        rows += trace_sweep(path, a.policies.split(","), list(caps), 2, (0.0, 16.0, 64.0), layers, 1, prof_path,
                            "cuda", log=log)
        dump()
        for r in rows:
            log(f"PREFILL C={r['capacity']} chunks={r['chunks']} {r['policy']}: live {r['nondecode_s'] * 1e3:.1f} ms, "
                f"pred {r['pred_nondecode_s'] * 1e3:.1f} ms")
        traces = []
    for tname in traces[:1] if a.smoke else traces:
        path = os.path.join(a.traces, tname)
        pols = ["lru", "markov"] if a.smoke else a.policies.split(",")
        if a.scan and not a.smoke:
            b = best_policy(path, layers, maxtok, profile)
            log(f"replay's best non-oracle policy on {tname}: {b}")
            if b not in pols:
                pols.append(b)
        t1 = time.perf_counter()
        rows += trace_sweep(path, pols, list(caps), 2, (0.0, 16.0), layers, maxtok, prof_path, "cuda", log=log)
        dump()
        log(f"{tname}: {time.perf_counter() - t1:.1f} s")
    md = markdown(rows, models, name)
    with open(os.path.join(a.out, "live_results.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
