"""Replay speed benchmarks (`make bench`); writes a markdown section to docs/benchmarks.md.

1. Per-policy throughput on a ~10M-request synthetic trace (32 layers, 8 experts, top-2),
   one core, after JIT (best of REPEAT runs: this VM's speed drifts by up to 2x within minutes).
2. The whole process `tracekit replay synthetic:... --policy all --capacity 1,2,3,4,6` on a
   synthetic trace of N tokens x 32 layers, wall-clock, JIT cache warm (a first run warms it).
Targets from issue 3: lru/fifo >= 100M req/s, others >= 20M req/s; the whole sweep <= 60 s for 1M tokens.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
REPEAT = 7
START = "<!-- bench_replay:start -->"
END = "<!-- bench_replay:end -->"
PREFETCH_LOOP = "fused prefetch loop"


def _default_stickiness() -> float:
    from tracekit.trace.synthetic import synthetic_trace

    return inspect.signature(synthetic_trace).parameters["stickiness"].default


@njit(cache=True)
def _bare_lru(req_ptr, req_e, L, E, C):
    # The least an LRU replay can do per request: residency lookup, LRU stamps, victim among C,
    # a hit count. No cost model, no counters, no policy interface. -> hits
    last = np.zeros((L, E), np.int64)
    res = np.zeros((L, E), np.int8)
    owner = np.full((L, C), -1, np.int64)
    nres = np.zeros(L, np.int64)
    hits = 0
    for s in range((req_ptr.shape[0] - 1) // L):
        for l in range(L):
            pos = s * L + l
            for i in range(req_ptr[pos], req_ptr[pos + 1]):
                e = np.int64(req_e[i])
                if res[l, e]:
                    hits += 1
                else:
                    if nres[l] < C:
                        k = nres[l]
                        nres[l] += 1
                    else:
                        k = 0
                        for j in range(1, C):
                            if last[l, owner[l, j]] < last[l, owner[l, k]]:
                                k = j
                        res[l, owner[l, k]] = 0
                    owner[l, k] = e
                    res[l, e] = 1
                last[l, e] = i
    return hits


def synthetic_plan(tokens: int = 160000):
    """The planned synthetic trace that the prefetch-loop scripts time: tokens x 32 layers, 8 experts, top-2."""
    from tracekit.replay.plan import build_plan
    from tracekit.trace.synthetic import synthetic_trace

    return build_plan(synthetic_trace(tokens=tokens, layers=32, experts=8, top_k=2, seed=0))


def best_rate(fn, count, repeat: int = REPEAT):
    """Warm fn() up, then run it `repeat` times: -> (its last result, best count(result) per second)."""
    fn()
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        r = fn()
        best = max(best, count(r) / (time.perf_counter() - t))
    return r, best


def throughput(tokens: int, only: list[str] | None = None, hidden_dim: int = 64, hidden_tokens: int = 0,
               experts: int = 8, top_k: int = 2, C: int = 2,
               stickiness: float | None = None) -> list[tuple[str, int, float, str]]:
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.replay.table import applies
    from tracekit.trace.synthetic import synthetic_trace

    stickiness = _default_stickiness() if stickiness is None else stickiness
    tr = synthetic_trace(tokens=tokens, layers=32, experts=experts, top_k=top_k, seed=0, hidden_dim=0,
                         stickiness=stickiness)
    plan = build_plan(tr)
    prof = load_profile("h100-pcie5")
    out = []
    lru_hits = None
    for name in policies.names():
        spec = policies.get(name)
        if name in ("trajectory", "gate-lookahead") or (only and name not in only):
            continue                          # need hidden states; measured separately below
        r, best = best_rate(lambda: replay_one(spec, plan, C, prof), lambda r: r.counters["requests"])
        engine = PREFETCH_LOOP if spec.prefetches else "transition table" if applies(spec, plan.E, C) else "demand loop"
        out.append((name, r.counters["requests"], best, engine))
        print(f"{name:15s} {best / 1e6:7.2f} M req/s", flush=True)
        if spec.prefetches:                   # the controller loop that live drives, for comparison
            _, rate = best_rate(lambda: replay_one(spec, plan, C, prof, engine="controller"),
                                lambda r: r.counters["requests"])
            out.append((f"{name} (controller loop, reference)", r.counters["requests"], rate, "controller"))
            print(f"{name:15s} {rate / 1e6:7.2f} M req/s (controller loop)", flush=True)
        lru_hits = r.counters["hits"] if name == "lru" else lru_hits
    if lru_hits is not None:
        hits, rate = best_rate(lambda: _bare_lru(plan.req_ptr, plan.req_e, plan.L, plan.E, C),
                               lambda _: plan.req_e.shape[0])
        assert hits == lru_hits, (hits, lru_hits)
        out.append(("bare LRU loop (reference)", plan.req_e.shape[0], rate, "no cost model, no counters"))
        print(f"bare LRU loop   {rate / 1e6:7.2f} M req/s", flush=True)
    if only and not {"trajectory", "gate-lookahead"} & set(only):
        return out
    trh = synthetic_trace(tokens=hidden_tokens or tokens, layers=32, experts=experts, top_k=top_k, seed=0,
                          hidden_dim=hidden_dim, with_router=True, stickiness=stickiness)
    plan_h = build_plan(trh)
    for name in ("trajectory", "gate-lookahead"):
        if only and name not in only:
            continue
        spec = policies.get(name)
        r, rate = best_rate(lambda: replay_one(spec, plan_h, C, prof, router=trh.router, hidden_kind="full"),
                            lambda r: r.counters["requests"])
        out.append((f"{name} (D={hidden_dim})", r.counters["requests"], rate, PREFETCH_LOOP))
        print(f"{name:15s} {rate / 1e6:7.2f} M req/s (hidden dim {hidden_dim})", flush=True)
    return out


def whole_sweep(tokens: int) -> tuple[float, float]:
    exe = str(Path(sys.executable).parent / "tracekit")
    cmd = [exe, "replay", f"synthetic:tokens={tokens},layers=32,experts=8,top_k=2,seed=0",
           "--policy", "all", "--capacity", "1,2,3,4,6", "--format", "csv"]
    times = []
    for _ in range(2):                        # first run may compile; second is JIT-cache warm
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return times[0], times[1]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--tokens", type=int, default=160_000, help="throughput trace (~10M requests)")
    ap.add_argument("--sweep-tokens", type=int, default=1_000_000, help="whole-sweep trace tokens (0: skip)")
    ap.add_argument("--policies", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--hidden-dim", type=int, default=64, help="hidden size of trajectory's and gate-lookahead's trace")
    ap.add_argument("--hidden-tokens", type=int, default=0, help="tokens of that trace (default: --tokens, the same ~10M requests)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=2)
    ap.add_argument("--stickiness", type=float, default=_default_stickiness(),
                    help="chance a token repeats the previous token's experts (synthetic_trace's default)")
    a = ap.parse_args()
    rows = throughput(a.tokens, [p for p in a.policies.split(",") if p] or None, a.hidden_dim, a.hidden_tokens,
                      a.experts, a.top_k, a.capacity, a.stickiness)
    cold, warm = whole_sweep(a.sweep_tokens) if a.sweep_tokens else (float("nan"), float("nan"))
    cpu = f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores"
    lines = [START, "## Replay speed", "",
             f"Measured by `make bench` (bench/bench_replay.py) on this CPU ({cpu}), one core, "
             f"best of {REPEAT} after JIT. Synthetic trace: {a.tokens} tokens x 32 layers, {a.experts} experts, "
             f"top-{a.top_k}, C={a.capacity}, full cost model on"
             + (f", stickiness {a.stickiness}." if a.stickiness != _default_stickiness() else "."), "",
             "| policy | engine | requests | M requests/s | target |", "|---|---|---|---|---|"]
    for name, n, rate, engine in rows:
        target = 100 if name in ("lru", "fifo", "bare LRU loop (reference)") else 20
        lines.append(f"| {name} | {engine} | {n:,} | {rate / 1e6:.2f} | >= {target} |")
    if a.sweep_tokens:
        lines += ["", f"Whole process `tracekit replay synthetic:tokens={a.sweep_tokens},layers=32 --policy all "
                  f"--capacity 1,2,3,4,6` (40 configurations, 2 worker processes): {cold:.1f} s first run, "
                  f"{warm:.1f} s with the JIT cache warm."]
    lines.append(END)
    path = Path(a.out)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text:
        text = text[:text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
