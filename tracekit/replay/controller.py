"""The cache controller: residency, slots and the throttled prefetch queue, in numba.

The replay engine and the live executor call the SAME two functions per (step, layer):

  serve(ctl, st, pos, l, req_e, now0, req_next, decode, act) -> n_actions
      the layer's requests (distinct experts in (token, rank) order) arrive; hits and demand
      misses are decided, then queued prefetches are issued while the in-flight cap allows.
  after(ctl, st, pos, l, tok_ex, hid, t0, t1, col, decode, predict_on, act) -> n_actions
      tokens t0..t1 have finished layer l (their experts tok_ex[t, col] int16[K], hidden states
      hid[t, col]): the policy observes them and predicts; prefetches are queued and issued while
      the cap allows.

pos = step_index * L + l is the position in the (step, layer) order. Actions are rows of
act int64[A, 5] = (kind, layer, expert, slot, request_index), kind in HIT / MISS / PREFETCH
(and, with hybrid, CPU / SPLIT; see below).

Prefetch semantics (deterministic, independent of timing, so replay and live agree exactly):
  a prediction targets (layer, step+dstep); it is queued (pf=1) unless resident; it is *issued*
  (a copy starts, pf=2, it occupies the in-flight cap) in FIFO order while fewer than `cap`
  are in flight; it stays in flight until its expert is requested (used) or its target (step,
  layer) has been served without it (wasted). A queued prefetch whose target passes is dropped.
  Predicted experts (want >= 0) are never evicted while a candidate exists.
"""

from __future__ import annotations

import numpy as np
from numba import njit

HIT, MISS, PREFETCH, CPU, SPLIT = 0, 1, 2, 3, 4
# CPU: a hybrid miss computed on the host, not cached. SPLIT (hybrid --split): a miss whose
# intermediate rows [0, k F / SPLIT_GRID) are copied to a staging buffer and computed on the GPU while
# the host computes the rest; not cached; its action row carries k in the slot column.
SPLIT_GRID = 64
# counters
C_REQ, C_HIT, C_DREQ, C_DHIT, C_DEMAND, C_PF_ISSUED, C_PF_USED, C_PF_WASTED, C_PF_DROPPED, \
    C_DEC_XFER, C_EVICT, C_XFER, C_CPU, C_DEC_CPU, C_SPLIT, C_DEC_SPLIT, C_SPLIT_UNITS, \
    C_DEC_SPLIT_UNITS = range(18)
N_COUNTERS = 18
COUNTER_NAMES = ("requests", "hits", "decode_requests", "decode_hits", "demand_transfers",
                 "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_dropped",
                 "decode_transfers", "evictions", "transfers", "cpu_misses", "decode_cpu_misses",
                 "split_misses", "decode_split_misses", "split_units", "decode_split_units")
# qstate slots: ring positions of the queue's head and tail (wrapped), in flight, cap, clock, length
Q_HEAD, Q_TAIL, Q_INFLIGHT, Q_CAP, Q_CLOCK, Q_LEN = range(6)


@njit(cache=True, inline="always")
def add_demand_counts(ctl, n_req, n_hit, n_dreq, n_dhit, n_xfer, n_dxfer, n_evict):
    # the counters of a demand-only loop (every transfer is a demand transfer)
    cnt = ctl[8]
    cnt[C_REQ] += n_req
    cnt[C_HIT] += n_hit
    cnt[C_DREQ] += n_dreq
    cnt[C_DHIT] += n_dhit
    cnt[C_DEMAND] += n_xfer
    cnt[C_XFER] += n_xfer
    cnt[C_DEC_XFER] += n_dxfer
    cnt[C_EVICT] += n_evict


def new_controller(L: int, E: int, C: int, cap: int, pred_rows: int = 256):
    """Fresh controller state: a tuple of arrays (numba-friendly)."""
    qsize = max(64, L * E * 8)
    slot_owner = np.full((L, C), -1, dtype=np.int64)
    qstate = np.zeros(6, dtype=np.int64)
    qstate[Q_CAP] = cap
    return (
        np.zeros((L, E), dtype=np.int8),          # 0 resident
        np.full((L, E), -1, dtype=np.int64),      # 1 slot_of
        slot_owner,                               # 2 slot_owner [L, C]
        np.zeros(L, dtype=np.int64),              # 3 nres
        np.zeros((L, E), dtype=np.int8),          # 4 pf: 0 none, 1 queued, 2 in flight
        np.full((L, E), -1, dtype=np.int64),      # 5 want: target pos of a prediction, -1 none
        np.zeros((qsize, 3), dtype=np.int64),     # 6 queue ring (layer, expert, target)
        qstate,                                   # 7 head, tail, inflight, cap, clock, length
        np.zeros(N_COUNTERS, dtype=np.int64),     # 8 counters
        np.zeros(E, dtype=np.int64),              # 9 candidate scratch (expert ids)
        np.zeros((pred_rows, 3), dtype=np.int64),  # 10 prediction scratch
        np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]),  # 11 hybrid: engine_free, cpu_free, copy_s,
                                                   #    act_s, contention on copies, on CPU, split mode
        np.ones(1),                               # 12 CPU FFN table: tokens
        np.ones(1),                               # 13 CPU FFN table: seconds
    )


def set_hybrid(ctl, profile, expert_bytes=None, split: bool = False):
    """Give the controller the profile's CPU and copy costs, for serve_hybrid's choice.
    split: a layer's only miss may be split between the copy engine and the CPU (kind SPLIT)."""
    if not profile.cpu_ffn_ms:
        from tracekit.errors import UserError

        raise UserError(f"profile {profile.name!r} has no cpu_ffn_ms table; hybrid needs one")
    sc, _, _ = profile.vectors(expert_bytes)
    tok, sec = profile.cpu_table()
    hy = ctl[11]
    hy[2] = profile.copy_seconds(expert_bytes)
    hy[3] = profile.act_copy_us * 1e-6
    hy[4] = profile.contention_copy
    hy[5] = profile.contention_cpu
    hy[6] = 1.0 if split else 0.0
    return ctl[:12] + (tok, sec)


def split_at(k: int, F: int) -> int:
    """The first intermediate row (of F) the host computes in a SPLIT miss of k / SPLIT_GRID copied; the
    GPU computes rows [0, split_at)."""
    return k * F // SPLIT_GRID


def experts_copied(counters: dict, decode: bool = False) -> float:
    """Experts' worth of bytes copied: whole transfers plus the copied parts of SPLIT misses."""
    if decode:
        return counters["decode_transfers"] + counters["decode_split_units"] / SPLIT_GRID
    return counters["transfers"] + counters["split_units"] / SPLIT_GRID


def action_rows(ctl) -> np.ndarray:
    """Scratch for the action rows one serve/after call can emit: int64[rows, 5]."""
    return np.zeros((2 * ctl[0].shape[1] + 2 * ctl[6].shape[0] + 8, 5), dtype=np.int64)


def counters_dict(ctl) -> dict:
    return {k: int(v) for k, v in zip(COUNTER_NAMES, ctl[8])}


def build(spec):
    """(serve, after, finish) compiled for one policy; cached on disk per policy."""
    from tracekit.replay.jit import engine_module

    m = engine_module(spec)
    return m.serve, m.after, m.finish
