"""How markov's replay speed moves with the prefetch settings (docs/benchmarks.md, session 15).

Times replay_one (the fused prefetch loop) for markov at C = 2 on bench_replay's synthetic trace
(160000 tokens x 32 layers, 8 experts, top-2; 10.24M requests), for several (cap, depth) pairs,
alternating the pairs in each round, best of --repeat per pair and round after JIT. Beside each speed
it prints what the setting makes the loop do per layer-step, from replay's own counters: prefetches
issued, and the hit rate. The issue's target (20M requests/s) is set at the default, cap 2 and depth
= top-k = 2.

Usage: python bench/prefetch_settings.py [--rounds 2] [--repeat 4] [--settings 2:2,1:2,8:2,2:1]
"""

from __future__ import annotations

import argparse

from bench_replay import best_rate, synthetic_plan  # bench/ is this script's folder, first on sys.path


def main() -> int:
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=4, help="best of this many runs per setting and round")
    ap.add_argument("--settings", default="2:2,1:2,8:2,2:1", help="cap:depth pairs, comma-separated")
    a = ap.parse_args()
    pairs = [tuple(int(x) for x in p.split(":")) for p in a.settings.split(",")]
    plan = synthetic_plan()
    spec, prof = policies.get("markov"), load_profile("h100-pcie5")
    steps = plan.decode.shape[0] * plan.L
    print("| round | cap | depth | M requests/s | ns per layer-step | prefetches issued per layer-step | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for rnd in range(a.rounds):
        for cap, depth in pairs:
            r, rate = best_rate(lambda: replay_one(spec, plan, 2, prof, cap=cap, depth=depth),
                                lambda r: r.counters["requests"], repeat=a.repeat)
            c = r.counters
            print(f"| {rnd + 1} | {cap} | {depth} | {rate / 1e6:.2f} | {c['requests'] / rate / steps * 1e9:.0f} | "
                  f"{c['prefetch_issued'] / steps:.2f} | {c['hits'] / c['requests']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
