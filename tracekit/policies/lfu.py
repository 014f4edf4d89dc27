"""lfu: evict the least frequently used expert (demand baseline).

Frequency is counted only while the expert is cached: it is reset to 1 when the expert is
inserted and grows by one on every hit. Ties go to the expert inserted earliest.
"""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import PolicySpec, no_predict, noop_evict, noop_observe


def make_state(ctx):
    L, E = ctx.num_layers, ctx.num_experts
    return (np.zeros((L, E), dtype=np.int64),    # 0 frequency while cached [L, E]
            np.zeros((L, E), dtype=np.int64),    # 1 insertion number [L, E]
            np.zeros(1, dtype=np.int64))         # 2 insertion counter [1]


@njit(cache=True)
def on_access(st, l, e, hit, now, nxt):
    if hit:
        st[0][l, e] += 1


@njit(cache=True)
def on_insert(st, l, e, now):
    st[2][0] += 1
    st[0][l, e] = 1
    st[1][l, e] = st[2][0]


@njit(cache=True)
def victim(st, l, cand, n):
    freq, ins = st[0][l], st[1][l]
    best = cand[0]
    for i in range(1, n):
        e = cand[i]
        if freq[e] < freq[best] or (freq[e] == freq[best] and ins[e] < ins[best]):
            best = e
    return best


register(PolicySpec("lfu", "demand", "evict the least frequently used expert (while cached; ties: oldest)",
                    make_state, on_access, on_insert, noop_evict, victim, noop_observe, no_predict))
