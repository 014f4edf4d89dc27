"""markov: the study's temporal chain, a prefetching policy.

State, learned online in `observe`:
  P[l, a, b]  counts of "expert a at token t, expert b at token t+1" at layer l
  prev[l, K]  experts of the last token observed at layer l (-1: none yet)
Tokens form one chain per layer in observation order (trace order); with a batch of several
sequences per decode step the chain runs across the batch's tokens, as in a single stream.

After a token finishes layer l with experts ex, `predict` scores every expert b by
sum_{a in ex} P[l, a, b] and predicts the `depth` best (score > 0; ties: lower id) for the
NEXT step at the same layer (dstep = 1). Base eviction: LRU (the controller protects predictions).
"""

import numpy as np
from numba import njit

from tracekit.policies import NotApplicable, register
from tracekit.policies.base import PolicySpec, lru_access, lru_insert, lru_victim, noop_evict


def make_state(ctx):
    L, E, K = ctx.num_layers, ctx.num_experts, ctx.top_k
    if E > 1024:
        raise NotApplicable(f"markov supports at most 1024 experts, not {E}")
    return (np.zeros((L, E), dtype=np.int64),          # 0 last use [L, E]
            np.zeros((L, E, E), dtype=np.int64),       # 1 transition counts P [L, E, E]
            np.full((L, K), -1, dtype=np.int64),       # 2 previous token's experts [L, K]
            np.array([max(1, ctx.depth or K)], dtype=np.int64),   # 3 depth [1]
            np.zeros(E, dtype=np.int64))               # 4 score key scratch [E]


@njit(cache=True)
def observe(st, l, ex, hid):
    P, prev = st[1], st[2]
    if prev.shape[1] == 2 and ex.shape[0] == 2:
        # top-2 (the default): the four counts with the ids in registers
        a0, a1, b0, b1 = prev[l, 0], prev[l, 1], np.int64(ex[0]), np.int64(ex[1])
        if a0 >= 0 and a1 >= 0 and b0 >= 0 and b1 >= 0:
            P[l, a0, b0] += 1
            P[l, a0, b1] += 1
            P[l, a1, b0] += 1
            P[l, a1, b1] += 1
            prev[l, 0], prev[l, 1] = b0, b1
            return
    for i in range(prev.shape[1]):
        a = prev[l, i]
        if a < 0:
            continue
        for j in range(ex.shape[0]):
            b = ex[j]
            if b >= 0:
                P[l, a, b] += 1
    for i in range(prev.shape[1]):
        prev[l, i] = ex[i] if i < ex.shape[0] else -1


@njit(cache=True)
def predict(st, l, ex, hid, out):
    # score[b] = sum_a P[l, a, b] as an int64 key score * 1024 + (1023 - b), so that one max() picks
    # the best score and, among ties, the lowest id (branch-free; E <= 1024). Keys are distinct, so
    # the r-th best is the largest key below the (r-1)-th: nothing is written back between passes.
    P, key = st[1], st[4]
    E = key.shape[0]
    n = min(st[3][0], out.shape[0])
    if n == 2 and ex.shape[0] == 2 and ex[0] >= 0 and ex[1] >= 0:
        # the default (depth = top_k = 2): the two best keys in one pass, nothing stored; with 8
        # experts (Mixtral) as a tournament, whose chain of max/min is 3 levels deep instead of 8
        # (markov's replay 1.075x faster on one VM and 1.15x on a Xeon, medians of A/B rounds,
        # docs/benchmarks.md session 14)
        a0, a1 = ex[0], ex[1]
        p, q = P[l, a0], P[l, a1]
        if E == 8:
            b1, b2 = _top2_of_8(p, q)
        else:
            b1 = b2 = np.int64(-1)
            for b in range(E):
                v = _key(p, q, b)
                b2 = max(b2, min(v, b1))
                b1 = max(b1, v)
        if b1 < 1024:                             # only experts ever seen to follow (score > 0)
            return 0
        _row(out, 0, l, b1)
        if b2 < 1024:
            return 1
        _row(out, 1, l, b2)
        return 2
    for b in range(E):
        key[b] = 1023 - b
    for i in range(ex.shape[0]):
        a = ex[i]
        if a < 0:
            continue
        for b in range(E):
            key[b] += P[l, a, b] << 10
    k = 0
    prev = np.int64(1) << 62
    for _ in range(n):
        best = np.int64(-1)
        for b in range(E):
            v = key[b]
            best = max(best, v if v < prev else -1)
        if best < 1024:                           # only experts ever seen to follow (score > 0)
            break
        prev = best
        _row(out, k, l, best)
        k += 1
    return k


@njit(cache=True, inline="always")
def _key(p, q, b):
    # expert b's key for the depth-2 prediction: score p[b] + q[b], then the lower id (_row decodes it)
    return ((p[b] + q[b]) << 10) + (1023 - b)


@njit(cache=True, inline="always")
def _pair(p, q, b):
    # keys of experts b and b+1 -> (higher, lower)
    u = _key(p, q, b)
    v = _key(p, q, b + 1)
    return max(u, v), min(u, v)


@njit(cache=True, inline="always")
def _merge(h1, l1, h2, l2):
    # two (best, second) pairs -> the best two of the four keys
    return max(h1, h2), max(min(h1, h2), max(l1, l2))


@njit(cache=True, inline="always")
def _top2_of_8(p, q):
    # the two largest keys of 8 experts as a tournament (3 levels instead of an 8-long chain)
    h0, l0 = _pair(p, q, 0)
    h1, l1 = _pair(p, q, 2)
    h2, l2 = _pair(p, q, 4)
    h3, l3 = _pair(p, q, 6)
    h0, l0 = _merge(h0, l0, h1, l1)
    h2, l2 = _merge(h2, l2, h3, l3)
    return _merge(h0, l0, h2, l2)


@njit(cache=True, inline="always")
def _row(out, k, l, key):
    # row k: the expert of `key` at layer l of the next step
    out[k, 0] = 1
    out[k, 1] = l
    out[k, 2] = 1023 - (key & 1023)


register(PolicySpec("markov", "prefetch", "temporal chain: prefetch the likeliest experts of the next token",
                    make_state, lru_access, lru_insert, noop_evict, lru_victim, observe, predict))
