"""The demand-only replay loop, appended to each policy's compiled engine (see tracekit.replay.jit).

For policies that never prefetch (kind demand or oracle) and without --hybrid, the controller's
prefetch machinery is idle: no prediction is ever queued, so no expert is protected and every
demand miss evicts the policy's victim among all C residents. This loop runs exactly those
semantics with the same policy functions (on_access, on_insert, on_evict, victim, observe) and the
same cost model arithmetic, but keeps counters in registers and fuses the cost model into the
request loop. tests/test_replay_engines.py checks that it equals `run` (the controller) exactly.

Why the cost model fuses: with demand copies only, every copy a layer enqueues is one that the
same layer waits for, so when the next layer routes, the copy engine and every slot are free
(engine_free <= cursor <= t_route). A layer's j-th miss therefore lands at t_route + j * copy, and
hits compute without stalls, exactly as `layer_time` computes them (for a hit, ready <= t, so
max(t + f, ready + f / ch) is t + f in floating point too). The timeline's ready and slot_free arrays
are not kept; its accumulators are.
"""
# ruff: noqa: F821
import numpy as np
from numba import njit

from tracekit.replay.controller import add_demand_counts
from tracekit.replay.cost import (
    P_BYTES,
    P_CHUNKS,
    attn_seconds,
    copy_duration,
    demand_acc,
    expert_end,
    interp,
    store_demand_acc,
)


@njit(cache=True, _nrt=False)
def run_demand(ctl, st, tl, sc, ffn_tok, ffn_s, tok_ptr, decode, tok_ex, hid, req_ptr, req_e, req_ntok,
               req_next, observe_on):
    # Same arguments and result as `run` (less the prefetch/hybrid ones):
    # (total_s, decode_s, decode_tokens, decode_stall_s, decode_compute_s); fills ctl's counters and
    # residency and tl's accumulators (tl[2]) as `run` does.
    resident, slot_of, slot_owner, nres = ctl[0], ctl[1], ctl[2], ctl[3]
    S = decode.shape[0]
    L = tok_ex.shape[1]
    C = slot_owner.shape[1]
    dur = copy_duration(sc)
    ch = sc[P_CHUNKS]
    f1 = interp(ffn_tok, ffn_s, 1)
    n_req = n_hit = n_dreq = n_dhit = n_xfer = n_dxfer = n_evict = 0
    stall, compute, copy, nbytes, engine = demand_acc(tl)
    cursor = 0.0
    dec_time = 0.0
    dec_tok = 0
    dec_stall = 0.0
    dec_compute = 0.0
    for s in range(S):
        t0, t1 = tok_ptr[s], tok_ptr[s + 1]
        ntok = t1 - t0
        dec = decode[s] == 1
        start, stall0, comp0 = cursor, stall, compute
        attn = attn_seconds(sc, ntok)
        for l in range(L):
            pos = s * L + l
            a, b = req_ptr[pos], req_ptr[pos + 1]
            compute += attn
            t_route = cursor + attn
            t = t_route
            for i in range(a, b):
                e = np.int64(req_e[i])
                f = f1 if req_ntok[i] == 1 else interp(ffn_tok, ffn_s, req_ntok[i])
                k = slot_of[l, e]
                if k >= 0:                                   # hit: no stall (its copy landed long ago)
                    on_access(st, l, e, True, i, req_next[i])
                    n_hit += 1
                    if dec:
                        n_dhit += 1
                    end = t + f
                else:                                        # demand miss: copy, evicting the victim
                    if nres[l] < C:
                        k = 0
                        while slot_owner[l, k] >= 0:
                            k += 1
                        nres[l] += 1
                    else:
                        v = victim(st, l, slot_owner[l], C)
                        on_evict(st, l, v)
                        k = slot_of[l, v]
                        slot_of[l, v] = -1
                        resident[l, v] = 0
                        n_evict += 1
                    slot_of[l, e] = k
                    slot_owner[l, k] = e
                    resident[l, e] = 1
                    on_insert(st, l, e, i)
                    on_access(st, l, e, False, i, req_next[i])
                    n_xfer += 1
                    if dec:
                        n_dxfer += 1
                    engine = max(t_route, engine) + dur
                    copy += dur
                    nbytes += sc[P_BYTES]
                    end = expert_end(t, f, engine, ch)
                stall += end - (t + f)
                compute += f
                t = end
            n_req += b - a
            if dec:
                n_dreq += b - a
            cursor = t
            if observe_on:
                for j in range(t0, t1):
                    if tok_ex[j, l, 0] >= 0:
                        observe(st, l, tok_ex[j, l], hid[j, l])
        if dec:
            dec_time += cursor - start
            dec_tok += ntok
            dec_stall += stall - stall0
            dec_compute += compute - comp0
    add_demand_counts(ctl, n_req, n_hit, n_dreq, n_dhit, n_xfer, n_dxfer, n_evict)
    store_demand_acc(tl, stall, compute, copy, nbytes, engine)
    return cursor, dec_time, dec_tok, dec_stall, dec_compute
