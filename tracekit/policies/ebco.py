"""ebco: the study's spatial co-activation graph, a demand policy.

State:
  W[l, a, b]   undirected co-activation weights at layer l: +1 to (a, b) and (b, a) for every pair
               of distinct experts co-selected by one token (learned in `observe`)
  last[l, e]   1 if e was used by a token of the most recent step observed at layer l
  cur[l, e]    1 if e was requested so far in the current step at layer l
  phase[l]     0 while a step's requests arrive at l (on_access), 1 once its tokens were observed
  lru[l, e]    last use (request index), for tie-breaks

The ACTIVE experts of layer l are last[l] | cur[l]: the previous step's experts plus the ones
requested so far in this step (the expert being loaded is not yet among them).
When full, the victim is the candidate c with the lowest score sum_{a active, a != c} W[l, c, a];
ties: least recently used, then lower id.
"""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import PolicySpec, no_predict, noop_evict


def make_state(ctx):
    L, E = ctx.num_layers, ctx.num_experts
    return (np.zeros((L, E, E), dtype=np.int64),   # 0 W co-activation [L, E, E]
            np.zeros((L, E), dtype=np.int8),       # 1 last: previous step's experts [L, E]
            np.zeros((L, E), dtype=np.int8),       # 2 cur: requested so far this step [L, E]
            np.ones(L, dtype=np.int8),             # 3 phase [L]
            np.zeros((L, E), dtype=np.int64))      # 4 lru last use [L, E]


@njit(cache=True)
def on_access(st, l, e, hit, now, nxt):
    cur, phase = st[2], st[3]
    if phase[l] == 1:              # first request of a new step at l
        cur[l, :] = 0
        phase[l] = 0
    cur[l, e] = 1
    st[4][l, e] = now


@njit(cache=True)
def on_insert(st, l, e, now):
    st[4][l, e] = now


@njit(cache=True)
def observe(st, l, ex, hid):
    W, last, phase = st[0], st[1], st[3]
    if phase[l] == 0:              # first token of this step observed at l
        last[l, :] = 0
        phase[l] = 1
    for i in range(ex.shape[0]):
        a = ex[i]
        if a < 0:
            continue
        last[l, a] = 1
        for j in range(i + 1, ex.shape[0]):
            b = ex[j]
            if b >= 0 and b != a:
                W[l, a, b] += 1
                W[l, b, a] += 1


@njit(cache=True)
def victim(st, l, cand, n):
    W, last, cur, lru = st[0], st[1], st[2], st[4]
    E = last.shape[1]
    best = -1
    best_s = 0
    for i in range(n):
        c = cand[i]
        s = 0
        for a in range(E):           # W[l, c, c] stays 0 (observe skips a == b): no a != c test
            s += W[l, c, a] * (last[l, a] | cur[l, a])
        if best < 0 or s < best_s or (s == best_s and (lru[l, c] < lru[l, best]
                                                       or (lru[l, c] == lru[l, best] and c < best))):
            best = c
            best_s = s
    return best


register(PolicySpec("ebco", "demand", "co-activation graph: evict the expert least co-activated with the active ones",
                    make_state, on_access, on_insert, noop_evict, victim, observe, no_predict))
