"""The fused prefetching replay loop, appended to each policy's compiled engine (see tracekit.replay.jit).

`run_prefetch` runs exactly the semantics of `run` (the controller loop: serve, layer_time, after,
enqueue_copies; docs in tracekit/replay/controller.py) without --hybrid, with the same policy
functions (on_access, on_insert, on_evict, victim, observe, predict) and the same cost-model
arithmetic in the same order, but keeps the counters, the prefetch queue's head/tail/length/in-flight
count and the timeline's accumulators in registers, writes no action rows, and keeps per layer a
bitmask of the experts with a pending prediction, so that retiring a layer's predictions visits only
those experts. tests/test_replay_engines.py checks it equal to `run` (counters and times).

Why the copy timeline needs no slot_free here: a slot's free time is set when an expert computed
from it finishes, which is never later than the cursor, and every copy is issued at t_route or at a
layer's end, both at or after the cursor; so max(t_issue, engine, slot_free) = max(t_issue, engine).
Why each request computes as soon as it is served: `layer_time` enqueues every copy of the layer
(demand misses in request order, then the prefetches `serve` issues) before computing, but no later
copy can change a requested expert's landing time. The layer's requests are distinct experts, and a
prefetch issued by `serve` copies only an expert still queued (pf = 1), while a requested expert's pf
is 0 after its request (a hit and a miss both set it to 0) and nothing queues it again before the
layer is computed.
"""
# ruff: noqa: F821
import numpy as np
from numba import njit

from tracekit.policies.bits import bit, lowest_bit
from tracekit.replay.controller import (
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
    C_XFER,
    Q_CAP,
    Q_CLOCK,
    Q_HEAD,
    Q_INFLIGHT,
    Q_LEN,
    Q_TAIL,
)
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


@njit(cache=True, inline="always", _nrt=False)
def _pf_victim(st, l, slot_owner, pend, cand, C, demand):
    # the expert to evict at a full layer: the policy's victim among residents not predicted
    # (want < 0: no pend bit); a demand miss falls back to all residents; -1: none (a prefetch is dropped)
    n = 0
    pl = pend[l]
    for s in range(C):
        e = slot_owner[l, s]
        cand[n] = e
        n += (pl & bit(e)) == 0
    if n == 0:
        if not demand:
            return -1
        for s in range(C):
            cand[s] = slot_owner[l, s]
        n = C
    return victim(st, l, cand, n)


@njit(cache=True, inline="always", _nrt=False)
def _slot_for(st, l, demand, slot_of, slot_owner, nres, pf, want, pend, cand):
    # controller._take_slot + _evict: a free slot of layer l, or the policy's victim's.
    # -> (slot or -1 when a prefetch finds no victim, evicted 0/1, the victim was in flight 0/1)
    C = slot_owner.shape[1]
    if nres[l] < C:
        k = 0
        while slot_owner[l, k] >= 0:
            k += 1
        nres[l] += 1
        return k, 0, 0
    v = _pf_victim(st, l, slot_owner, pend, cand, C, demand)
    if v < 0:
        return -1, 0, 0
    on_evict(st, l, v)
    w2 = pf[l, v] == 2
    pf[l, v] = 0
    if want[l, v] >= 0:
        want[l, v] = -1
        pend[l] &= ~bit(v)
    k = slot_of[l, v]
    slot_of[l, v] = -1
    return k, 1, np.int64(w2)


@njit(cache=True, inline="always", _nrt=False)
def _demand_miss(st, l, e, i, req_next, t_route, slot_of, slot_owner, nres, pf, want, pend, cand, ready, engine,
                 copy, nbytes, dur, nbytes1, n_drop, n_evict, n_wasted, infl):
    # request i (expert e of layer l) misses: a slot (evicting the policy's victim), and a copy enqueued
    # at t_route behind the layer's earlier copies. Returns the updated registers.
    if pf[l, e] == 1:                     # queued but never issued: a miss
        pf[l, e] = 0
        n_drop += 1
    k, ev, w2 = _slot_for(st, l, True, slot_of, slot_owner, nres, pf, want, pend, cand)
    slot_of[l, e] = k
    slot_owner[l, k] = e
    on_insert(st, l, e, i)
    on_access(st, l, e, False, i, req_next[i])
    engine = max(t_route, engine) + dur
    ready[l, e] = engine
    return engine, copy + dur, nbytes + nbytes1, n_drop, n_evict + ev, n_wasted + w2, infl - w2


@njit(cache=True, _nrt=False)
def run_prefetch(ctl, st, tl, sc, ffn_tok, ffn_s, tok_ptr, decode, tok_ex, hid, req_ptr, req_e, req_ntok,
                 req_next, predict_on, observe_on, pend):
    # Same arguments and result as `run` without hybrid: (total_s, decode_s, decode_tokens,
    # decode_stall_s, decode_compute_s); fills ctl (counters, residency, queue) and tl's accumulators.
    # pend: uint64[L] scratch (E <= 64): per layer, the experts with a pending prediction (want >= 0).
    resident, slot_of, slot_owner, nres, pf, want, queue, q, cnt, cand, pred = ctl[:11]
    ready = tl[0]
    S = decode.shape[0]
    L = tok_ex.shape[1]
    E = slot_of.shape[1]
    QN = queue.shape[0]
    dur = copy_duration(sc)
    ch = sc[P_CHUNKS]
    nbytes1 = sc[P_BYTES]
    f1 = interp(ffn_tok, ffn_s, 1)
    # counters and queue state in registers. Only the counters that cannot be derived are kept:
    # hits = requests - demand misses (every miss is one demand transfer), transfers = demand + issued,
    # used = in flight at the start + issued - wasted - in flight at the end (every prefetch leaves the
    # in-flight count used or wasted).
    n_dreq = n_dem = n_ddem = n_iss = n_diss = n_wasted = n_drop = n_evict = 0
    head, tail, qlen, infl, cap, clock = q[Q_HEAD], q[Q_TAIL], q[Q_LEN], q[Q_INFLIGHT], q[Q_CAP], q[Q_CLOCK]
    infl0 = infl
    stall, compute, copy, nbytes, engine = demand_acc(tl)
    for l in range(L):
        pend[l] = 0
        for e in range(E):
            if want[l, e] >= 0:
                pend[l] |= bit(e)
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
        if dec:
            n_dreq += req_ptr[(s + 1) * L] - req_ptr[s * L]
        for l in range(L):
            pos = s * L + l
            a, b = req_ptr[pos], req_ptr[pos + 1]
            compute += attn
            t_route = cursor + attn
            # ---- serve: hits and demand misses (copies enqueued at t_route, in request order)
            if b > a:
                clock = b - 1
            t = t_route
            for i in range(a, b):
                e = np.int64(req_e[i])
                if slot_of[l, e] >= 0:
                    infl -= pf[l, e] == 2         # used (a resident expert's pf is 0 or 2)
                    pf[l, e] = 0
                    on_access(st, l, e, True, i, req_next[i])
                else:
                    engine, copy, nbytes, n_drop, n_evict, n_wasted, infl = _demand_miss(
                        st, l, e, i, req_next, t_route, slot_of, slot_owner, nres, pf, want, pend, cand, ready,
                        engine, copy, nbytes, dur, nbytes1, n_drop, n_evict, n_wasted, infl)
                    n_dem += 1
                    n_ddem += dec
                # compute it now: its landing time is final (see the module's docstring)
                f = f1 if req_ntok[i] == 1 else interp(ffn_tok, ffn_s, req_ntok[i])
                end = expert_end(t, f, ready[l, e], ch)
                stall += end - (t + f)
                compute += f
                t = end
            cursor = t
            # ---- retire this layer's predictions whose target has been served
            m = pend[l]
            keep = m
            while m:
                e = np.int64(lowest_bit(m))
                low = m & ~(m - np.uint64(1))
                m ^= low
                w = want[l, e]
                done = w <= pos
                p = pf[l, e]
                n_wasted += done & (p == 2)
                n_drop += done & (p == 1)
                infl -= done & (p == 2)
                pf[l, e] = 0 if done else p
                want[l, e] = -1 if done else w
                keep = keep ^ low if done else keep
            pend[l] = keep
            # ---- issue queued prefetches (copies at t_route, after the demand copies)
            head, qlen, infl, engine, copy, nbytes, n_iss, n_diss, n_drop, n_wasted, n_evict = _pf_issue(
                st, pos, dec, t_route, clock, slot_of, slot_owner, nres, pf, want, pend, queue, cand, ready, head,
                qlen, infl, cap, engine, copy, nbytes, dur, nbytes1, n_iss, n_diss, n_drop, n_wasted, n_evict)
            # ---- after: observe, predict, queue, issue (copies at the layer's end)
            if not (observe_on or (predict_on and dec)):
                continue
            for j in range(t0, t1):
                if tok_ex[j, l, 0] >= 0:
                    observe(st, l, tok_ex[j, l], hid[j, l])
            if predict_on and dec:
                for j in range(t0, t1):
                    if tok_ex[j, l, 0] < 0:
                        continue
                    mp = predict(st, l, tok_ex[j, l], hid[j, l], pred)
                    for r in range(mp):
                        tl_, te = pred[r, 1], pred[r, 2]
                        if tl_ < 0 or tl_ >= L:
                            continue
                        tt = pos + pred[r, 0] * L + (tl_ - l)
                        if tt <= pos:
                            continue
                        # as `after`, written with selects (whether te is resident or pending is
                        # unpredictable): a new prediction is queued (pf = 1); a resident or pending
                        # one takes the later target, and a queued one is re-queued under it. An
                        # expert neither resident nor pending has want = -1, so want = max(want, tt)
                        # in every case, and its pend bit is set whenever want >= 0.
                        p = pf[tl_, te]
                        w = want[tl_, te]
                        new = (slot_of[tl_, te] < 0) & (p == 0)
                        if qlen >= QN:                # rare: a full queue takes nothing
                            n_drop += new
                            if new:
                                continue
                        else:
                            queue[tail, 0], queue[tail, 1], queue[tail, 2] = tl_, te, tt
                            push = new | ((tt > w) & (p == 1))
                            nt = tail + 1 if tail + 1 < QN else 0
                            tail = nt if push else tail
                            qlen += push
                        pf[tl_, te] = 1 if new else p
                        want[tl_, te] = max(w, tt)
                        pend[tl_] |= bit(te)
            head, qlen, infl, engine, copy, nbytes, n_iss, n_diss, n_drop, n_wasted, n_evict = _pf_issue(
                st, pos, dec, cursor, clock, slot_of, slot_owner, nres, pf, want, pend, queue, cand, ready, head,
                qlen, infl, cap, engine, copy, nbytes, dur, nbytes1, n_iss, n_diss, n_drop, n_wasted, n_evict)
        if dec:
            dec_time += cursor - start
            dec_tok += ntok
            dec_stall += stall - stall0
            dec_compute += compute - comp0
    # predictions still in flight at the end were never used (controller `finish`)
    for l in range(L):
        for e in range(E):
            if pf[l, e] == 2:
                n_wasted += 1
                infl -= 1
                pf[l, e] = 0
            resident[l, e] = slot_of[l, e] >= 0
    n_req = req_ptr[S * L] - req_ptr[0]
    cnt[C_REQ] += n_req
    cnt[C_HIT] += n_req - n_dem
    cnt[C_DREQ] += n_dreq
    cnt[C_DHIT] += n_dreq - n_ddem
    cnt[C_DEMAND] += n_dem
    cnt[C_PF_ISSUED] += n_iss
    cnt[C_PF_USED] += infl0 + n_iss - n_wasted - infl
    cnt[C_PF_WASTED] += n_wasted
    cnt[C_PF_DROPPED] += n_drop
    cnt[C_DEC_XFER] += n_ddem + n_diss
    cnt[C_EVICT] += n_evict
    cnt[C_XFER] += n_dem + n_iss
    q[Q_HEAD], q[Q_TAIL], q[Q_LEN], q[Q_INFLIGHT], q[Q_CLOCK] = head, tail, qlen, infl, clock
    store_demand_acc(tl, stall, compute, copy, nbytes, engine)
    return cursor, dec_time, dec_tok, dec_stall, dec_compute


@njit(cache=True, inline="always", _nrt=False)
def _pf_issue(st, pos, dec, t_issue, clock, slot_of, slot_owner, nres, pf, want, pend, queue, cand, ready, head,
              qlen, infl, cap, engine, copy, nbytes, dur, nbytes1, n_iss, n_diss, n_drop, n_wasted, n_evict):
    # controller._issue: queued prefetches start, in FIFO order, while fewer than cap are in flight;
    # each copy is enqueued on the engine at t_issue. Returns the updated registers.
    QN = queue.shape[0]
    while infl < cap and qlen > 0:
        l, e, t = queue[head, 0], queue[head, 1], queue[head, 2]
        head = head + 1 if head + 1 < QN else 0
        qlen -= 1
        if pf[l, e] != 1 or want[l, e] != t:
            continue                          # stale duplicate
        k = -1
        ev = w2 = 0
        if t > pos:                           # else: its target has passed
            # (e is not resident, so its own want never protects it against its slot search)
            k, ev, w2 = _slot_for(st, l, False, slot_of, slot_owner, nres, pf, want, pend, cand)
            n_evict += ev
            n_wasted += w2
            infl -= w2
        if k < 0:
            pf[l, e] = 0
            want[l, e] = -1
            pend[l] &= ~bit(e)
            n_drop += 1
            continue
        slot_of[l, e] = k
        slot_owner[l, k] = e
        on_insert(st, l, e, clock)
        pf[l, e] = 2
        infl += 1
        n_iss += 1
        n_diss += dec
        engine = max(t_issue, engine) + dur
        copy += dur
        nbytes += nbytes1
        ready[l, e] = engine
    return head, qlen, infl, engine, copy, nbytes, n_iss, n_diss, n_drop, n_wasted, n_evict
