"""Replay speed benchmarks (`make bench`); writes a markdown section to docs/benchmarks.md.

1. Per-policy throughput on a ~10M-request synthetic trace (32 layers, 8 experts, top-2),
   one core, after JIT (best of 3 runs).
2. The whole process `tracekit replay synthetic:... --policy all --capacity 1,2,3,4,6` on a
   synthetic trace of N tokens x 32 layers, wall-clock, JIT cache warm (a first run warms it).
Targets from issue 3: lru/fifo >= 100M req/s, others >= 20M req/s; the whole sweep <= 60 s for 1M tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- bench_replay:start -->"
END = "<!-- bench_replay:end -->"


def throughput(tokens: int) -> list[tuple[str, int, float, str]]:
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.trace.synthetic import synthetic_trace

    tr = synthetic_trace(tokens=tokens, layers=32, experts=8, top_k=2, seed=0, hidden_dim=0)
    plan = build_plan(tr)
    prof = load_profile("h100-pcie5")
    out = []
    for name in policies.names():
        spec = policies.get(name)
        if name in ("trajectory", "gate-lookahead"):
            continue                          # need hidden states; measured separately below
        replay_one(spec, plan, 2, prof)       # JIT / cache load
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            r = replay_one(spec, plan, 2, prof)
            best = max(best, r.counters["requests"] / (time.perf_counter() - t))
        out.append((name, r.counters["requests"], best, "controller" if spec.prefetches else "demand loop"))
        print(f"{name:15s} {best / 1e6:7.2f} M req/s", flush=True)
    trh = synthetic_trace(tokens=tokens // 10, layers=32, experts=8, top_k=2, seed=0, hidden_dim=64,
                          with_router=True)
    plan_h = build_plan(trh)
    for name in ("trajectory", "gate-lookahead"):
        spec = policies.get(name)
        replay_one(spec, plan_h, 2, prof, router=trh.router, hidden_kind="full")
        t = time.perf_counter()
        r = replay_one(spec, plan_h, 2, prof, router=trh.router, hidden_kind="full")
        rate = r.counters["requests"] / (time.perf_counter() - t)
        out.append((name + " (D=64)", r.counters["requests"], rate, "controller"))
        print(f"{name:15s} {rate / 1e6:7.2f} M req/s (hidden dim 64)", flush=True)
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--tokens", type=int, default=160_000, help="throughput trace (~10M requests)")
    ap.add_argument("--sweep-tokens", type=int, default=1_000_000, help="whole-sweep trace tokens")
    a = ap.parse_args()
    rows = throughput(a.tokens)
    cold, warm = whole_sweep(a.sweep_tokens)
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [START, "## Replay speed", "",
             f"Measured by `make bench` (bench/bench_replay.py) on this CPU ({cpu}), one core, "
             f"best of 3 after JIT. Synthetic trace: {a.tokens} tokens x 32 layers, 8 experts, "
             "top-2, C=2, full cost model on.", "",
             "| policy | engine | requests | M requests/s | target |", "|---|---|---|---|---|"]
    for name, n, rate, engine in rows:
        target = 100 if name in ("lru", "fifo") else 20
        lines.append(f"| {name} | {engine} | {n:,} | {rate / 1e6:.2f} | >= {target} |")
    lines += ["", f"Whole process `tracekit replay synthetic:tokens={a.sweep_tokens},layers=32 --policy all "
              f"--capacity 1,2,3,4,6` (40 configurations, 2 worker processes): {cold:.1f} s first run, "
              f"{warm:.1f} s with the JIT cache warm.", END]
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
