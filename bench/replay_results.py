"""Write the replay sections of docs/results.md: every policy x C on the shared Mixtral traces,
markov at prefetch depth 1 and 2, and transfer-only against --hybrid. Replaces the text between the markers in the file.

    .venv/bin/python bench/replay_results.py --out docs/results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "traces"
START, END = "<!-- replay:start -->", "<!-- replay:end -->"
STUDY = {"ebco": 0.3467, "lru": 0.3686, "trajectory": 0.4393, "markov": 0.4423}


def table(rows: list[dict]) -> list[str]:
    out = ["| policy | C | decode hit | study hit | transfers/token | GB/token | above MIN | "
           "stall ms/token | sim tokens/s | prefetch used/issued |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["policy"] + (" (oracle)" if r["kind"] == "oracle" else "")
        study = f"{STUDY[r['policy']]:.4f}" if r["policy"] in STUDY else ""
        if not r["applicable"]:
            out.append(f"| {name} | {r['capacity']} | n/a: {r['reason']} | {study} | | | | | | |")
            continue
        pf = f"{r['prefetch_used']}/{r['prefetch_issued']}" if r["prefetch_issued"] else "-"
        out.append(f"| {name} | {r['capacity']} | {r['decode_hit_rate']:.4f} | {study} | "
                   f"{r['transfers_per_token']:.2f} | {r['bytes_per_token'] / 1e9:.2f} | "
                   f"{r['transfers_above_belady']:+.2f} | {r['stall_ms_per_token']:.1f} | "
                   f"{r['sim_tokens_per_s']:.2f} | {pf} |")
    return out


def hybrid_section(loaded: dict) -> list[str]:
    # loaded: {trace path: (its plans, its rows in the main table)}
    from tracekit.replay.cost import load_profile
    from tracekit.replay.sweep import SweepConfig, run_sweep

    out = ["### Transfer-only against `--hybrid` and `--hybrid --split` (replay, profile `h100-pcie5`: "
           "CPU expert 6.6 ms/token)", "",
           "| trace | policy | C | sim tok/s | hybrid | speed-up | misses on CPU | hybrid --split | speed-up | "
           "misses on CPU / split | GB/token | GB/token hybrid | GB/token split |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, (plans, _) in loaded.items():
        rows = {}
        for mode in ("off", "hybrid", "split"):
            cfg = SweepConfig(policies=["lru", "ebco", "markov", "belady"], capacities=[2, 4],
                              profile=load_profile("h100-pcie5"), hybrid=mode != "off", split=mode == "split")
            for r in run_sweep(plans, cfg):
                rows[(r["policy"], r["capacity"], mode)] = r
        for (pol, C, mode), r in rows.items():
            if mode != "off":
                continue
            h, sp = rows[(pol, C, "hybrid")], rows[(pol, C, "split")]
            v = r["sim_tokens_per_s"]
            out.append(f"| {os.path.basename(path)[:-8]} | {pol} | {C} | {v:.2f} | "
                       f"{h['sim_tokens_per_s']:.2f} | {h['sim_tokens_per_s'] / v:.2f}x | {h['cpu_miss_share']:.0%} | "
                       f"{sp['sim_tokens_per_s']:.2f} | {sp['sim_tokens_per_s'] / v:.2f}x | "
                       f"{sp['cpu_miss_share']:.0%} / {sp['split_miss_share']:.0%} | {r['bytes_per_token'] / 1e9:.2f} | "
                       f"{h['bytes_per_token'] / 1e9:.2f} | {sp['bytes_per_token'] / 1e9:.2f} |")
    return out + [""]


def depth_section(loaded: dict, caps: list[int]) -> list[str]:
    # markov at depth 1 beside its main-table rows (depth = top_k) and LRU's; loaded as in hybrid_section
    from tracekit.replay.cost import load_profile
    from tracekit.replay.sweep import SweepConfig, run_sweep

    out = ["### markov's prefetch depth (replay, profile `h100-pcie5`, in-flight cap 2; LRU beside it)", "",
           "| trace | C | LRU transfers/token | LRU sim tok/s | depth | decode hit | transfers/token | "
           "prefetch used/issued | sim tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    prof = load_profile("h100-pcie5")
    for path, (plans, rows) in loaded.items():
        lru = {r["capacity"]: r for r in rows if r["policy"] == "lru"}
        top_k = next(iter(plans.values()))[0].K
        for depth, runs in ((1, run_sweep(plans, SweepConfig(policies=["markov"], capacities=caps, profile=prof,
                                                               depth=1))),
                            (top_k, [r for r in rows if r["policy"] == "markov"])):
            for r in runs:
                b = lru[r["capacity"]]
                out.append(f"| {os.path.basename(path)[:-8]} | {r['capacity']} | {b['transfers_per_token']:.2f} | "
                           f"{b['sim_tokens_per_s']:.2f} | {depth} | {r['decode_hit_rate']:.4f} | "
                           f"{r['transfers_per_token']:.2f} | {r['prefetch_used']}/{r['prefetch_issued']} | "
                           f"{r['sim_tokens_per_s']:.2f} |")
    return out + [""]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--capacity", default="1,2,3,4,6")
    ap.add_argument("--extra", nargs="*", default=[], help="more traces (e.g. a tiny trace with hidden states)")
    a = ap.parse_args()
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.sweep import SweepConfig, load_plans, run_sweep

    caps = [int(x) for x in a.capacity.split(",")]
    traces = [str(SHARED / f) for f in ("mixtral8x7b_humaneval_2probs_decode.parquet",
                                        "mixtral8x7b_humaneval0_prefill_decode.parquet")]
    lines = [START, "<!-- generated by bench/replay_results.py; do not edit by hand -->",
             f"Generated on {platform.node()} ({platform.processor() or platform.machine()}), "
             "profile `h100-pcie5`, in-flight cap 2, prefetch depth = top_k.", ""]
    loaded = {}                                   # the shared traces: (plans, rows), for the later sections
    for path, expert_mb in [(t, None) for t in traces] + [(t, 352.0) for t in a.extra]:
        cfg = SweepConfig(policies=policies.names(), capacities=caps, profile=load_profile("h100-pcie5"),
                          expert_bytes=expert_mb * 1e6 if expert_mb else None)
        plans = load_plans([path], False)
        rows = run_sweep(plans, cfg)
        if path in traces:
            loaded[path] = (plans, rows)
        lines += [f"### {os.path.basename(path)}" + (" (experts priced at 352 MB)" if expert_mb else ""), ""]
        lines += table(rows) + [""]
    lines += depth_section(loaded, caps)
    lines += hybrid_section(loaded)
    lines.append(END)
    path = Path(a.out)
    text = path.read_text() if path.exists() else "# Results\n\n" + START + "\n" + END + "\n"
    text = text[:text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    path.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
