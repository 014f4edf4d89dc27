"""belady: offline optimal demand paging (MIN). An ORACLE bound: it reads the future."""

import numpy as np
from numba import njit

from tracekit.policies import register
from tracekit.policies.base import (
    PolicySpec,
    argmax_cand,
    no_predict,
    noop_evict,
    noop_insert,
    noop_observe,
)


def make_state(ctx):
    return (np.zeros((ctx.num_layers, ctx.num_experts), dtype=np.int64),)   # next use [L, E]


@njit(cache=True)
def on_access(st, l, e, hit, now, nxt):
    st[0][l, e] = nxt


@njit(cache=True)
def victim(st, l, cand, n):
    return argmax_cand(st[0][l], cand, n)   # farthest next use; ties -> lowest expert id


register(PolicySpec("belady", "oracle", "oracle bound: evict the expert whose next request is farthest",
                    make_state, on_access, noop_insert, noop_evict, victim, noop_observe, no_predict))
