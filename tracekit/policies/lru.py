"""lru: evict the least recently requested expert (demand baseline)."""

import numpy as np

from tracekit.policies import register
from tracekit.policies.base import (
    PolicySpec,
    lru_access,
    lru_insert,
    lru_victim,
    no_predict,
    noop_evict,
    noop_observe,
)


def make_state(ctx):
    return (np.zeros((ctx.num_layers, ctx.num_experts), dtype=np.int64),)   # last use [L, E]


register(PolicySpec("lru", "demand", "evict the least recently used expert", make_state,
                    lru_access, lru_insert, noop_evict, lru_victim, noop_observe, no_predict, order_state=True))
