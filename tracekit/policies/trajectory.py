"""trajectory: the study's centroid lookahead, a prefetching policy (needs hidden states).

State, learned online in `observe` (hidden states arrive as float32, maths in float64):
  cen[l, e, D]  running mean of the hidden states (entering layer l) of tokens routed to e at l
  cnt[l, e]     tokens routed to e at l
  nobs[l]       tokens observed at layer l
After a token finishes layer l with hidden state h, and once at least `warmup` tokens
(ctx.params["warmup"], default 16) have been observed at layer l+1, `predict` returns the
`depth` layer-(l+1) experts with cnt > 0 whose centroid is nearest to h by cosine
(ties: lower id; zero-norm centroids or h are skipped), for this step (dstep = 0).
Learning never stops after the warm-up. Base eviction: LRU.
"""

import math

import numpy as np
from numba import njit

from tracekit.policies import NotApplicable, register
from tracekit.policies.base import PolicySpec, lru_access, lru_insert, lru_victim, noop_evict, top_valid_into

WARMUP = 16


def make_state(ctx):
    if ctx.hidden_dim == 0:
        raise NotApplicable("needs hidden states; trace has none")
    L, E, D = ctx.num_layers, ctx.num_experts, ctx.hidden_dim
    warmup = int(ctx.params.get("warmup", WARMUP))
    return (np.zeros((L, E), dtype=np.int64),          # 0 last use [L, E]
            np.zeros((L, E, D), dtype=np.float64),     # 1 centroids [L, E, D]
            np.zeros((L, E), dtype=np.int64),          # 2 tokens per expert [L, E]
            np.zeros(L, dtype=np.int64),               # 3 tokens observed per layer [L]
            np.array([max(1, ctx.depth or ctx.top_k), warmup], dtype=np.int64),  # 4 depth, warmup
            np.zeros(E, dtype=np.float64),             # 5 score scratch [E]
            np.zeros(E, dtype=np.int8),                # 6 valid-score scratch [E]
            np.zeros((2, E), dtype=np.float64))        # 7 dot / squared-norm scratch [2, E]


@njit(cache=True)
def observe(st, l, ex, hid):
    cen, cnt, nobs = st[1], st[2], st[3]
    nobs[l] += 1
    for k in range(ex.shape[0]):
        e = ex[k]
        if e < 0:
            continue
        cnt[l, e] += 1
        n = float(cnt[l, e])
        for d in range(hid.shape[0]):
            cen[l, e, d] += (float(hid[d]) - cen[l, e, d]) / n


@njit(cache=True)
def predict(st, l, ex, hid, out):
    cen, cnt, nobs, par, score, ok = st[1], st[2], st[3], st[4], st[5], st[6]
    t = l + 1
    if t >= cnt.shape[0] or nobs[t] < par[1]:
        return 0
    hh = 0.0
    for d in range(hid.shape[0]):
        hh += float(hid[d]) * float(hid[d])
    if hh == 0.0:
        return 0
    # d outer, experts inner: E independent sums, each still added in d order (same results as one
    # expert at a time, without waiting on one long chain of dependent additions)
    acc = st[7]
    E = score.shape[0]
    for e in range(E):
        acc[0, e] = 0.0
        acc[1, e] = 0.0
    for d in range(hid.shape[0]):
        h = float(hid[d])
        for e in range(E):
            acc[0, e] += h * cen[t, e, d]
            acc[1, e] += cen[t, e, d] * cen[t, e, d]
    for e in range(E):
        ok[e] = 0
        if cnt[t, e] == 0:
            continue
        dot = acc[0, e]
        cc = acc[1, e]
        if cc == 0.0:
            continue
        score[e] = dot / (math.sqrt(hh) * math.sqrt(cc))
        ok[e] = 1
    return top_valid_into(score, ok, par[0], 0, t, out)


register(PolicySpec("trajectory", "prefetch",
                    "centroid lookahead: prefetch layer-L+1 experts nearest the hidden state (needs hidden states)",
                    make_state, lru_access, lru_insert, noop_evict, lru_victim, observe, predict))
