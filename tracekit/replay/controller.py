"""The cache controller: residency, slots and the throttled prefetch queue, in numba.

The replay engine and the live executor call the SAME two functions per (step, layer):

  serve(ctl, st, pos, l, req_e, now0, req_next, decode, act) -> n_actions
      the layer's requests (distinct experts in (token, rank) order) arrive; hits and demand
      misses are decided, then queued prefetches are issued while the in-flight cap allows.
  after(ctl, st, pos, l, tok_ex, hid, decode, predict_on, act) -> n_actions
      the tokens have finished layer l: the policy observes them and predicts; prefetches are
      queued and issued while the cap allows.

pos = step_index * L + l is the position in the (step, layer) order. Actions are rows of
act int64[A, 5] = (kind, layer, expert, slot, request_index), kind in HIT / MISS / PREFETCH.

Prefetch semantics (deterministic, independent of timing, so replay and live agree exactly):
  a prediction targets (layer, step+dstep); it is queued (pf=1) unless resident; it is *issued*
  (a copy starts, pf=2, it occupies the in-flight cap) in FIFO order while fewer than `cap`
  are in flight; it stays in flight until its expert is requested (used) or its target (step,
  layer) has been served without it (wasted). A queued prefetch whose target passes is dropped.
  Predicted experts (want >= 0) are never evicted while a candidate exists.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

HIT, MISS, PREFETCH = 0, 1, 2
# counters
C_REQ, C_HIT, C_DREQ, C_DHIT, C_DEMAND, C_PF_ISSUED, C_PF_USED, C_PF_WASTED, C_PF_DROPPED, \
    C_DEC_XFER, C_EVICT, C_XFER = range(12)
N_COUNTERS = 12
COUNTER_NAMES = ("requests", "hits", "decode_requests", "decode_hits", "demand_transfers",
                 "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_dropped",
                 "decode_transfers", "evictions", "transfers")
# qstate slots
Q_HEAD, Q_TAIL, Q_INFLIGHT, Q_CAP, Q_CLOCK = range(5)


def new_controller(L: int, E: int, C: int, cap: int, pred_rows: int = 256):
    """Fresh controller state: a tuple of arrays (numba-friendly)."""
    qsize = max(64, L * E * 8)
    slot_owner = np.full((L, C), -1, dtype=np.int64)
    qstate = np.zeros(5, dtype=np.int64)
    qstate[Q_CAP] = cap
    return (
        np.zeros((L, E), dtype=np.int8),          # 0 resident
        np.full((L, E), -1, dtype=np.int64),      # 1 slot_of
        slot_owner,                               # 2 slot_owner [L, C]
        np.zeros(L, dtype=np.int64),              # 3 nres
        np.zeros((L, E), dtype=np.int8),          # 4 pf: 0 none, 1 queued, 2 in flight
        np.full((L, E), -1, dtype=np.int64),      # 5 want: target pos of a prediction, -1 none
        np.zeros((qsize, 3), dtype=np.int64),     # 6 queue ring (layer, expert, target)
        qstate,                                   # 7 head, tail, inflight, cap, clock
        np.zeros(N_COUNTERS, dtype=np.int64),     # 8 counters
        np.zeros(E, dtype=np.int8),               # 9 candidate scratch
        np.zeros((pred_rows, 3), dtype=np.int64),  # 10 prediction scratch
    )


def counters_dict(ctl) -> dict:
    return {k: int(v) for k, v in zip(COUNTER_NAMES, ctl[8])}


@lru_cache(maxsize=None)
def build(spec):
    """Compile serve/after/finish for one policy (cached per policy spec)."""
    on_access, on_insert, on_evict = spec.on_access, spec.on_insert, spec.on_evict
    victim, observe, predict = spec.victim, spec.observe, spec.predict

    @njit
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

    @njit
    def _take_slot(ctl, st, l, demand):
        # A free slot, or evict the policy's victim. Returns (slot, victim or -1); slot -1: none free.
        resident, slot_owner, nres, want, cand = ctl[0], ctl[2], ctl[3], ctl[5], ctl[9]
        C = slot_owner.shape[1]
        if nres[l] < C:
            for s in range(C):
                if slot_owner[l, s] < 0:
                    return s, -1
        E = resident.shape[1]
        any_c = False
        for e in range(E):
            c = resident[l, e] == 1 and want[l, e] < 0
            cand[e] = 1 if c else 0
            any_c = any_c or c
        if not any_c:
            if not demand:
                return -1, -1
            for e in range(E):
                cand[e] = resident[l, e]
        v = victim(st, l, cand)
        return _evict(ctl, st, l, v), v

    @njit
    def _emit(act, n, kind, l, e, s, i):
        act[n, 0] = kind
        act[n, 1] = l
        act[n, 2] = e
        act[n, 3] = s
        act[n, 4] = i
        return n + 1

    @njit
    def _issue(ctl, st, pos, decode, act, n):
        resident, slot_of, slot_owner, nres, pf, want, queue, q, cnt = ctl[:9]
        while q[Q_INFLIGHT] < q[Q_CAP] and q[Q_HEAD] != q[Q_TAIL]:
            h = q[Q_HEAD] % queue.shape[0]
            l, e, t = queue[h, 0], queue[h, 1], queue[h, 2]
            q[Q_HEAD] += 1
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

    @njit
    def serve(ctl, st, pos, l, req_e, now0, req_next, decode, act):
        resident, slot_of, slot_owner, nres, pf, want, queue, q, cnt = ctl[:9]
        n = 0
        for i in range(req_e.shape[0]):
            e = np.int64(req_e[i])
            now = now0 + i
            q[Q_CLOCK] = now
            cnt[C_REQ] += 1
            if decode:
                cnt[C_DREQ] += 1
            if resident[l, e] == 1:
                cnt[C_HIT] += 1
                if decode:
                    cnt[C_DHIT] += 1
                if pf[l, e] == 2:
                    cnt[C_PF_USED] += 1
                    q[Q_INFLIGHT] -= 1
                    pf[l, e] = 0
                on_access(st, l, e, True, now, req_next[i])
                n = _emit(act, n, HIT, l, e, slot_of[l, e], i)
            else:
                if pf[l, e] == 1:             # queued but never issued: a miss
                    pf[l, e] = 0
                    cnt[C_PF_DROPPED] += 1
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
        # retire predictions whose target (this step, this layer) has now been served
        for e in range(resident.shape[1]):
            if want[l, e] >= 0 and want[l, e] <= pos:
                if pf[l, e] == 2:
                    cnt[C_PF_WASTED] += 1
                    q[Q_INFLIGHT] -= 1
                elif pf[l, e] == 1:
                    cnt[C_PF_DROPPED] += 1
                pf[l, e] = 0
                want[l, e] = -1
        return _issue(ctl, st, pos, decode, act, n)

    @njit
    def after(ctl, st, pos, l, tok_ex, hid, decode, predict_on, act):
        # tok_ex: int16[B, K] experts of the step's tokens at layer l; hid: float32[B, D] (D may be 0)
        resident, pf, want, queue, q, cnt, pred = ctl[0], ctl[4], ctl[5], ctl[6], ctl[7], ctl[8], ctl[10]
        L = resident.shape[0]
        for b in range(tok_ex.shape[0]):
            if tok_ex[b, 0] >= 0:
                observe(st, l, tok_ex[b], hid[b])
        if predict_on:
            for b in range(tok_ex.shape[0]):
                if tok_ex[b, 0] < 0:
                    continue
                m = predict(st, l, tok_ex[b], hid[b], pred)
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
                            if pf[tl, te] == 1 and q[Q_TAIL] - q[Q_HEAD] < queue.shape[0]:
                                k = q[Q_TAIL] % queue.shape[0]   # re-queue under the new target
                                queue[k, 0], queue[k, 1], queue[k, 2] = tl, te, t
                                q[Q_TAIL] += 1
                        continue
                    if q[Q_TAIL] - q[Q_HEAD] >= queue.shape[0]:
                        cnt[C_PF_DROPPED] += 1
                        continue
                    k = q[Q_TAIL] % queue.shape[0]
                    queue[k, 0], queue[k, 1], queue[k, 2] = tl, te, t
                    q[Q_TAIL] += 1
                    pf[tl, te] = 1
                    want[tl, te] = t
        return _issue(ctl, st, pos, decode, act, 0)

    @njit
    def finish(ctl):
        # predictions still in flight at the end of the trace were never used
        pf, q, cnt = ctl[4], ctl[7], ctl[8]
        for l in range(pf.shape[0]):
            for e in range(pf.shape[1]):
                if pf[l, e] == 2:
                    cnt[C_PF_WASTED] += 1
                    q[Q_INFLIGHT] -= 1
                    pf[l, e] = 0

    return serve, after, finish
