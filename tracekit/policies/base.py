"""What a policy is: a small set of numba functions over its own state arrays.

A policy never sees the cache directly. The controller (tracekit.replay.controller) owns
residency, slots and the prefetch queue, and calls the policy at these points:

  make_state(ctx)                      -> tuple of numpy arrays  (Python; raise NotApplicable)
  on_access(st, l, e, hit, now, nxt)   a request for expert e at layer l (after insertion on a miss)
  on_insert(st, l, e, now)             e became resident at layer l (demand or prefetch)
  on_evict(st, l, e)                   e left layer l's cache
  victim(st, l, cand, n) -> e          pick an expert to evict among cand[:n] (int64 expert ids, in slot
                                       order; ties broken deterministically, as the policy's
                                       docstring says: lowest expert id unless stated otherwise)
  observe(st, l, ex, hid)              a token finished layer l with experts ex (int16[K]) and hidden hid (float32[D] or [0])
  predict(st, l, ex, hid, out) -> n    write n rows (dstep, layer, expert) into out (int64[M, 3]):
                                       "expert will be needed at layer `layer` of step+dstep" (dstep 0 or 1)

`now` is the global request index; `nxt` the global index of the next request of (l, e), or NEVER.
The replay engine and the live executor both drive these same functions through the controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba import njit

from tracekit.policies.simd import lanes8_dot

NEVER = np.int64(1) << np.int64(62)


class NotApplicable(Exception):
    """The policy cannot run on this trace (e.g. it needs hidden states the trace lacks)."""


@dataclass
class PolicyContext:
    num_layers: int          # L
    num_experts: int         # E
    capacity: int            # C slots per layer
    top_k: int               # K
    hidden_dim: int          # D (0 when the trace has no hidden states)
    hidden_kind: str         # none | full | proj:N
    router: np.ndarray | None   # [L, E, H] float32 or None
    depth: int = 0           # prefetch depth per token and layer (0: top_k)
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySpec:
    name: str
    kind: str                # "demand" | "prefetch" | "oracle"
    summary: str
    make_state: Callable[[PolicyContext], tuple]
    on_access: Callable
    on_insert: Callable
    on_evict: Callable
    victim: Callable
    observe: Callable
    predict: Callable
    # True: the policy's choices at a layer depend only on the order it keeps among that layer's
    # residents (as lru's recency, fifo's insertion order), so replay may tabulate it
    # (tracekit.replay.table); the engine tests check the tables against the controller.
    order_state: bool = False

    @property
    def prefetches(self) -> bool:
        return self.kind == "prefetch"

    @property
    def observes(self) -> bool:
        # False when observe is the shared no-op: the engines may then skip `after` on prefill
        return self.observe is not noop_observe


# ---- shared building blocks (numba) -------------------------------------------------------

@njit(cache=True, inline="always")
def argmin_cand(score, cand, n):
    # score: float64[E] or int64[E]; cand[:n]: expert ids -> the one with the lowest score
    # (ties: lowest id). Written as selects, so that it compiles without branches.
    best = cand[0]
    sb = score[best]
    for i in range(1, n):
        e = cand[i]
        s = score[e]
        better = (s < sb) | ((s == sb) & (e < best))
        best = e if better else best
        sb = s if better else sb
    return best


@njit(cache=True, inline="always")
def argmax_cand(score, cand, n):
    # as argmin_cand, for the highest score (ties: lowest id)
    best = cand[0]
    sb = score[best]
    for i in range(1, n):
        e = cand[i]
        s = score[e]
        better = (s > sb) | ((s == sb) & (e < best))
        best = e if better else best
        sb = s if better else sb
    return best


@njit(cache=True)
def noop_access(st, l, e, hit, now, nxt):
    pass


@njit(cache=True)
def noop_insert(st, l, e, now):
    pass


@njit(cache=True)
def noop_evict(st, l, e):
    pass


@njit(cache=True)
def noop_observe(st, l, ex, hid):
    pass


@njit(cache=True)
def no_predict(st, l, ex, hid, out):
    return 0


@njit(cache=True, inline="always")
def top_valid_into(score, ok, n, dstep, layer, out):
    # the n best scores among ok[e] == 1 (any sign; ties: lower id) -> rows (dstep, layer, e) of out.
    # score: float64[E]; ok: int8[E] scratch, consumed. Returns the row count.
    E = score.shape[0]
    k = 0
    for _ in range(n):
        best = -1
        for e in range(E):
            if ok[e] and (best < 0 or score[e] > score[best]):
                best = e
        if best < 0 or k >= out.shape[0]:
            break
        ok[best] = 0
        out[k, 0] = dstep
        out[k, 1] = layer
        out[k, 2] = best
        k += 1
    return k


@njit(cache=True, inline="always")
def dot_in_d_order(M, hid, acc):
    # acc[e] = sum_d hid[d] * M[d, e] for M [D, E] (C order), hid float32[D], acc float64[E]; returns
    # sum_d hid[d] * hid[d]. Every sum is added in d order from 0.0, exactly as a plain loop over d
    # would (the products in numpy's types: float32 x float32 -> float32, float32 x float64 ->
    # float64). When E is a multiple of 8 (Mixtral: 8, FLAME: 64), eight experts' sums run as the
    # lanes of one LLVM vector (tracekit.policies.simd, bit for bit the scalar loop's sums).
    E = acc.shape[0]
    if E % 8 or E == 0:
        return dot_in_d_order_scalar(M, hid, acc)
    hh = 0.0
    for e0 in range(0, E, 8):
        hh = lanes8_dot(M, hid, acc, e0)
    return hh


@njit(cache=True, inline="always")
def dot_in_d_order_scalar(M, hid, acc):
    # dot_in_d_order as a scalar loop, for any E: the loop over e is innermost (contiguous) with d
    # unrolled by 4 inside it, so the E + 1 sums run side by side and each acc[e] goes through memory
    # once per 4 terms
    E = acc.shape[0]
    D = hid.shape[0]
    for e in range(E):
        acc[e] = 0.0
    hh = 0.0
    d = 0
    while d + 4 <= D:
        h0, h1, h2, h3 = hid[d], hid[d + 1], hid[d + 2], hid[d + 3]
        hh += h0 * h0
        hh += h1 * h1
        hh += h2 * h2
        hh += h3 * h3
        for e in range(E):
            a = acc[e]
            a += h0 * M[d, e]
            a += h1 * M[d + 1, e]
            a += h2 * M[d + 2, e]
            a += h3 * M[d + 3, e]
            acc[e] = a
        d += 4
    while d < D:
        h0 = hid[d]
        hh += h0 * h0
        for e in range(E):
            acc[e] += h0 * M[d, e]
        d += 1
    return hh


# ---- LRU order on st[0] = last use [L, E]: the base eviction order of most policies --------

@njit(cache=True)
def lru_access(st, l, e, hit, now, nxt):
    st[0][l, e] = now


@njit(cache=True)
def lru_insert(st, l, e, now):
    st[0][l, e] = now


@njit(cache=True)
def lru_victim(st, l, cand, n):
    return argmin_cand(st[0][l], cand, n)
