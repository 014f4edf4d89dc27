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
def _draw(cdf, T, K, seed):
    # K distinct experts per (token, layer), each drawn from the layer's popularity (cdf: [L, E])
    np.random.seed(seed)
    L, E = cdf.shape
    ex = np.empty((T, L, K), dtype=np.int16)
    for t in range(T):
        for l in range(L):
            k = 0
            while k < K:
                e = np.int16(min(np.searchsorted(cdf[l], np.random.random() * cdf[l, -1]), E - 1))
                dup = False
                for j in range(k):
                    dup = dup or ex[t, l, j] == e
                if not dup:
                    ex[t, l, k] = e
                    k += 1
    return ex


@njit(cache=True)
def _stick(ex, stick):
    # ex: int16[T, L, K]; where stick[t, l], token t copies token t-1's experts at layer l
    for t in range(1, ex.shape[0]):
        for l in range(ex.shape[1]):
            if stick[t, l]:
                ex[t, l, :] = ex[t - 1, l, :]


def synthetic_trace(tokens: int = 1000, layers: int = 4, experts: int = 8, top_k: int = 2,
                    prefill: int = 0, stickiness: float = 0.3, hidden_dim: int = 0, seed: int = 0,
                    with_router: bool = False) -> Trace:
    rng = np.random.default_rng(seed)
    T, L, E, K = tokens, layers, experts, top_k
    pop = rng.dirichlet(np.full(E, 0.7), size=L)                      # [L, E] popularity
    ex = _draw(np.cumsum(pop, axis=1), T, K, seed)                     # [T, L, K] distinct per row
    stick = rng.random((T, L)) < stickiness
    _stick(ex, stick)                                                  # repeat the previous top-k
    w = rng.random((T, L, K)).astype(np.float32)
    w /= w.sum(axis=2, keepdims=True)
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
