"""Old code against new code: one policy's replay speed, alternating separate processes.

Each round runs a child process per source tree (old first, then new), each pinned by the caller's
taskset if any, and each times replay_one on bench_replay's synthetic trace (160000 tokens x 32 layers,
8 experts, top-2, C = 2; with --hidden-dim, 16000 tokens with hidden states and router weights), best
of 5 after JIT. Separate processes and alternation, because this loop's speed moves with code
placement and with the machine's phase (docs/benchmarks.md). The two trees must give the same
counters; the script stops if they do not.

Usage: python bench/ab_replay.py --old-rev 46e63e7 --policy markov [--rounds 5] [--hidden-dim 64]
       python bench/ab_replay.py --old /path/to/old/tree --policy markov     (a folder holding tracekit/)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_replay import best_rate  # bench/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parent.parent


def child(policy: str, hidden_dim: int) -> None:
    import tracekit.replay.engine as engine
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.plan import build_plan
    from tracekit.trace.synthetic import synthetic_trace

    tokens = 16000 if hidden_dim else 160000
    tr = synthetic_trace(tokens=tokens, layers=32, experts=8, top_k=2, seed=0, hidden_dim=hidden_dim,
                         with_router=hidden_dim > 0)
    plan = build_plan(tr)
    kw = dict(router=tr.router, hidden_kind="full") if hidden_dim else {}
    spec, prof = policies.get(policy), load_profile("h100-pcie5")
    r, best = best_rate(lambda: engine.replay_one(spec, plan, 2, prof, **kw), lambda r: r.counters["requests"], repeat=5)
    print(f"{best / 1e6:.2f} {r.counters['hits']} {r.counters['transfers']} {r.counters['prefetch_issued']} "
          f"{Path(engine.__file__).resolve()}")


def run_tree(tree: Path, policy: str, hidden_dim: int, jit_dir: str) -> tuple[float, tuple]:
    env = dict(os.environ, PYTHONPATH=str(tree), TRACEKIT_JIT_DIR=jit_dir)
    p = subprocess.run([sys.executable, __file__, "--child", "--policy", policy, "--hidden-dim", str(hidden_dim)],
                       env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"the run in {tree} failed:\n{p.stderr[-2000:]}")
    out = p.stdout.split()
    if not Path(out[-1]).is_relative_to(tree.resolve()):
        sys.exit(f"the run for {tree} imported tracekit from {out[-1]}")
    return float(out[0]), tuple(out[1:-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--old", default="", help="a folder holding the old tracekit/")
    ap.add_argument("--old-rev", default="", help="a git revision of this repository (exported to a temp folder)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hidden-dim", type=int, default=0)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.policy, a.hidden_dim)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(a.old) if a.old else Path(tmp) / "old"
        if a.old_rev:
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.old_rev, "tracekit"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        if not (old / "tracekit" / "__init__.py").is_file():
            sys.exit("give --old DIR (holding tracekit/) or --old-rev REV")
        trees = {"old": old, "new": ROOT}
        jit = {k: str(Path(tmp) / f"jit_{k}") for k in trees}
        for k in trees:                           # compile once per tree before timing
            run_tree(trees[k], a.policy, a.hidden_dim, jit[k])
        print(f"{a.policy}, M requests/s, best of 5 per process; old = {a.old or a.old_rev}")
        print("| round | old | new | new / old |\n|---|---|---|---|")
        for i in range(a.rounds):
            (r_old, c_old), (r_new, c_new) = (run_tree(trees[k], a.policy, a.hidden_dim, jit[k]) for k in trees)
            if c_old != c_new:
                sys.exit(f"the trees disagree: old (hits, transfers, issued) {c_old}, new {c_new}")
            print(f"| {i + 1} | {r_old:.2f} | {r_new:.2f} | {r_new / r_old:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
