"""The plain-Python reference policies (see tests/reference.py): one class per registered policy.

Written from each policy's docstring with dicts and lists; imports nothing from tracekit.
"""

from __future__ import annotations

import math


class RefNotApplicable(Exception):
    pass


# ---- policies -----------------------------------------------------------------------------

class Policy:
    kind = "demand"

    def __init__(self, ctx):
        self.ctx = ctx
        self.last = {}                                # (l, e) -> last use, for LRU orders

    def on_access(self, l, e, hit, now, nxt):
        self.last[l, e] = now

    def on_insert(self, l, e, now):
        self.last[l, e] = now

    def on_evict(self, l, e):
        pass

    def victim(self, l, cands):                       # cands: ascending expert ids
        return min(cands, key=lambda e: self.last.get((l, e), 0))

    def observe(self, l, ex, hid):
        pass

    def predict(self, l, ex, hid):                    # -> [(dstep, layer, expert)]
        return []


class LRU(Policy):
    pass


class FIFO(Policy):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.ins, self.n = {}, 0                      # (l, e) -> insertion number

    def on_access(self, l, e, hit, now, nxt):
        pass

    def on_insert(self, l, e, now):
        self.n += 1
        self.ins[l, e] = self.n

    def victim(self, l, cands):
        return min(cands, key=lambda e: self.ins[l, e])


class LFU(Policy):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.freq, self.ins, self.n = {}, {}, 0

    def on_access(self, l, e, hit, now, nxt):
        if hit:
            self.freq[l, e] += 1

    def on_insert(self, l, e, now):
        self.n += 1
        self.freq[l, e], self.ins[l, e] = 1, self.n

    def victim(self, l, cands):
        return min(cands, key=lambda e: (self.freq[l, e], self.ins[l, e]))


class Belady(Policy):
    kind = "oracle"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.nxt = {}

    def on_access(self, l, e, hit, now, nxt):
        self.nxt[l, e] = nxt

    def on_insert(self, l, e, now):
        pass

    def victim(self, l, cands):
        return max(cands, key=lambda e: self.nxt.get((l, e), 0))   # first maximum: lowest id


class EBCO(Policy):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.w = {}                                   # (l, a, b) -> co-activations
        self.prev_step = [set() for _ in range(ctx["L"])]
        self.this_step = [set() for _ in range(ctx["L"])]
        self.observed = [True] * ctx["L"]             # the step at l was observed (a new one starts)

    def on_access(self, l, e, hit, now, nxt):
        if self.observed[l]:
            self.this_step[l], self.observed[l] = set(), False
        self.this_step[l].add(e)
        self.last[l, e] = now

    def observe(self, l, ex, hid):
        if not self.observed[l]:
            self.prev_step[l], self.observed[l] = set(), True
        for i, a in enumerate(ex):
            if a < 0:
                continue
            self.prev_step[l].add(a)
            for b in ex[i + 1:]:
                if b >= 0 and b != a:
                    self.w[l, a, b] = self.w.get((l, a, b), 0) + 1
                    self.w[l, b, a] = self.w.get((l, b, a), 0) + 1

    def victim(self, l, cands):
        active = self.prev_step[l] | self.this_step[l]

        def score(c):
            return sum(self.w.get((l, c, a), 0) for a in active if a != c)
        return min(cands, key=lambda c: (score(c), self.last.get((l, c), 0)))


class Markov(Policy):
    kind = "prefetch"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.count = {}                               # (l, a, b) -> transitions a -> b
        self.prev = [[] for _ in range(ctx["L"])]

    def observe(self, l, ex, hid):
        for a in self.prev[l]:
            if a >= 0:
                for b in ex:
                    if b >= 0:
                        self.count[l, a, b] = self.count.get((l, a, b), 0) + 1
        self.prev[l] = list(ex)

    def predict(self, l, ex, hid):
        score = {b: sum(self.count.get((l, a, b), 0) for a in ex if a >= 0) for b in range(self.ctx["E"])}
        best = sorted((b for b in score if score[b] > 0), key=lambda b: (-score[b], b))
        return [(1, l, b) for b in best[:self.ctx["depth"]]]


class Trajectory(Policy):
    kind = "prefetch"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx["D"] == 0:
            raise RefNotApplicable("needs hidden states")
        self.warmup = int(ctx["params"].get("warmup", 16))
        self.mean, self.n = {}, {}                    # (l, e) -> centroid list, tokens
        self.tokens = [0] * ctx["L"]

    def observe(self, l, ex, hid):
        self.tokens[l] += 1
        for e in ex:
            if e < 0:
                continue
            self.n[l, e] = self.n.get((l, e), 0) + 1
            m = self.mean.setdefault((l, e), [0.0] * len(hid))
            inv = 1.0 / self.n[l, e]                  # c += (h - c) * (1 / n), as the policy's docstring says
            for d, x in enumerate(hid):
                m[d] += (x - m[d]) * inv

    def predict(self, l, ex, hid):
        t = l + 1
        if t >= self.ctx["L"] or self.tokens[t] < self.warmup:
            return []
        hh = sum(x * x for x in hid)
        if hh == 0.0:
            return []
        cos = {}
        for e in range(self.ctx["E"]):
            if (t, e) not in self.mean:
                continue
            m = self.mean[t, e]
            dot = sum(x * c for x, c in zip(hid, m))
            cc = sum(c * c for c in m)
            if cc != 0.0:
                cos[e] = dot / (math.sqrt(hh) * math.sqrt(cc))
        best = sorted(cos, key=lambda e: (-cos[e], e))
        return [(0, t, e) for e in best[:self.ctx["depth"]]]


class GateLookahead(Policy):
    kind = "prefetch"

    def __init__(self, ctx):
        super().__init__(ctx)
        r = ctx["router"]
        if ctx["D"] == 0 or ctx["hidden_kind"].startswith("proj") or r is None \
                or tuple(r.shape) != (ctx["L"], ctx["E"], ctx["D"]):
            raise RefNotApplicable("needs full hidden states and router weights")
        self.router = [[[float(x) for x in row] for row in lay] for lay in r.astype("float32")]

    def predict(self, l, ex, hid):
        t = l + 1
        if t >= self.ctx["L"]:
            return []
        logit = [sum(w * x for w, x in zip(self.router[t][e], hid)) for e in range(self.ctx["E"])]
        best = sorted(range(self.ctx["E"]), key=lambda e: (-logit[e], e))
        return [(0, t, e) for e in best[:self.ctx["depth"]]]


POLICIES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "belady": Belady, "ebco": EBCO,
            "markov": Markov, "trajectory": Trajectory, "gate-lookahead": GateLookahead}
