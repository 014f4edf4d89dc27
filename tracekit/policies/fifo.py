"""fifo: evict the expert that was inserted earliest (demand baseline)."""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import (
    PolicySpec,
    argmin_cand,
    no_predict,
    noop_access,
    noop_evict,
    noop_observe,
)


def make_state(ctx):
    return (np.zeros((ctx.num_layers, ctx.num_experts), dtype=np.int64),   # insertion number [L, E]
            np.zeros(1, dtype=np.int64))                                   # insertion counter [1]


@njit(cache=True)
def on_insert(st, l, e, now):
    st[1][0] += 1
    st[0][l, e] = st[1][0]


@njit(cache=True)
def victim(st, l, cand, n):
    return argmin_cand(st[0][l], cand, n)   # oldest insertion (numbers are unique)


register(PolicySpec("fifo", "demand", "evict the expert inserted earliest", make_state,
                    noop_access, on_insert, noop_evict, victim, noop_observe, no_predict, order_state=True))
