"""gate-lookahead: apply layer L+1's router to layer L's hidden state (mixtral-offloading, AdapMoE).

Needs FULL hidden states (not a projection) and the router weights ctx.router [L, E, H], H = D.
After a token finishes layer l with hidden state h (float32[D]), `predict` computes the logits
router[l+1] @ h (float32 products, float64 accumulation in d order) and returns the top-`depth`
experts (ties: lower id) for layer l+1 of this step (dstep = 0). Nothing is predicted after the
last layer. The state keeps the router transposed, [L, D, E], so that the E sums run side by side.
Base eviction: LRU (the controller protects predictions).
"""

import numpy as np
from numba import njit

from tracekit.policies import NotApplicable, register
from tracekit.policies.base import (
    PolicySpec,
    dot_in_d_order,
    lru_access,
    lru_insert,
    lru_victim,
    noop_evict,
    noop_observe,
    top_valid_into,
)


def make_state(ctx):
    if ctx.hidden_dim == 0:
        raise NotApplicable("needs hidden states; trace has none")
    if ctx.hidden_kind.startswith("proj"):
        raise NotApplicable(f"needs full hidden states; trace has {ctx.hidden_kind}")
    if ctx.router is None:
        raise NotApplicable("needs router weights; trace has none")
    r = np.ascontiguousarray(ctx.router, dtype=np.float32)
    if r.shape != (ctx.num_layers, ctx.num_experts, ctx.hidden_dim):
        raise NotApplicable(f"router weights {r.shape} do not match "
                            f"[L, E, D] = {(ctx.num_layers, ctx.num_experts, ctx.hidden_dim)}")
    E = ctx.num_experts
    rt = np.ascontiguousarray(r.transpose(0, 2, 1))
    return (np.zeros((ctx.num_layers, E), dtype=np.int64),             # 0 last use [L, E]
            rt,                                                        # 1 router, transposed [L, D, E] float32
            np.array([max(1, ctx.depth or ctx.top_k)], dtype=np.int64),  # 2 depth [1]
            np.zeros(E, dtype=np.float64),                             # 3 logits scratch [E]
            np.zeros(E, dtype=np.int8))                                # 4 candidate scratch [E]


@njit(cache=True)
def predict(st, l, ex, hid, out):
    rt, depth, logit, taken = st[1], st[2][0], st[3], st[4]
    t = l + 1
    if t >= rt.shape[0]:
        return 0
    dot_in_d_order(rt[t], hid, logit)             # logit[e] = sum_d h[d] * router[t, e, d]
    for e in range(logit.shape[0]):
        taken[e] = 1                              # every expert is a candidate
    return top_valid_into(logit, taken, min(depth, logit.shape[0]), 0, t, out)


register(PolicySpec("gate-lookahead", "prefetch",
                    "apply layer L+1's router to layer L's hidden state (needs full hidden states + router)",
                    make_state, lru_access, lru_insert, noop_evict, lru_victim, noop_observe, predict))
