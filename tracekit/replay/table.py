"""Replay by transition table, for policies whose choices depend only on the ORDER they keep among a
layer's residents (`PolicySpec.order_state`: lru, fifo).

Such a policy's cache at one layer is always in one of finitely many states: the residents, in the
order the policy would evict them. `build_table` finds every state and transition by running the
policy's OWN functions (make_state, on_insert, on_access, on_evict, victim, with the controller's
demand-miss sequence), breadth first from the empty cache:

  T int32[S, E]   state after a request for expert e in state s
  H int8[S, E]    1: the request hits
  full int8[S]    1: the state holds C experts (a miss then evicts)

A state is named by its eviction order, probed with `victim` (which must be pure). `run_table` then
replays a Plan with two table loads per request and the cost model written without branches: the
same floating-point operations as `run_demand` in the same order, where a hit adds exact zeros and a
miss-only term is pushed below the max by subtracting 1e300. So results are bit-identical;
tests/test_replay_engines.py checks them against the controller and the demand loop on random traces
and a shared Mixtral trace. Tables are built only up to MAX_STATES states (E=8: C <= 4).
"""

from __future__ import annotations

from functools import lru_cache
from math import perm

import numpy as np
from numba import njit

from tracekit.policies import PolicyContext, PolicySpec
from tracekit.policies.base import NEVER
from tracekit.replay.controller import add_demand_counts
from tracekit.replay.cost import (
    P_BYTES,
    P_CHUNKS,
    attn_seconds,
    copy_duration,
    demand_acc,
    interp,
    store_demand_acc,
)

MAX_STATES = 4096


def n_states(E: int, C: int) -> int:
    """Ordered resident sets of size 0..C: the most states a table can need."""
    return sum(perm(E, k) for k in range(C + 1))


def applies(spec: PolicySpec, E: int, C: int) -> bool:
    return spec.order_state and not spec.prefetches and not spec.observes and n_states(E, C) <= MAX_STATES


def build_table(spec: PolicySpec, E: int, C: int):
    """-> (T int32[S, E], H int8[S, E], full int8[S], residents: list of slot-order lists per state)."""
    ctx = PolicyContext(1, E, C, 1, 0, "none", None, 1, {})
    cand = np.zeros(max(C, 1), dtype=np.int64)

    def order(st, slots):                 # eviction order of the residents (victim, then the next...)
        rem, out = list(slots), []
        while rem:
            cand[:len(rem)] = rem
            v = int(spec.victim(st, 0, cand, len(rem)))
            out.append(v)
            rem.remove(v)
        return tuple(out)

    reps = [(spec.make_state(ctx), [])]    # per state: a concrete policy state, residents in slot order
    index = {(): 0}
    T, H = [], []
    clock = 0
    q = 0
    while q < len(reps):
        st, slots = reps[q]
        q += 1
        row_t, row_h = [0] * E, [0] * E
        for e in range(E):
            s2 = tuple(a.copy() for a in st)
            sl = list(slots)
            clock += 1
            if e in sl:                                        # hit
                spec.on_access(s2, 0, e, True, clock, NEVER)
                row_h[e] = 1
            else:                                              # demand miss: first free slot, or the victim's
                if len(sl) < C:
                    sl.append(e)
                else:
                    cand[:C] = sl
                    v = int(spec.victim(s2, 0, cand, C))
                    spec.on_evict(s2, 0, v)
                    sl[sl.index(v)] = e
                spec.on_insert(s2, 0, e, clock)
                spec.on_access(s2, 0, e, False, clock, NEVER)
            key = order(s2, sl)
            if key not in index:
                index[key] = len(reps)
                reps.append((s2, sl))
            row_t[e] = index[key]
        T.append(row_t)
        H.append(row_h)
    full = np.array([len(sl) == C for _, sl in reps], dtype=np.int8)
    return (np.array(T, dtype=np.int32), np.array(H, dtype=np.int8), full, [sl for _, sl in reps])


@lru_cache(maxsize=64)
def run_tables(spec: PolicySpec, E: int, C: int):
    """build_table in run_table's layout, built once per (policy, E, C):
    -> (T, H, full as flat_tables gives them, residents)."""
    T, H, full, residents = build_table(spec, E, C)
    return (*flat_tables(T, H, full), residents)


def fill_residency(ctl, x, residents) -> None:
    """Write the final table states x int32[L] (row offsets) into the controller's residency arrays."""
    resident, slot_of, slot_owner, nres = ctl[0], ctl[1], ctl[2], ctl[3]
    E = resident.shape[1]
    for l, s in enumerate((x // E).tolist()):
        for k, e in enumerate(residents[s]):
            resident[l, e] = 1
            slot_of[l, e] = k
            slot_owner[l, k] = e
        nres[l] = len(residents[s])


def flat_tables(T, H, full):
    """run_table's layout: row offsets instead of state numbers, so a transition is one load at
    x + e. -> Tm int32[S*E] (E * next state), Hf int8[S*E], fullm int8[S*E] (full[s] on state s's row)."""
    E = T.shape[1]
    return ((T * E).astype(np.int32).ravel(), H.ravel().copy(),
            np.repeat(full, E).astype(np.int8))


@njit(cache=True, _nrt=False)
def run_table(ctl, tl, sc, ffn_tok, ffn_s, tok_ptr, decode, req_ptr, req_e, req_ntok, T, H, full, x):
    # As run_demand (same result tuple, counters and accumulators), with the policy as flat_tables'
    # T, H, full; x int32[L]: each layer's state as its row offset (0 = empty on entry), left at the
    # final states.
    S = decode.shape[0]
    L = x.shape[0]
    BIG = 1e300
    dur = copy_duration(sc)
    ch = sc[P_CHUNKS]
    eb = sc[P_BYTES]
    f1 = interp(ffn_tok, ffn_s, 1)
    f1ch = f1 / ch
    n_req = n_hit = n_dreq = n_dhit = n_evict = 0
    stall, compute, copy, nbytes, engine = demand_acc(tl)
    cursor = 0.0
    dec_time = 0.0
    dec_tok = 0
    dec_stall = 0.0
    dec_compute = 0.0
    for s in range(S):
        ntok = tok_ptr[s + 1] - tok_ptr[s]
        one = ntok == 1
        dec = decode[s] == 1
        start, stall0, comp0 = cursor, stall, compute
        attn = attn_seconds(sc, ntok)
        hits0 = n_hit
        for l in range(L):
            pos = s * L + l
            a, b = req_ptr[pos], req_ptr[pos + 1]
            compute += attn
            t_route = cursor + attn
            t = t_route
            xs = x[l]
            for i in range(a, b):
                e = req_e[i]
                h = H[xs + e]
                n_evict += (1 - h) * full[xs]
                xs = T[xs + e]
                n_hit += h
                hf = np.float64(h)
                if one:
                    f, fch = f1, f1ch
                else:
                    f = interp(ffn_tok, ffn_s, req_ntok[i])
                    fch = f / ch
                # miss: engine = max(t_route, engine) + dur, end = max(t + f, engine + f / ch);
                # hit: engine unchanged, end = t + f (the -1e300 terms lose both maxes). x - 0.0 == x,
                # so a miss adds exactly dur and f / ch; the terms are formed off the time chain
                big = BIG * hf
                engine = max(engine, max(t_route, engine) + (dur - big))
                tf = t + f
                end = max(tf, engine + (fch - big))
                stall += end - tf
                copy += dur * (1.0 - hf)
                nbytes += eb * (1.0 - hf)
                compute += f
                t = end
            x[l] = xs
            n_req += b - a
            if dec:
                n_dreq += b - a
            cursor = t
        if dec:
            n_dhit += n_hit - hits0
            dec_time += cursor - start
            dec_tok += ntok
            dec_stall += stall - stall0
            dec_compute += compute - comp0
    n_xfer = n_req - n_hit
    n_dxfer = n_dreq - n_dhit
    add_demand_counts(ctl, n_req, n_hit, n_dreq, n_dhit, n_xfer, n_dxfer, n_evict)
    store_demand_acc(tl, stall, compute, copy, nbytes, engine)
    return cursor, dec_time, dec_tok, dec_stall, dec_compute
