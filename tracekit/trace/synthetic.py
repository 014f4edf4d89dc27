"""Synthetic routing traces for benchmarks and tests (no model needed).

Routing is a sticky random walk: each layer has skewed expert popularity, and a token repeats the
previous token's expert at that layer with probability `stickiness` (real traces show temporal
locality). Optional hidden states are noisy functions of the chosen experts, so that
hidden-state predictors have a signal to learn.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracekit.trace.core import Trace


@njit(cache=True)
def _draw(cdf, T, K, stickiness, seed):
    # -> experts int16[T, L, K], weights float32[T, L, K]. With probability `stickiness` token t
    # repeats token t-1's experts at layer l; otherwise K distinct experts are drawn from the
    # layer's popularity (cdf: [L, E], last column 1). Weights: random, normalized per row.
    np.random.seed(seed)
    L, E = cdf.shape
    ex = np.empty((T, L, K), dtype=np.int16)
    w = np.empty((T, L, K), dtype=np.float32)
    for t in range(T):
        for l in range(L):
            if t > 0 and np.random.random() < stickiness:
                for k in range(K):
                    ex[t, l, k] = ex[t - 1, l, k]
            else:
                k = 0
                while k < K:
                    u = np.random.random()
                    e = 0
                    while e < E - 1 and cdf[l, e] <= u:
                        e += 1
                    dup = False
                    for j in range(k):
                        dup = dup or ex[t, l, j] == e
                    if not dup:
                        ex[t, l, k] = e
                        k += 1
            tot = 0.0
            for k in range(K):
                w[t, l, k] = np.random.random() + 1e-6
                tot += w[t, l, k]
            for k in range(K):
                w[t, l, k] /= tot
    return ex, w


def synthetic_trace(tokens: int = 1000, layers: int = 4, experts: int = 8, top_k: int = 2,
                    prefill: int = 0, stickiness: float = 0.3, hidden_dim: int = 0, seed: int = 0,
                    with_router: bool = False) -> Trace:
    rng = np.random.default_rng(seed)
    T, L, E, K = tokens, layers, experts, top_k
    pop = rng.dirichlet(np.full(E, 0.7), size=L)                      # [L, E] popularity
    cdf = np.cumsum(pop, axis=1)
    cdf /= cdf[:, -1:]
    ex, w = _draw(cdf, T, K, stickiness, seed)                         # [T, L, K] distinct per row
    phase = np.ones(T, dtype=np.int8)
    phase[:prefill] = 0
    step = np.arange(T, dtype=np.int32) - max(prefill - 1, 0)
    step[:prefill] = 0
    hidden = router = None
    if hidden_dim:
        basis = rng.standard_normal((L, E, hidden_dim)).astype(np.float32)
        hidden = np.zeros((T, L, hidden_dim), dtype=np.float32)
        nxt = np.concatenate([ex[:, 1:], ex[:, -1:]], axis=1)         # experts of layer l+1
        for k in range(K):
            lidx = np.minimum(np.arange(L) + 1, L - 1)
            hidden += basis[lidx[None, :], nxt[:, :, k].astype(np.int64)]
        hidden += 0.5 * rng.standard_normal(hidden.shape).astype(np.float32)
        if with_router:
            router = basis.copy()
    meta = {"model": "synthetic", "num_layers": L, "num_experts": E, "top_k": K, "seed": seed}
    return Trace(
        path=f"synthetic:{T}x{L}", format="synthetic", complete=True, num_layers=L, num_experts=E,
        top_k=K, seq_id=np.zeros(T, dtype=np.int32), step=step, phase=phase,
        position=np.arange(T, dtype=np.int32), token_id=np.full(T, -1, dtype=np.int32),
        experts=ex, weights=w, hidden=hidden, router=router,
        hidden_kind="full" if hidden_dim else "none", meta=meta,
    )
