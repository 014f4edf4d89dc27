"""A plain-Python reference of replay: the controller semantics and every policy.

Written from the documented semantics (tracekit/replay/controller.py docstring, the issue's
"Semantics" and each policy's docstring) with dicts and lists. It imports NOTHING from tracekit
(no numba code, no plan builder): it reads the Trace's arrays itself. tests/test_policies.py
checks that the numba replay gives exactly the same counters. The policies are in
tests/reference_policies.py.

    simulate(trace, policy, capacity, cap=2, depth=0, params=None) -> counters dict
"""

from __future__ import annotations

from collections import deque

from reference_policies import POLICIES, RefNotApplicable  # noqa: F401  (tests/reference_policies.py)

COUNTERS = ("requests", "hits", "decode_requests", "decode_hits", "demand_transfers",
            "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_dropped",
            "decode_transfers", "evictions", "transfers",
            "cpu_misses", "decode_cpu_misses",          # always 0: no hybrid (host-CPU) serving here
            "split_misses", "decode_split_misses", "split_units", "decode_split_units")
NEVER = 1 << 62


# ---- the trace as steps and requests ------------------------------------------------------

def steps_of(trace):
    """-> list of steps: (decode, toks), toks = [(experts [L][K], hidden [L][D])] in trace order."""
    T = len(trace.step)
    order = sorted(range(T), key=lambda t: (int(trace.step[t]), int(trace.seq_id[t]), int(trace.position[t])))
    steps = []
    for t in order:
        ex = [[int(e) for e in row] for row in trace.experts[t]]
        hid = [[] for _ in ex] if trace.hidden is None else \
            [[float(x) for x in row] for row in trace.hidden[t].astype("float32")]
        if not steps or steps[-1][0] != int(trace.step[t]):
            steps.append((int(trace.step[t]), int(trace.phase[t]) == 1, []))
        steps[-1][2].append((ex, hid))
    return [(dec, toks) for _, dec, toks in steps]


def requests_of(steps, L):
    """-> reqs[s][l] = distinct experts in (token, rank) order, and nxt[g] = next global index of (l, e)."""
    reqs, flat = [], []
    for _, toks in steps:
        row = []
        for l in range(L):
            seen = []
            for ex, _ in toks:
                for e in ex[l]:
                    if e >= 0 and e not in seen:
                        seen.append(e)
            row.append(seen)
            flat += [(l, e) for e in seen]
        reqs.append(row)
    nxt, later = [NEVER] * len(flat), {}
    for g in range(len(flat) - 1, -1, -1):
        nxt[g] = later.get(flat[g], NEVER)
        later[flat[g]] = g
    return reqs, nxt


# ---- the controller -----------------------------------------------------------------------

class Controller:
    """Residency, slots, the FIFO prefetch queue with an in-flight cap, and `want` protection."""

    def __init__(self, pol, L, E, C, cap):
        self.pol, self.L, self.E, self.C, self.cap = pol, L, E, C, cap
        self.slots = [[None] * C for _ in range(L)]   # slots[l][s] = expert or None
        self.pf = {}                                  # (l, e) -> "queued" | "flight"
        self.want = {}                                # (l, e) -> target pos of a prediction
        self.queue = deque()                          # (l, e, target), stale entries included
        self.qsize = max(64, L * E * 8)
        self.inflight = 0
        self.clock = 0
        self.c = dict.fromkeys(COUNTERS, 0)

    def resident(self, l, e):
        return e in self.slots[l]

    def check(self):
        for l in range(self.L):
            held = [e for e in self.slots[l] if e is not None]
            assert len(held) == len(set(held)) <= self.C
        assert self.inflight == sum(1 for v in self.pf.values() if v == "flight") <= self.cap

    def _evict(self, l, v):
        self.pol.on_evict(l, v)
        if self.pf.get((l, v)) == "flight":
            self.c["prefetch_wasted"] += 1
            self.inflight -= 1
            del self.pf[l, v]
        self.want.pop((l, v), None)
        s = self.slots[l].index(v)
        self.slots[l][s] = None
        self.c["evictions"] += 1
        return s

    def _slot(self, l, demand):
        """A free slot (lowest), else evict the policy's victim among unwanted residents; a demand
        miss falls back to all residents. None: a prefetch found nothing to evict."""
        if None in self.slots[l]:
            return self.slots[l].index(None)
        res = sorted(self.slots[l])
        cands = [e for e in res if (l, e) not in self.want]
        if not cands:
            if not demand:
                return None
            cands = res
        return self._evict(l, self.pol.victim(l, cands))

    def _load(self, l, e, s):
        self.slots[l][s] = e
        self.c["transfers"] += 1

    def _issue(self, pos, decode):
        while self.inflight < self.cap and self.queue:
            l, e, t = self.queue.popleft()
            if self.pf.get((l, e)) != "queued" or self.want.get((l, e)) != t:
                continue                              # stale: re-queued, served or evicted since
            if t <= pos:
                del self.pf[l, e], self.want[l, e]
                self.c["prefetch_dropped"] += 1
                continue
            del self.want[l, e]                       # it may not protect itself from its own eviction
            s = self._slot(l, False)
            self.want[l, e] = t
            if s is None:
                del self.pf[l, e], self.want[l, e]
                self.c["prefetch_dropped"] += 1
                continue
            self._load(l, e, s)
            self.pol.on_insert(l, e, self.clock)
            self.pf[l, e] = "flight"
            self.inflight += 1
            self.c["prefetch_issued"] += 1
            self.c["decode_transfers"] += decode

    def serve(self, pos, l, req, g0, nxt, decode):
        for i, e in enumerate(req):
            now = g0 + i
            self.clock = now
            self.c["requests"] += 1
            self.c["decode_requests"] += decode
            if self.resident(l, e):
                self.c["hits"] += 1
                self.c["decode_hits"] += decode
                if self.pf.get((l, e)) == "flight":
                    self.c["prefetch_used"] += 1
                    self.inflight -= 1
                    del self.pf[l, e]
                self.pol.on_access(l, e, True, now, nxt[now])
            else:
                if self.pf.get((l, e)) == "queued":   # never issued: a miss
                    del self.pf[l, e]
                    self.c["prefetch_dropped"] += 1
                s = self._slot(l, True)
                self._load(l, e, s)
                self.pol.on_insert(l, e, now)
                self.pol.on_access(l, e, False, now, nxt[now])
                self.c["demand_transfers"] += 1
                self.c["decode_transfers"] += decode
        for (wl, e), t in list(self.want.items()):   # predictions for this (step, layer) retire
            if wl == l and t <= pos:
                st = self.pf.pop((l, e), None)
                if st == "flight":
                    self.c["prefetch_wasted"] += 1
                    self.inflight -= 1
                elif st == "queued":
                    self.c["prefetch_dropped"] += 1
                del self.want[l, e]
        self._issue(pos, decode)

    def after(self, pos, l, toks, decode, predict_on):
        toks = [(ex[l], hid[l]) for ex, hid in toks if ex[l][0] >= 0]
        for ex, hid in toks:
            self.pol.observe(l, ex, hid)
        if predict_on:
            for ex, hid in toks:
                for dstep, tl, te in self.pol.predict(l, ex, hid):
                    if not 0 <= tl < self.L:
                        continue
                    t = pos + dstep * self.L + (tl - l)
                    if t <= pos:
                        continue
                    if self.resident(tl, te) or (tl, te) in self.pf:
                        if t > self.want.get((tl, te), -1):
                            self.want[tl, te] = t     # protect it until the later target
                            if self.pf.get((tl, te)) == "queued" and len(self.queue) < self.qsize:
                                self.queue.append((tl, te, t))
                        continue
                    if len(self.queue) >= self.qsize:
                        self.c["prefetch_dropped"] += 1
                        continue
                    self.queue.append((tl, te, t))
                    self.pf[tl, te] = "queued"
                    self.want[tl, te] = t
        self._issue(pos, decode)

    def finish(self):
        for key, st in list(self.pf.items()):
            if st == "flight":
                self.c["prefetch_wasted"] += 1
                self.inflight -= 1
                del self.pf[key]


def simulate(trace, policy, capacity, cap=2, depth=0, params=None, check=None):
    """Replay `trace` under the reference `policy` -> counters dict (same keys as replay_one).
    check(ctl) is called after every serve/after when given. Raises RefNotApplicable."""
    L, E = trace.num_layers, trace.num_experts
    D = 0 if trace.hidden is None else trace.hidden.shape[2]
    ctx = {"L": L, "E": E, "K": trace.top_k, "C": capacity, "D": D, "hidden_kind": trace.hidden_kind,
           "router": trace.router, "depth": depth or trace.top_k, "params": dict(params or {})}
    pol = POLICIES[policy](ctx)
    ctl = Controller(pol, L, E, capacity, cap)
    steps = steps_of(trace)
    reqs, nxt = requests_of(steps, L)
    g = 0
    for s, (decode, toks) in enumerate(steps):
        for l in range(L):
            pos = s * L + l
            ctl.serve(pos, l, reqs[s][l], g, nxt, int(decode))
            g += len(reqs[s][l])
            ctl.check()
            ctl.after(pos, l, toks, int(decode), pol.kind == "prefetch" and decode)
            ctl.check()
            if check:
                check(ctl)
    ctl.finish()
    return dict(ctl.c)
