"""lru: evict the least recently requested expert (demand baseline)."""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import PolicySpec, argmin_masked, no_predict, noop_evict, noop_observe


def make_state(ctx):
    return (np.zeros((ctx.num_layers, ctx.num_experts), dtype=np.int64),)   # last use [L, E]


@njit(cache=True)
def on_access(st, l, e, hit, now, nxt):
    st[0][l, e] = now


@njit(cache=True)
def on_insert(st, l, e, now):
    st[0][l, e] = now


@njit(cache=True)
def victim(st, l, cand):
    return argmin_masked(st[0][l], cand)


register(PolicySpec("lru", "demand", "evict the least recently used expert", make_state,
                    on_access, on_insert, noop_evict, victim, noop_observe, no_predict))
