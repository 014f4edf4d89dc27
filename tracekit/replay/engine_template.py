"""Controller + replay loop source, compiled once per policy (see tracekit.replay.jit).

This file is a TEMPLATE: tracekit.replay.jit writes a copy of it, with the policy's functions
bound to the names on_access, on_insert, on_evict, victim, observe and predict, into the JIT
cache folder, so that numba can cache the compiled code on disk per policy.
Semantics are documented in tracekit/replay/controller.py.
"""
# ruff: noqa: F821
import numpy as np
from numba import njit

from tracekit.replay.controller import (
    C_CPU,
    C_DEC_CPU,
    C_DEC_SPLIT,
    C_DEC_SPLIT_UNITS,
    C_DEC_XFER,
    C_DEMAND,
    C_DHIT,
    C_DREQ,
    C_EVICT,
    C_HIT,
    C_PF_DROPPED,
    C_PF_ISSUED,
    C_PF_USED,
    C_PF_WASTED,
    C_REQ,
    C_SPLIT,
    C_SPLIT_UNITS,
    C_XFER,
    CPU,
    HIT,
    MISS,
    PREFETCH,
    Q_CAP,
    Q_CLOCK,
    Q_HEAD,
    Q_INFLIGHT,
    Q_LEN,
    Q_TAIL,
    SPLIT,
    SPLIT_GRID,
)
from tracekit.replay.cost import attn_time, enqueue_copies, interp, layer_time

# {POLICY_BINDINGS}


@njit(cache=True, inline="always", _nrt=False)
def _evict(ctl, st, l, v):
    resident, slot_of, slot_owner, nres, pf, want = ctl[0], ctl[1], ctl[2], ctl[3], ctl[4], ctl[5]
    cnt, q = ctl[8], ctl[7]
    on_evict(st, l, v)
    if pf[l, v] == 2:
        cnt[C_PF_WASTED] += 1
        q[Q_INFLIGHT] -= 1
        pf[l, v] = 0
    want[l, v] = -1
    s = slot_of[l, v]
    resident[l, v] = 0
    slot_of[l, v] = -1
    slot_owner[l, s] = -1
    nres[l] -= 1
    cnt[C_EVICT] += 1
    return s

@njit(cache=True, inline="always", _nrt=False)
def _take_slot(ctl, st, l, demand):
    # A free slot, or evict the policy's victim. Returns (slot, victim or -1); slot -1: none free.
    # Candidates: resident experts not predicted (want < 0); a demand miss falls back to all.
    slot_owner, nres, want, cand = ctl[2], ctl[3], ctl[5], ctl[9]
    C = slot_owner.shape[1]
    if nres[l] < C:
        for s in range(C):
            if slot_owner[l, s] < 0:
                return s, -1
    n = 0
    for s in range(C):                    # branch-free: cand[n] is overwritten unless kept
        e = slot_owner[l, s]
        cand[n] = e
        n += want[l, e] < 0
    if n == 0:
        if not demand:
            return -1, -1
        for s in range(C):
            cand[s] = slot_owner[l, s]
        n = C
    v = victim(st, l, cand, n)
    return _evict(ctl, st, l, v), v

@njit(cache=True, inline="always", _nrt=False)
def _emit(act, n, kind, l, e, s, i):
    act[n, 0] = kind
    act[n, 1] = l
    act[n, 2] = e
    act[n, 3] = s
    act[n, 4] = i
    return n + 1

@njit(cache=True, inline="always", _nrt=False)
def _push(queue, q, l, e, t):
    # append (layer, expert, target) to the ring; the caller checks that it is not full
    k = q[Q_TAIL]
    queue[k, 0], queue[k, 1], queue[k, 2] = l, e, t
    q[Q_TAIL] = k + 1 if k + 1 < queue.shape[0] else 0
    q[Q_LEN] += 1

@njit(cache=True, inline="always", _nrt=False)
def _issue(ctl, st, pos, decode, act, n):
    resident, slot_of, slot_owner, nres, pf, want, queue, q, cnt = ctl[:9]
    while q[Q_INFLIGHT] < q[Q_CAP] and q[Q_LEN] > 0:
        h = q[Q_HEAD]
        l, e, t = queue[h, 0], queue[h, 1], queue[h, 2]
        q[Q_HEAD] = h + 1 if h + 1 < queue.shape[0] else 0
        q[Q_LEN] -= 1
        if pf[l, e] != 1 or want[l, e] != t:
            continue                      # stale duplicate
        if t <= pos:
            pf[l, e] = 0
            want[l, e] = -1
            cnt[C_PF_DROPPED] += 1
            continue
        want[l, e] = -1                   # do not protect it against its own slot search
        s, v = _take_slot(ctl, st, l, False)
        want[l, e] = t
        if s < 0:
            pf[l, e] = 0
            want[l, e] = -1
            cnt[C_PF_DROPPED] += 1
            continue
        resident[l, e] = 1
        slot_of[l, e] = s
        slot_owner[l, s] = e
        nres[l] += 1
        on_insert(st, l, e, q[Q_CLOCK])
        pf[l, e] = 2
        q[Q_INFLIGHT] += 1
        cnt[C_PF_ISSUED] += 1
        cnt[C_XFER] += 1
        if decode:
            cnt[C_DEC_XFER] += 1
        n = _emit(act, n, PREFETCH, l, e, s, -1)
    return n

@njit(cache=True, inline="always", _nrt=False)
def _serve(ctl, st, pos, l, req_e, a, b, now0, req_next, decode, act, hybrid, req_ntok, t_route):
    # requests req_e[a:b]; request i is number now0 + (i - a) and its action rows carry index i
    resident, slot_of, slot_owner, nres, pf, want, queue, q, cnt = ctl[:9]
    n = 0
    cnt[C_REQ] += b - a
    if decode:
        cnt[C_DREQ] += b - a
    if b > a:
        q[Q_CLOCK] = now0 + (b - 1 - a)       # the last request's number (prefetches issued below)
    nmiss = 0                                 # hybrid --split: the experts missing at routing time
    if hybrid and ctl[11][6] > 0:
        for i in range(a, b):
            nmiss += resident[l, np.int64(req_e[i])] == 0
    for i in range(a, b):
        e = np.int64(req_e[i])
        now = now0 + (i - a)
        if resident[l, e] == 1:
            cnt[C_HIT] += 1
            if decode:
                cnt[C_DHIT] += 1
            used = pf[l, e] == 2          # a resident expert's pf is 0 or 2 (branch-free)
            cnt[C_PF_USED] += used
            q[Q_INFLIGHT] -= used
            pf[l, e] = 0
            on_access(st, l, e, True, now, req_next[i])
            n = _emit(act, n, HIT, l, e, slot_of[l, e], i)
        else:
            if pf[l, e] == 1:             # queued but never issued: a miss
                pf[l, e] = 0
                cnt[C_PF_DROPPED] += 1
            k = SPLIT_GRID
            if hybrid:
                # --split: only a layer's single miss (with two, one goes each way and one is cached)
                k = _hybrid_choice(ctl[11], ctl[12], ctl[13], req_ntok[i], t_route, nmiss == 1)
            if k < SPLIT_GRID:            # the CPU computes the expert, or its rows [k F / GRID, F)
                on_access(st, l, e, False, now, req_next[i])
                if k == 0:
                    cnt[C_CPU] += 1
                    cnt[C_DEC_CPU] += decode
                    n = _emit(act, n, CPU, l, e, -1, i)
                else:
                    cnt[C_SPLIT] += 1
                    cnt[C_DEC_SPLIT] += decode
                    cnt[C_SPLIT_UNITS] += k
                    cnt[C_DEC_SPLIT_UNITS] += k * decode
                    n = _emit(act, n, SPLIT, l, e, k, i)
                continue
            s, v = _take_slot(ctl, st, l, True)
            resident[l, e] = 1
            slot_of[l, e] = s
            slot_owner[l, s] = e
            nres[l] += 1
            on_insert(st, l, e, now)
            on_access(st, l, e, False, now, req_next[i])
            cnt[C_DEMAND] += 1
            cnt[C_XFER] += 1
            if decode:
                cnt[C_DEC_XFER] += 1
            n = _emit(act, n, MISS, l, e, s, i)
    # retire predictions whose target (this step, this layer) has now been served (branch-free)
    wasted = 0
    dropped = 0
    for e in range(resident.shape[1]):
        w = want[l, e]
        done = (w >= 0) & (w <= pos)
        p = pf[l, e]
        wasted += done & (p == 2)
        dropped += done & (p == 1)
        pf[l, e] = 0 if done else p
        want[l, e] = -1 if done else w
    cnt[C_PF_WASTED] += wasted
    cnt[C_PF_DROPPED] += dropped
    q[Q_INFLIGHT] -= wasted
    return _issue(ctl, st, pos, decode, act, n)


@njit(cache=True, inline="always", _nrt=False)
def _hybrid_choice(hy, cpu_tok, cpu_s, ntok, t_route, may_split):
    # Hybrid miss: k of SPLIT_GRID parts of the expert's rows go by copy, the rest to the host CPU.
    # k = GRID: copy (cached); k = 0: CPU; else SPLIT (only if may_split). Whichever finishes first
    # by the expected times; hy = [engine_free, cpu_free, copy_s, act_s, cont_copy, cont_cpu, split].
    cs = max(t_route, hy[0])
    dc = hy[2] * hy[4]
    ps = max(t_route + hy[3], hy[1])
    dp = interp(cpu_tok, cpu_s, ntok) * hy[5]
    copy_end = cs + dc
    cpu_end = ps + dp + hy[3]
    k = SPLIT_GRID if copy_end <= cpu_end else 0
    best = min(copy_end, cpu_end)
    if may_split:
        # copy part ends at cs + x dc, CPU part at ps + (1 - x) dp + act: equal at x
        x = (ps + dp + hy[3] - cs) / (dc + dp)
        ks = min(SPLIT_GRID - 1, max(1, int(x * SPLIT_GRID + 0.5)))
        f = ks / SPLIT_GRID
        end = max(cs + f * dc, ps + (1.0 - f) * dp + hy[3])
        if end < best:
            hy[0] = cs + f * dc
            hy[1] = ps + (1.0 - f) * dp
            return ks
    if k == 0:
        hy[1] = ps + dp
    else:
        hy[0] = copy_end
    return k


@njit(cache=True, inline="always", _nrt=False)
def serve(ctl, st, pos, l, req_e, now0, req_next, decode, act):
    return _serve(ctl, st, pos, l, req_e, 0, req_e.shape[0], now0, req_next, decode, act, False, req_next, 0.0)


@njit(cache=True, inline="always", _nrt=False)
def serve_hybrid(ctl, st, pos, l, req_e, now0, req_next, decode, act, req_ntok, t_route, engine_free,
                 cpu_free):
    # serve, but each miss goes to the CPU or the copy engine, whichever the cost model says
    # finishes first (engine_free / cpu_free: the timeline's current estimates, in seconds).
    hy = ctl[11]
    hy[0] = engine_free
    hy[1] = cpu_free
    return _serve(ctl, st, pos, l, req_e, 0, req_e.shape[0], now0, req_next, decode, act, True, req_ntok,
                  t_route)


@njit(cache=True, inline="always", _nrt=False)
def after(ctl, st, pos, l, tok_ex, hid, t0, t1, col, decode, predict_on, act):
    # The step's tokens t0..t1 finished layer l: tok_ex int16[T, *, K] and hid float32[T, *, D]
    # (D may be 0) hold their experts and hidden states in column `col`.
    resident, pf, want, queue, q, cnt, pred = ctl[0], ctl[4], ctl[5], ctl[6], ctl[7], ctl[8], ctl[10]
    L = resident.shape[0]
    for b in range(t0, t1):
        if tok_ex[b, col, 0] >= 0:
            observe(st, l, tok_ex[b, col], hid[b, col])
    if predict_on:
        for b in range(t0, t1):
            if tok_ex[b, col, 0] < 0:
                continue
            m = predict(st, l, tok_ex[b, col], hid[b, col], pred)
            for r in range(m):
                dstep, tl, te = pred[r, 0], pred[r, 1], pred[r, 2]
                if tl < 0 or tl >= L:
                    continue
                t = pos + dstep * L + (tl - l)
                if t <= pos:
                    continue
                if resident[tl, te] == 1 or pf[tl, te] != 0:
                    if t > want[tl, te]:
                        want[tl, te] = t
                        if pf[tl, te] == 1 and q[Q_LEN] < queue.shape[0]:
                            _push(queue, q, tl, te, t)   # re-queue under the new target
                    continue
                if q[Q_LEN] >= queue.shape[0]:
                    cnt[C_PF_DROPPED] += 1
                    continue
                _push(queue, q, tl, te, t)
                pf[tl, te] = 1
                want[tl, te] = t
    return _issue(ctl, st, pos, decode, act, 0)

@njit(cache=True, _nrt=False)
def finish(ctl):
    # predictions still in flight at the end of the trace were never used
    pf, q, cnt = ctl[4], ctl[7], ctl[8]
    for l in range(pf.shape[0]):
        for e in range(pf.shape[1]):
            if pf[l, e] == 2:
                cnt[C_PF_WASTED] += 1
                q[Q_INFLIGHT] -= 1
                pf[l, e] = 0



@njit(cache=True, _nrt=False)
def run(ctl, st, tl, sc, ffn_tok, ffn_s, tok_ptr, decode, tok_ex, hid, req_ptr, req_e, req_ntok,
        req_next, predict_on, observe_on, hybrid, cpu_tok, cpu_s, act):
    # Walk every (step, layer): attention -> controller.serve -> cost of the layer ->
    # controller.after -> prefetch copies. act: int64[action_rows(ctl), 5] scratch.
    # Returns (total_s, decode_s, decode_tokens, decode_stall_s, decode_compute_s).
    S = decode.shape[0]
    L = tok_ex.shape[1]
    acc = tl[2]
    cursor = 0.0
    dec_time = 0.0
    dec_tok = 0
    dec_stall = 0.0
    dec_compute = 0.0
    for s in range(S):
        t0, t1 = tok_ptr[s], tok_ptr[s + 1]
        ntok = t1 - t0
        dec = decode[s] == 1
        start, stall0, comp0, cpu0 = cursor, acc[1], acc[2], acc[6]
        for l in range(L):
            pos = s * L + l
            a, b = req_ptr[pos], req_ptr[pos + 1]
            t_route = cursor + attn_time(sc, tl, ntok)
            if hybrid:
                hy = ctl[11]
                hy[0] = acc[0]
                hy[1] = acc[5]
                n = _serve(ctl, st, pos, l, req_e, a, b, a, req_next, dec, act, True, req_ntok, t_route)
            else:
                n = _serve(ctl, st, pos, l, req_e, a, b, a, req_next, dec, act, False, req_ntok, t_route)
            cursor = layer_time(sc, ffn_tok, ffn_s, cpu_tok, cpu_s, tl, act, n, req_ntok, t_route)
            if observe_on or (predict_on and dec):
                m = after(ctl, st, pos, l, tok_ex, hid, t0, t1, l, dec, predict_on and dec, act)
                enqueue_copies(sc, tl, act, m, cursor)
        if dec:
            dec_time += cursor - start
            dec_tok += ntok
            dec_stall += acc[1] - stall0
            dec_compute += acc[2] - comp0
            acc[7] += acc[6] - cpu0               # A_DEC_CPU_BUSY: the host's decode share (--hybrid)
    finish(ctl)
    return cursor, dec_time, dec_tok, dec_stall, dec_compute
