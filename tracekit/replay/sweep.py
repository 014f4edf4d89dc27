"""Run every (trace, policy, capacity) configuration, in parallel processes, with progress."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from tracekit import policies
from tracekit.policies import NotApplicable
from tracekit.replay.cost import Profile
from tracekit.replay.engine import replay_one
from tracekit.replay.metrics import add_belady_gap, metric_row, not_applicable_row
from tracekit.replay.plan import Plan, build_plan
from tracekit.trace import Trace, read_trace


@dataclass
class SweepConfig:
    policies: list[str]
    capacities: list[int]
    profile: Profile
    cap: int = 2                  # prefetches in flight
    depth: int = 0                # prefetch depth (0: top_k)
    token_steps: bool = False     # --steps tokens
    expert_bytes: float | None = None
    jobs: int = 0                 # 0: all cores
    hybrid: bool = False          # misses may be computed on the host CPU (issue 5)
    split: bool = False           # with hybrid: a layer's only miss may be split copy / CPU
    params: dict = field(default_factory=dict)


# Worker-process globals (filled before forking; children inherit them copy-on-write).
_PLANS: dict[str, tuple[Plan, Trace]] = {}
_CFG: SweepConfig | None = None


def _expert_bytes(trace: Trace, cfg: SweepConfig):
    return cfg.expert_bytes or trace.expert_bytes or None


def _one(job: tuple[str, str, int]) -> dict:
    name, policy, C = job
    plan, trace = _PLANS[name]
    spec = policies.get(policy)
    if C > trace.num_experts:
        return not_applicable_row(name, policy, spec.kind, C, f"capacity {C} > {trace.num_experts} experts")
    try:
        r = replay_one(spec, plan, C, _CFG.profile, cap=_CFG.cap, depth=_CFG.depth, router=trace.router,
                       hidden_kind=trace.hidden_kind, expert_bytes=_expert_bytes(trace, _CFG),
                       params=_CFG.params, hybrid=_CFG.hybrid, split=_CFG.split)
    except NotApplicable as exc:
        return not_applicable_row(name, policy, spec.kind, C, str(exc))
    return metric_row(name, policy, spec.kind, C, r)


def load_plans(paths: list[str], token_steps: bool) -> dict[str, tuple[Plan, Trace]]:
    out = {}
    for p in paths:
        t = read_trace(p)
        if token_steps:
            t = t.with_token_steps()
        name = os.path.basename(p)
        out[p if name in out else name] = (build_plan(t), t)     # same file name twice: full paths
    return out


def run_sweep(plans: dict[str, tuple[Plan, Trace]], cfg: SweepConfig,
              on_done: Callable[[dict], None] | None = None) -> list[dict]:
    global _CFG
    _PLANS.clear()
    _PLANS.update(plans)
    _CFG = cfg
    # Capacity-major order, so that parallel workers start on (and JIT-compile) different policies;
    # compiled code lands in the on-disk cache (tracekit.replay.jit) for every later process.
    # The slowest kinds go first (prefetching, then observing policies; the demand-only loop is
    # several times faster), so that no worker is left with a long job at the end.
    jobs = [(n, p, C) for n in plans for C in cfg.capacities for p in cfg.policies]
    jobs.sort(key=lambda j: (not policies.get(j[1]).prefetches, not policies.get(j[1]).observes))
    workers = cfg.jobs or os.cpu_count() or 1
    rows: list[dict] = []
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            rows.append(_one(j))
            if on_done:
                on_done(rows[-1])
    else:
        import multiprocessing as mp

        from tracekit.replay.jit import cache_dir

        cache_dir()                           # once, before the fork: the workers inherit it (and any warning)

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("fork")) as ex:
            for row in ex.map(_one, jobs, chunksize=1):
                rows.append(row)
                if on_done:
                    on_done(row)
    order = {(n, p, C): i for i, (n, p, C) in enumerate((n, p, C) for n in plans for p in cfg.policies
                                                        for C in cfg.capacities)}
    rows.sort(key=lambda r: order[(r["trace"], r["policy"], r["capacity"])])
    add_belady_gap(rows)
    return rows
