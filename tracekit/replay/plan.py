"""Turn a Trace into the request plan that both replay and live walk through.

For every (step, layer) the requests are the distinct experts used by the step's tokens at
that layer, in (token, rank) order. Arrays (S steps, L layers, T tokens, N requests):
  tok_ptr   int64[S+1]    tokens of step s are tok_ptr[s]:tok_ptr[s+1] (trace order)
  decode    int8[S]       1 for decode steps
  req_ptr   int64[S*L+1]  requests of (s, l) are req_ptr[s*L+l]:req_ptr[s*L+l+1]
  req_e     int16[N]      expert
  req_ntok  int32[N]      tokens of the step routed to that expert (FFN batch size)
  req_next  int64[N]      global index of the next request of the same (layer, expert); NEVER if none
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from tracekit.policies.base import NEVER
from tracekit.trace.core import Trace


@dataclass
class Plan:
    L: int
    E: int
    K: int
    tok_ptr: np.ndarray
    decode: np.ndarray
    tok_ex: np.ndarray        # int16[T, L, K]
    hid: np.ndarray           # float32[T, L, D] (D = 0 when absent)
    req_ptr: np.ndarray
    req_e: np.ndarray
    req_ntok: np.ndarray
    req_next: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.decode.shape[0])

    @property
    def decode_tokens(self) -> int:
        n = np.diff(self.tok_ptr)
        return int(n[self.decode == 1].sum())


@njit(cache=True)
def _build(tok_ptr, tok_ex, E):
    S = tok_ptr.shape[0] - 1
    L = tok_ex.shape[1]
    K = tok_ex.shape[2]
    cap = tok_ex.shape[0] * L * K
    req_ptr = np.zeros(S * L + 1, dtype=np.int64)
    req_e = np.empty(cap, dtype=np.int16)
    req_ntok = np.empty(cap, dtype=np.int32)
    n = 0
    for s in range(S):
        for l in range(L):
            start = n
            for t in range(tok_ptr[s], tok_ptr[s + 1]):
                for k in range(K):
                    e = tok_ex[t, l, k]
                    if e < 0:
                        continue
                    j = start                # this (step, layer)'s requests so far: at most E
                    while j < n and req_e[j] != e:
                        j += 1
                    if j < n:
                        req_ntok[j] += 1
                    else:
                        req_e[n] = e
                        req_ntok[n] = 1
                        n += 1
            req_ptr[s * L + l + 1] = n
    req_e = req_e[:n].copy()
    req_ntok = req_ntok[:n].copy()
    # next use of the same (layer, expert), scanning backwards
    req_next = np.empty(n, dtype=np.int64)
    last = np.full((L, E), NEVER, dtype=np.int64)
    for s in range(S - 1, -1, -1):
        for l in range(L - 1, -1, -1):
            for i in range(req_ptr[s * L + l + 1] - 1, req_ptr[s * L + l] - 1, -1):
                e = req_e[i]
                req_next[i] = last[l, e]
                last[l, e] = i
    return req_ptr, req_e, req_ntok, req_next


def build_plan(trace: Trace, with_hidden: bool = True) -> Plan:
    order = np.lexsort((trace.position, trace.seq_id, trace.step))
    step = trace.step[order]
    tok_ex = np.ascontiguousarray(trace.experts[order])
    change = np.ones(step.shape[0], dtype=bool)
    change[1:] = step[1:] != step[:-1]
    starts = np.flatnonzero(change)
    tok_ptr = np.append(starts, step.shape[0]).astype(np.int64)
    phase = trace.phase[order]
    decode = (phase[starts] == 1).astype(np.int8)
    if with_hidden and trace.hidden is not None:
        hid = np.ascontiguousarray(trace.hidden[order], dtype=np.float32)   # numba needs float32
    else:
        hid = np.zeros((tok_ex.shape[0], trace.num_layers, 0), dtype=np.float32)
    req_ptr, req_e, req_ntok, req_next = _build(tok_ptr, tok_ex, trace.num_experts)
    return Plan(trace.num_layers, trace.num_experts, trace.top_k, tok_ptr, decode, tok_ex, hid,
                req_ptr, req_e, req_ntok, req_next)
