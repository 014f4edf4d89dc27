"""The replay engine: walk a Plan through one policy's controller and the cost model, in numba."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracekit.policies import PolicyContext, PolicySpec
from tracekit.replay import controller as ctlmod
from tracekit.replay import table as tbl
from tracekit.replay.cost import (
    A_BYTES,
    A_COMPUTE,
    A_COPY,
    A_CPU_BUSY,
    A_DEC_CPU_BUSY,
    A_STALL,
    P_BYTES,
    Profile,
    new_timeline,
)
from tracekit.replay.jit import engine_module  # per policy: run, run_demand, serve, after, finish
from tracekit.replay.plan import Plan


@dataclass
class ReplayResult:
    counters: dict
    total_s: float
    decode_s: float
    decode_tokens: int
    stall_s: float
    compute_s: float
    copy_s: float
    bytes: float
    decode_stall_s: float
    decode_compute_s: float
    expert_bytes: float
    cpu_busy_s: float = 0.0           # host CPU busy time of --hybrid misses, all steps
    decode_cpu_busy_s: float = 0.0    # ... of decode steps


def replay_one(spec: PolicySpec, plan: Plan, capacity: int, profile: Profile, *, cap: int = 2,
               depth: int = 0, router=None, hidden_kind: str = "none", expert_bytes=None,
               params: dict | None = None, hybrid: bool = False, split: bool = False,
               engine: str = "auto") -> ReplayResult:
    """Run one (policy, capacity) configuration. Raises NotApplicable when the trace lacks inputs.

    engine: "controller" walks the full controller (the code the live executor runs); "demand" the
    demand-only loop (policies that never prefetch, no hybrid; equal results, several times faster);
    "table" the transition-table loop (order-state policies, small E and C: tracekit.replay.table);
    "prefetch" the fused prefetching loop (prefetching policies, no hybrid; equal results);
    "auto" picks "table", else "demand", else "prefetch", wherever they apply."""
    ctx = PolicyContext(plan.L, plan.E, capacity, plan.K, plan.hid.shape[2], hidden_kind, router,
                        depth or plan.K, dict(params or {}))
    st = spec.make_state(ctx)
    ctl = ctlmod.new_controller(plan.L, plan.E, capacity, cap)
    tl = new_timeline(plan.L, plan.E, capacity)
    sc, ffn_tok, ffn_s = profile.vectors(expert_bytes, hybrid=hybrid)
    if hybrid:
        ctl = ctlmod.set_hybrid(ctl, profile, expert_bytes, split)
    cpu_tok, cpu_s = ctl[12], ctl[13]
    demand_ok = not spec.prefetches and not hybrid
    if engine == "demand" and not demand_ok:
        raise ValueError(f"the demand-only engine cannot run {spec.name} (prefetching or hybrid)")
    args = (ctl, st, tl, sc, ffn_tok, ffn_s, plan.tok_ptr, plan.decode, plan.tok_ex, plan.hid, plan.req_ptr,
            plan.req_e, plan.req_ntok, plan.req_next)
    prefetch_ok = spec.prefetches and not hybrid and plan.E <= 64
    if engine == "prefetch" and not prefetch_ok:
        raise ValueError(f"the prefetching engine cannot run {spec.name} (demand-only, hybrid or E > 64)")
    table_ok = demand_ok and tbl.applies(spec, plan.E, capacity)
    if engine == "table" and not table_ok:
        raise ValueError(f"the table engine cannot run {spec.name} at E={plan.E}, C={capacity}")
    if table_ok and engine in ("auto", "table"):
        T, H, full, residents = tbl.run_tables(spec, plan.E, capacity)
        x = np.zeros(plan.L, dtype=np.int32)
        res = tbl.run_table(ctl, tl, sc, ffn_tok, ffn_s, plan.tok_ptr, plan.decode, plan.req_ptr, plan.req_e,
                            plan.req_ntok, T, H, full, x)
        tbl.fill_residency(ctl, x, residents)
    elif demand_ok and engine != "controller":
        res = engine_module(spec).run_demand(*args, spec.observes)
    elif prefetch_ok and engine in ("auto", "prefetch"):
        res = engine_module(spec).run_prefetch(*args, True, spec.observes, np.zeros(plan.L, dtype=np.uint64))
    else:
        res = engine_module(spec).run(*args, spec.prefetches, spec.observes, hybrid, cpu_tok, cpu_s, ctlmod.action_rows(ctl))
    total, dec_s, dec_tok, dec_stall, dec_comp = res
    acc = tl[2]
    return ReplayResult(ctlmod.counters_dict(ctl), float(total), float(dec_s), int(dec_tok),
                        float(acc[A_STALL]), float(acc[A_COMPUTE]), float(acc[A_COPY]), float(acc[A_BYTES]),
                        float(dec_stall), float(dec_comp), float(sc[P_BYTES]), float(acc[A_CPU_BUSY]),
                        float(acc[A_DEC_CPU_BUSY]))
