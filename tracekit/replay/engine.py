"""The replay engine: walk a Plan through one policy's controller and the cost model, in numba."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

from tracekit.policies import PolicyContext, PolicySpec
from tracekit.replay import controller as ctlmod
from tracekit.replay.cost import A_BYTES, A_COMPUTE, A_COPY, A_STALL, Profile, layer_time, enqueue_copies, new_timeline
from tracekit.replay.plan import Plan


@lru_cache(maxsize=None)
def compile_engine(spec: PolicySpec):
    serve, after, finish = ctlmod.build(spec)

    @njit
    def run(ctl, st, tl, sc, ffn_tok, ffn_s, tok_ptr, decode, tok_ex, hid, req_ptr, req_e, req_ntok,
            req_next, predict_on):
        S = decode.shape[0]
        L = tok_ex.shape[1]
        act = np.zeros((4 * tok_ex.shape[2] * 64 + 1024, 5), dtype=np.int64)
        cursor = 0.0
        dec_time = 0.0
        dec_tok = 0
        for s in range(S):
            t0, t1 = tok_ptr[s], tok_ptr[s + 1]
            ntok = t1 - t0
            dec = decode[s] == 1
            start = cursor
            for l in range(L):
                pos = s * L + l
                a, b = req_ptr[pos], req_ptr[pos + 1]
                n = serve(ctl, st, pos, l, req_e[a:b], a, req_next[a:b], dec, act)
                cursor = layer_time(sc, ffn_tok, ffn_s, tl, act, n, req_ntok[a:b], ntok, cursor)
                m = after(ctl, st, pos, l, tok_ex[t0:t1, l], hid[t0:t1, l], dec, predict_on and dec, act)
                enqueue_copies(sc, tl, act, m, cursor)
            if dec:
                dec_time += cursor - start
                dec_tok += ntok
        finish(ctl)
        return cursor, dec_time, dec_tok

    return run


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


def replay_one(spec: PolicySpec, plan: Plan, capacity: int, profile: Profile, *, cap: int = 2,
               depth: int = 0, router=None, hidden_kind: str = "none", expert_bytes=None,
               params: dict | None = None) -> ReplayResult:
    """Run one (policy, capacity) configuration. Raises NotApplicable when the trace lacks inputs."""
    ctx = PolicyContext(plan.L, plan.E, capacity, plan.K, plan.hid.shape[2], hidden_kind, router,
                        depth or plan.K, dict(params or {}))
    st = spec.make_state(ctx)
    ctl = ctlmod.new_controller(plan.L, plan.E, capacity, cap)
    tl = new_timeline(plan.L, plan.E, capacity)
    sc, ffn_tok, ffn_s = profile.vectors(expert_bytes)
    run = compile_engine(spec)
    total, dec_s, dec_tok = run(ctl, st, tl, sc, ffn_tok, ffn_s, plan.tok_ptr, plan.decode, plan.tok_ex,
                                plan.hid, plan.req_ptr, plan.req_e, plan.req_ntok, plan.req_next,
                                spec.prefetches)
    acc = tl[2]
    return ReplayResult(ctlmod.counters_dict(ctl), float(total), float(dec_s), int(dec_tok),
                        float(acc[A_STALL]), float(acc[A_COMPUTE]), float(acc[A_COPY]), float(acc[A_BYTES]))
