"""`make demo`: the whole pipeline on the built-in tiny model, on CPU, in a couple of minutes.

1. record a tiny-mixtral trace with full hidden states (so trajectory and gate-lookahead run),
2. inspect it,
3. replay every policy on it and on the shared real Mixtral traces (if ../shared/traces exists),
   and print the tables.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "traces"


def main() -> int:
    from tracekit.cli.app import main as cli

    out_dir = ROOT / "traces"
    out_dir.mkdir(exist_ok=True)
    trace = out_dir / "demo-tiny-mixtral.parquet"
    t0 = time.time()
    print("== 1/3 record: tiny-mixtral, built-in prompts, hidden states kept", flush=True)
    args = ["record", "--model", "tiny-mixtral", "--max-new-tokens", "48", "--batch-size", "4",
            "--hidden", "full", "--out", str(trace), "--force"]
    _run(cli, args)
    print("\n== 2/3 inspect", flush=True)
    _run(cli, ["inspect", str(trace)])
    print("\n== 3/3 replay every policy (simulated on the h100-pcie5 profile)", flush=True)
    traces = [str(trace)]
    shared = sorted(str(p) for p in SHARED.glob("mixtral8x7b_*.parquet")) if SHARED.is_dir() else []
    # The tiny model's experts are a few KB; price each transfer as a bf16 Mixtral-8x7B expert.
    _run(cli, ["replay", *traces, "--policy", "all", "--capacity", "1,2,4", "--expert-mb", "352"])
    if shared:
        print("\n   ... and the real Mixtral-8x7B traces from ../shared/traces "
              "(no hidden states: trajectory and gate-lookahead are not applicable there)", flush=True)
        _run(cli, ["replay", *shared, "--policy", "all", "--capacity", "2,4"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; trace kept at {os.path.relpath(trace)}")
    return 0


def _run(cli, args: list[str]) -> None:
    try:
        cli(args)
    except SystemExit as exc:
        if exc.code:
            raise


if __name__ == "__main__":
    sys.exit(main())
