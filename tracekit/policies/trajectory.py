"""trajectory: the study's centroid lookahead, a prefetching policy (needs hidden states).

State, learned online in `observe` (hidden states arrive as float32, maths in float64):
  cent[l, D, e] running mean of the hidden states (entering layer l) of tokens routed to e at l,
                stored transposed so that predict's E dot products run side by side; the n-th
                token h routed to e updates it as c += (h - c) * (1.0 / n), in float64 (one
                division per token and expert, not one per dimension)
  norm[l, e]    |cent[l, :, e]| (sqrt of the squares summed in d order), kept up to date by observe
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
from tracekit.policies.base import (
    PolicySpec,
    dot_in_d_order,
    lru_access,
    lru_insert,
    lru_victim,
    noop_evict,
    top_valid_into,
)

WARMUP = 16


def make_state(ctx):
    if ctx.hidden_dim == 0:
        raise NotApplicable("needs hidden states; trace has none")
    L, E, D = ctx.num_layers, ctx.num_experts, ctx.hidden_dim
    warmup = int(ctx.params.get("warmup", WARMUP))
    return (np.zeros((L, E), dtype=np.int64),          # 0 last use [L, E]
            np.zeros((L, D, E), dtype=np.float64),     # 1 centroids, transposed [L, D, E]
            np.zeros((L, E), dtype=np.int64),          # 2 tokens per expert [L, E]
            np.zeros(L, dtype=np.int64),               # 3 tokens observed per layer [L]
            np.array([max(1, ctx.depth or ctx.top_k), warmup], dtype=np.int64),  # 4 depth, warmup
            np.zeros(E, dtype=np.float64),             # 5 score scratch [E]
            np.zeros(E, dtype=np.int8),                # 6 valid-score scratch [E]
            np.zeros((L, E), dtype=np.float64))        # 7 centroid norms [L, E]


@njit(cache=True)
def observe(st, l, ex, hid):
    # Experts are updated two at a time: each one's running mean and squares are the same operations
    # in the same d order as one at a time, but the two 64-long chains of
    # additions run side by side instead of one after the other.
    cent, cnt, nobs, norm = st[1], st[2], st[3], st[7]
    nobs[l] += 1
    k = 0
    while k < ex.shape[0]:
        e = ex[k]
        k += 1
        if e < 0:
            continue
        f = -1                                    # the next valid expert, to pair with e
        while k < ex.shape[0] and f < 0:
            f = ex[k]
            k += 1
        if f == e:                                # a repeated expert (not in valid traces): one at a time
            f = -1
            k -= 1
        cnt[l, e] += 1
        inv = 1.0 / float(cnt[l, e])
        if f < 0:
            sq = 0.0
            for d in range(hid.shape[0]):         # the running mean, and its squares in d order
                c = cent[l, d, e] + (float(hid[d]) - cent[l, d, e]) * inv
                cent[l, d, e] = c
                sq += c * c
            norm[l, e] = math.sqrt(sq)
            continue
        cnt[l, f] += 1
        inv2 = 1.0 / float(cnt[l, f])
        sq = 0.0
        sq2 = 0.0
        for d in range(hid.shape[0]):
            h = float(hid[d])
            c = cent[l, d, e] + (h - cent[l, d, e]) * inv
            c2 = cent[l, d, f] + (h - cent[l, d, f]) * inv2
            cent[l, d, e] = c
            cent[l, d, f] = c2
            sq += c * c
            sq2 += c2 * c2
        norm[l, e] = math.sqrt(sq)
        norm[l, f] = math.sqrt(sq2)


@njit(cache=True)
def predict(st, l, ex, hid, out):
    cent, cnt, nobs, par, score, ok, norm = st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    t = l + 1
    if t >= cnt.shape[0] or nobs[t] < par[1]:
        return 0
    # score[e] = sum_d h[d] * cent[t, d, e]; hh = |h|^2
    hh = dot_in_d_order(cent[t], hid, score)
    if hh == 0.0:
        return 0
    hn = math.sqrt(hh)
    for e in range(score.shape[0]):
        ok[e] = 0
        if cnt[t, e] == 0 or norm[t, e] == 0.0:   # no centroid yet, or a zero one
            continue
        score[e] = score[e] / (hn * norm[t, e])   # cosine
        ok[e] = 1
    return top_valid_into(score, ok, par[0], 0, t, out)


register(PolicySpec("trajectory", "prefetch",
                    "centroid lookahead: prefetch layer-L+1 experts nearest the hidden state (needs hidden states)",
                    make_state, lru_access, lru_insert, noop_evict, lru_victim, observe, predict))
