"""Instruction-level profile of a policy's compiled replay loop (run_prefetch by default), with Linux perf.

numba's machine code has no symbols that perf can read, so this samples the whole process with
`perf record -e cpu-clock` (software clock: works in VMs without hardware counters), copies the
compiled run_prefetch's bytes out of the process, disassembles them with objdump, and counts the
samples that fall inside it: the share of the process spent in the loop, and its hottest 128-byte
windows with their instructions. Reading which source lines a window holds is left to the reader
(vector integer ops are markov's predict, scalar float ops the cost model's timeline, and so on).

Do not set NUMBA_ENABLE_PROFILING: its code differs (numba 0.68 emitted calls for max() in markov's
predict that the normal build inlines). The JIT cache folder is a fresh temporary one, so what is
profiled is what replay compiles.

Usage: python bench/profile_fused.py markov [--tokens 160000] [--hidden 0] [--top 8]
       python bench/profile_fused.py ebco --function run_demand   (a demand policy's loop)
Needs: perf, objdump (Linux).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CODE_BYTES = 1 << 16          # run_prefetch compiles to well under 64 KiB


def child(name: str, tokens: int, hidden: int, function: str, out: Path) -> None:
    # runs under perf: compile, dump the loop's code, then replay three times
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.jit import engine_module
    from tracekit.replay.plan import build_plan
    from tracekit.trace.synthetic import synthetic_trace

    tr = synthetic_trace(tokens=tokens, layers=32, experts=8, top_k=2, seed=0, hidden_dim=hidden,
                         with_router=hidden > 0)
    spec, plan, prof = policies.get(name), build_plan(tr), load_profile("h100-pcie5")
    kw = dict(router=tr.router, hidden_kind="full") if hidden else {}
    replay_one(spec, plan, 2, prof, **kw)
    cres = list(getattr(engine_module(spec), function).overloads.values())[0]
    addr = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    (out / "code.bin").write_bytes(ctypes.string_at(addr, min(CODE_BYTES, _mapped_after(addr))))
    (out / "code.addr").write_text(hex(addr))
    for _ in range(3):
        replay_one(spec, plan, 2, prof, **kw)


def _mapped_after(addr: int) -> int:
    # bytes from addr to the end of its memory mapping (reading past it would crash)
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return hi - addr
    raise RuntimeError(f"{addr:#x} is not mapped")


def report(out: Path, top: int) -> None:
    base = int((out / "code.addr").read_text(), 16)
    size = (out / "code.bin").stat().st_size          # what child() dumped (clamped to the mapping)
    ips = subprocess.run(["perf", "script", "-i", str(out / "perf.data"), "-F", "ip"], capture_output=True,
                         text=True, check=True).stdout.split()
    hits = collections.Counter(a for a in (int(x, 16) for x in ips) if base <= a < base + size)
    inside = sum(hits.values())
    print(f"{len(ips)} samples, {inside} ({100 * inside / max(1, len(ips)):.0f}%) in the loop")
    dis = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={base:#x}",
                          str(out / "code.bin")], capture_output=True, text=True, check=True).stdout
    ins = {}
    for line in dis.splitlines():
        head, _, rest = line.partition(":")
        try:
            ins[int(head.strip(), 16)] = rest.split("\t")[-1].strip()
        except ValueError:
            continue
    win = collections.Counter()
    for a, n in hits.items():
        win[(a - base) // 128] += n
    for w, n in win.most_common(top):
        print(f"\nwindow +{w * 128:#06x}: {100 * n / inside:.1f}% of the loop's samples")
        for a in sorted(x for x in ins if w * 128 <= x - base < (w + 1) * 128):
            if hits.get(a, 0) * 300 >= inside:       # instructions with >= 0.33% of the samples
                print(f"  +{a - base:#06x} {100 * hits[a] / inside:5.1f}%  {ins[a]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("--tokens", type=int, default=160000)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--function", default="run_prefetch", help="run_prefetch | run_demand | run")
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        child(a.policy, a.tokens, a.hidden, a.function, Path(a.child))
        return 0
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TRACEKIT_JIT_DIR=str(Path(d) / "jit"))
        env.pop("NUMBA_ENABLE_PROFILING", None)
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "5000", "-o", str(Path(d) / "perf.data"),
                        sys.executable, __file__, a.policy, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
                        "--function", a.function, "--child", d], env=env, check=True)
        report(Path(d), a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
