"""Replay what-if for hybrid miss handling (issue 5): the C=2 speed-up against the host CPU's speed.

  python3 bench/hybrid_whatif.py [--traces ../shared/traces] [--profile h100-calibrated]

Scales the profile's measured CPU FFN table (8.7 ms per expert-token on the H100 host) and replays the
two shared Mixtral traces (all 32 layers) at C=2 with and without --hybrid. Prints a markdown table:
decode tokens/s with --hybrid / without and with --hybrid --split / without, and the share of decode
misses computed (wholly) on the CPU under --hybrid.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

TRACES = ("mixtral8x7b_humaneval_2probs_decode", "mixtral8x7b_humaneval0_prefill_decode")


def main() -> int:
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.trace import read_trace

    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces"))
    ap.add_argument("--profile", default="h100-calibrated")
    a = ap.parse_args()
    base = load_profile(a.profile)
    cpu1 = base.cpu_ffn_ms["1"]
    # (CPU ms per expert-token for one token, keep the measured contention?)
    cases = [(cpu1, True), (6.6, True), (4.4, True), (3.3, True), (2.2, True), (6.6, False), (3.3, False)]
    head = [f"{ms:.1f} ms{'' if cont else ', no contention'}" for ms, cont in cases]
    print("| trace | policy | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(cases))
    for name in TRACES:
        plan = build_plan(read_trace(os.path.join(a.traces, name + ".parquet")))
        for pol in ("lru", "belady"):
            spec = policies.get(pol)
            r0 = replay_one(spec, plan, 2, base)
            cells = []
            for ms, cont in cases:
                p = dataclasses.replace(base, cpu_ffn_ms={k: v * ms / cpu1 for k, v in base.cpu_ffn_ms.items()},
                                        **({} if cont else {"contention_copy": 1.0, "contention_cpu": 1.0}))
                r = replay_one(spec, plan, 2, p, hybrid=True)
                rs = replay_one(spec, plan, 2, p, hybrid=True, split=True)
                c = r.counters
                share = c["decode_cpu_misses"] / max(1, c["decode_cpu_misses"] + c["decode_transfers"])
                v0 = r0.decode_tokens / r0.decode_s
                speed, speed_s = r.decode_tokens / r.decode_s / v0, rs.decode_tokens / rs.decode_s / v0
                cells.append(f"{speed:.2f}x ({share:.0%}) / split {speed_s:.2f}x")
            print(f"| {name} | {pol} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
