"""ebco: the study's spatial co-activation graph, a demand policy.

State:
  W[l, a, b]   undirected co-activation weights at layer l: +1 to (a, b) and (b, a) for every pair
               of distinct experts co-selected by one token (learned in `observe`)
  last[l, w]   bitmask (uint64 words, expert e is bit e % 64 of word e // 64): the experts used by a
               token of the most recent step observed at layer l
  cur[l, w]    bitmask: the experts requested so far in the current step at layer l
  phase[l]     0 while a step's requests arrive at l (on_access), 1 once its tokens were observed
  lru[l, e]    last use (request index), for tie-breaks

The ACTIVE experts of layer l are last[l] | cur[l]: the previous step's experts plus the ones
requested so far in this step (the expert being loaded is not yet among them).
When full, the victim is the candidate c with the lowest score sum_{a active, a != c} W[l, c, a];
ties: least recently used, then lower id. (Scores are integers, so summing only over the active
experts' bits gives exactly the sum over all E.)
"""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import PolicySpec, no_predict, noop_evict
from tracekit.policies.bits import bit, lowest_bit


def make_state(ctx):
    L, E = ctx.num_layers, ctx.num_experts
    NW = (E + 63) // 64
    return (np.zeros((L, E, E), dtype=np.int64),   # 0 W co-activation [L, E, E]
            np.zeros((L, NW), dtype=np.uint64),    # 1 last: previous step's experts, bitmask [L, NW]
            np.zeros((L, NW), dtype=np.uint64),    # 2 cur: requested so far this step, bitmask [L, NW]
            np.ones(L, dtype=np.int8),             # 3 phase [L]
            np.zeros((L, E), dtype=np.int64))      # 4 lru last use [L, E]


@njit(cache=True)
def on_access(st, l, e, hit, now, nxt):
    cur, phase = st[2], st[3]
    if phase[l] == 1:              # first request of a new step at l
        for w in range(cur.shape[1]):
            cur[l, w] = 0
        phase[l] = 0
    cur[l, e >> 6] |= bit(e & 63)
    st[4][l, e] = now


@njit(cache=True)
def on_insert(st, l, e, now):
    st[4][l, e] = now


@njit(cache=True)
def observe(st, l, ex, hid):
    W, last, phase = st[0], st[1], st[3]
    if phase[l] == 0:              # first token of this step observed at l
        for w in range(last.shape[1]):
            last[l, w] = 0
        phase[l] = 1
    for i in range(ex.shape[0]):
        a = ex[i]
        if a < 0:
            continue
        last[l, a >> 6] |= bit(a & 63)
        for j in range(i + 1, ex.shape[0]):
            b = ex[j]
            if b >= 0 and b != a:
                W[l, a, b] += 1
                W[l, b, a] += 1


@njit(cache=True, inline="always")
def _score(W, last, cur, l, c):
    # sum of W[l, c, a] over the active experts a (W[l, c, c] stays 0: observe skips a == b)
    s = 0
    for w in range(last.shape[1]):
        m = last[l, w] | cur[l, w]
        while m:
            s += W[l, c, w * 64 + np.int64(lowest_bit(m))]
            m &= m - np.uint64(1)
    return s


@njit(cache=True)
def victim(st, l, cand, n):
    # the lowest score; ties: least recently used, then lower id (written as selects)
    W, last, cur, lru = st[0], st[1], st[2], st[4]
    best = cand[0]
    bs = _score(W, last, cur, l, best)
    bl = lru[l, best]
    for i in range(1, n):
        c = cand[i]
        s = _score(W, last, cur, l, c)
        u = lru[l, c]
        better = (s < bs) | ((s == bs) & ((u < bl) | ((u == bl) & (c < best))))
        best = c if better else best
        bs = s if better else bs
        bl = u if better else bl
    return best


register(PolicySpec("ebco", "demand", "co-activation graph: evict the expert least co-activated with the active ones",
                    make_state, on_access, on_insert, noop_evict, victim, observe, no_predict))
