"""Where markov's time goes in the fused prefetch loop (docs/benchmarks.md, session 8).

Writes variants of markov's generated engine module (tracekit.replay.jit) into a temporary folder and
times run_prefetch in each, alternating, in one process:
  full           the engine as replay runs it
  predict-ignored  predict is computed but its rows are dropped (no queueing, issuing or retiring)
  no-predict     predict is not called (observe still runs)
  full (copy)    a second, identical copy of the full engine: how far code placement alone moves it
Synthetic trace: 160000 tokens x 32 layers, 8 experts, top-2 (10.24M requests), C=2, cap 2.
Usage: python bench/prefetch_knockouts.py [--rounds 3] [--repeat 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_replay import synthetic_plan  # bench/ is this script's folder, first on sys.path

CALL = "                    mp = predict(st, l, tok_ex[j, l], hid[j, l], pred)\n"
VARIANTS = {
    "full": "",
    "predict-ignored": CALL + "                    mp = 0 if pred[0, 2] >= -5 else mp\n",
    "no-predict": "                    mp = 0\n",
    "full (copy)": "",
}


def main() -> int:
    from tracekit import policies
    from tracekit.policies import PolicyContext
    from tracekit.replay import controller as ctlmod
    from tracekit.replay.cost import load_profile, new_timeline
    from tracekit.replay.jit import cache_dir, engine_module

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4, help="best of this many runs per variant and round")
    a = ap.parse_args()
    spec = policies.get("markov")
    base = engine_module(spec)
    src = Path(base.__file__).read_text().replace("cache=True", "cache=False")
    assert CALL in src, "the engine's predict call changed: update CALL"
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    mods = {}
    try:
        for i, (name, repl) in enumerate(VARIANTS.items()):
            f = tmp / f"ko_{i}.py"
            f.write_text(src.replace(CALL, repl) if repl else src)
            ms = importlib.util.spec_from_file_location(f"tracekit_ko_{i}", f)
            m = importlib.util.module_from_spec(ms)
            ms.loader.exec_module(m)
            mods[name] = m
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plan = synthetic_plan()
    sc, ft, fs = load_profile("h100-pcie5").vectors()
    n_steps = plan.decode.shape[0] * plan.L
    for rnd in range(a.rounds):
        for name, m in mods.items():
            best = float("inf")
            for k in range(a.repeat + (rnd == 0)):          # the first call of round 0 compiles: not timed
                ctx = PolicyContext(plan.L, plan.E, 2, plan.K, 0, "none", None, plan.K, {})
                st, ctl = spec.make_state(ctx), ctlmod.new_controller(plan.L, plan.E, 2, 2)
                t = time.perf_counter()
                m.run_prefetch(ctl, st, new_timeline(plan.L, plan.E, 2), sc, ft, fs, plan.tok_ptr, plan.decode,
                               plan.tok_ex, plan.hid, plan.req_ptr, plan.req_e, plan.req_ntok, plan.req_next, True,
                               True, np.zeros(plan.L, np.uint64))
                if rnd or k:
                    best = min(best, time.perf_counter() - t)
            print(f"round {rnd}  {name:16s} {plan.req_e.shape[0] / best / 1e6:6.2f} M req/s  "
                  f"{best / n_steps * 1e9:5.0f} ns per layer-step  (prefetches issued {ctl[8][ctlmod.C_PF_ISSUED]})",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
