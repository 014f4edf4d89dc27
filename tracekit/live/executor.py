"""Trace-driven live executor: the replay controller's decisions, executed with real copies and FFNs.

Per (step, layer), in replay's order (tracekit.replay.engine):
    serve (numba, host)  ->  attention stand-in (GPU)  ->  demand + serve-issued prefetch copies
    (copy stream, after the routing event)  ->  expert FFNs in request order (each waits only on
    the chunk events of its own copy)  ->  after (numba, host)  ->  prefetch copies (after the
    layer-end event).
No host synchronization inside the loop; one torch.cuda.synchronize() at the end, then events are read.
With `dry=True` only the bookkeeping runs (no tensors): the counters are the live ones either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tracekit.errors import UserError
from tracekit.live.copier import Copier
from tracekit.live.ffn import NonExpert, chunk_rows, ffn_rows
from tracekit.policies import NotApplicable, PolicyContext
from tracekit.replay import controller as ctlmod

HIT, MISS, PREFETCH, CPU, SPLIT = ctlmod.HIT, ctlmod.MISS, ctlmod.PREFETCH, ctlmod.CPU, ctlmod.SPLIT


@dataclass(frozen=True)
class Shapes:
    L: int
    E: int
    H: int
    F: int
    kvdim: int

    @property
    def numel(self) -> int:            # elements of one expert, layout [F, 3, H]
        return 3 * self.F * self.H

    @property
    def expert_bytes(self) -> int:
        return 2 * self.numel


MIXTRAL = Shapes(32, 8, 4096, 14336, 1024)


@dataclass
class LiveResult:
    policy: str
    capacity: int
    cap: int
    chunks: int
    layers: int
    counters: dict
    steps: int
    decode_tokens: int
    decode_s: float = 0.0          # GPU time of the decode steps (events)
    stall_s: float = 0.0           # decode: compute stream waiting on copies
    compute_s: float = 0.0         # decode: GPU busy, not stalled (layer spans - stalls)
    gap_s: float = 0.0             # decode: GPU idle between layers (waiting on the host)
    policy_s: float = 0.0          # decode: host time in controller serve/after
    bytes_decode: float = 0.0
    bytes_total: float = 0.0
    copy_busy_s: float = 0.0       # all steps: copy-stream busy time
    cpu_wait_s: float = 0.0        # decode: compute stream idle waiting for CPU-miss results (hybrid)
    cpu_busy_s: float = 0.0        # decode: host time of the CPU-miss FFNs (worker thread)
    cpu_jobs: int = 0              # decode: CPU-miss FFNs run
    wall_s: float = 0.0            # host time of the whole run
    timed: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def achieved_GBps(self) -> float:
        return self.bytes_total / self.copy_busy_s / 1e9 if self.copy_busy_s > 0 else float("nan")

    @property
    def hit_rate(self) -> float:
        c = self.counters
        return c["hits"] / c["requests"] if c["requests"] else float("nan")


def make_context(plan, capacity: int, trace=None, depth: int = 0, params: dict | None = None) -> PolicyContext:
    """The same PolicyContext that replay builds for this plan."""
    router = getattr(trace, "router", None) if trace is not None else None
    kind = getattr(trace, "hidden_kind", "none") if trace is not None and plan.hid.shape[2] else "none"
    return PolicyContext(plan.L, plan.E, capacity, plan.K, plan.hid.shape[2], kind, router,
                         depth or plan.K, dict(params or {}))


class TraceExecutor:
    """Slots [L, C, F, 3, H] on `device`; experts from `store` (ExpertStore, flat [E, numel] per layer).
    A SPLIT miss (hybrid --split) copies its leading rows to one staging expert [F, 3, H] (the copier's
    slot index C of the layer; one buffer serves every layer: a layer's split copy waits on its routing
    event, which follows the previous layer's compute)."""

    def __init__(self, shapes: Shapes, C: int, device="cuda", store=None, *, chunk_mb: float = 16.0,
                 rows: list | None = None, timing: bool = True, dry: bool = False, max_tokens: int = 512,
                 cpu_threads: int | None = None, cpu_kernel: str = "fused"):
        self.shapes, self.C, self.dry = shapes, C, dry
        self.cpu_threads, self.cpu_kernel, self.worker = cpu_threads, cpu_kernel, None
        self.rows = rows or chunk_rows(shapes.F, shapes.H, chunk_mb)
        self.bounds = [f0 * 3 * shapes.H for f0, _ in self.rows] + [shapes.numel]
        self.device, self.timing, self.store = device, timing, store
        self._splits: dict = {}                         # k -> (row ranges, element bounds) of a SPLIT copy
        if dry:
            return
        import torch

        L, H, F = shapes.L, shapes.H, shapes.F
        self.slots = torch.empty((L, C, F, 3, H), dtype=torch.bfloat16, device=device)
        self.stage = torch.empty((F, 3, H), dtype=torch.bfloat16, device=device)                # SPLIT rows
        self.w = [[self.slots[l, s] for s in range(C)] for l in range(L)]               # [F, 3, H] views
        self.flat = [[self.slots[l, s].view(-1) for s in range(C)] for l in range(L)]   # [numel] views
        self.nonexp = NonExpert(L, H, shapes.E, shapes.kvdim, device)
        g = torch.Generator(device=device).manual_seed(2)
        self.x = torch.randn(max_tokens, H, generator=g, device=device).to(torch.bfloat16)   # [T, H]

    # ---- one run --------------------------------------------------------------------------
    def run(self, spec, plan, capacity: int, cap: int = 2, ctx: PolicyContext | None = None,
            warmup_steps: int = 0, hybrid=None, split: bool = False) -> LiveResult:
        """hybrid: None (transfer only) or the replay Profile whose cost model decides CPU vs copy
        (must be the profile replay predicts with, for equal counters); split: replay's --split."""
        if capacity != self.C:
            raise ValueError("executor slots were built for another capacity")
        if plan.L != self.shapes.L or plan.E != self.shapes.E:
            raise UserError(f"trace has {plan.L} layers x {plan.E} experts; executor has "
                            f"{self.shapes.L} x {self.shapes.E}")
        ctx = ctx or make_context(plan, capacity)
        if hybrid is not None and not self.dry and self.worker is None:
            self.worker = self._new_worker()
        elif hybrid is None and self.worker is not None:
            self.close()                  # the ring worker's thread polls while idle: not during other runs
        if warmup_steps:                  # also dry: the policy's JIT compile must not count as its time
            self._loop(spec, plan, capacity, cap, ctx, min(warmup_steps, plan.num_steps), False, hybrid, split)
        return self._loop(spec, plan, capacity, cap, ctx, plan.num_steps, self.timing, hybrid, split)

    def _new_worker(self):
        """The CPU worker: on CUDA with the fused kernel, the GIL-free RingWorker (the compute stream
        waits for CPU results); else, or with TRACEKIT_CPU_WAIT=host, CpuWorker (the host waits)."""
        import os

        from tracekit.live.cpu_worker import CpuWorker

        if self.cpu_kernel == "fused" and os.environ.get("TRACEKIT_CPU_WAIT", "stream") != "host":
            import torch

            if torch.device(self.device).type == "cuda":
                from tracekit.live.ring_worker import RingWorker

                try:
                    return RingWorker(self.shapes, self.x.shape[0], self.store, self.device, self.cpu_threads)
                except RuntimeError:      # the GPU or driver cannot wait on host flags
                    pass
        return CpuWorker(self.shapes, self.x.shape[0], self.device, self.cpu_threads, self.cpu_kernel)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _loop(self, spec, plan, C, cap, ctx, S, timed, hybrid=None, split=False) -> LiveResult:
        serve, after, finish = ctlmod.build(spec)
        try:
            st = spec.make_state(ctx)
        except NotApplicable as exc:
            raise UserError(f"policy {spec.name} cannot run on this trace: {exc}") from None
        ctl = ctlmod.new_controller(plan.L, plan.E, C, cap)
        clock = None
        if hybrid is not None:
            from tracekit.live.cpu_worker import HybridClock

            clock = HybridClock(spec, plan, C, hybrid, self.shapes.expert_bytes, ctl, split)
            ctl = clock.ctl
        if self.worker is not None:
            self.worker.jobs = []
        act = ctlmod.action_rows(ctl)
        predict_on = spec.prefetches
        L = plan.L
        cp = None if self.dry else Copier(self.device, L, C + 1, len(self.rows), timed)   # slot C: staging
        self._cp = cp
        self._cpu_waits = []
        dec_host_policy = 0.0
        step_bytes = np.zeros(S)
        spans: list = []
        step_ev = []
        torch = None
        if cp is not None and cp.cuda and timed:
            import torch
            start = torch.cuda.Event(enable_timing=True)
            start.record(cp.compute)
        tok_ptr, decode, tok_ex, hid = plan.tok_ptr, plan.decode, plan.tok_ex, plan.hid
        req_ptr, req_e, req_next, req_ntok = plan.req_ptr, plan.req_e, plan.req_next, plan.req_ntok
        w0 = time.perf_counter()
        for s in range(S):
            t0, t1 = tok_ptr[s], tok_ptr[s + 1]
            dec = bool(decode[s] == 1)
            xs = None if cp is None else self.x[: t1 - t0]
            pol = 0.0
            for l in range(L):
                pos = s * L + l
                a, b = req_ptr[pos], req_ptr[pos + 1]
                h0 = time.perf_counter()
                if clock is None:
                    n = serve(ctl, st, pos, l, req_e[a:b], a, req_next[a:b], dec, act)
                else:
                    n = clock.serve(st, pos, l, req_e[a:b], a, req_next[a:b], dec, act, req_ntok[a:b], t1 - t0)
                rows = act[:n].tolist()
                pol += time.perf_counter() - h0
                if cp is not None:
                    step_bytes[s] += self._layer(cp, rows, l, s, xs, req_ntok[a:b], spans if timed else None)[0]
                h0 = time.perf_counter()
                m = after(ctl, st, pos, l, tok_ex, hid, t0, t1, l, dec, predict_on and dec, act)
                prow = act[:m].tolist()
                if clock is not None:
                    clock.after_copies(act, m)
                pol += time.perf_counter() - h0
                if cp is not None and prow:
                    lend = cp.mark("lend")
                    for r in prow:
                        self._copy(cp, r, lend, s)
                        step_bytes[s] += self.shapes.expert_bytes
            if dec:
                dec_host_policy += pol
            if torch is not None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(cp.compute)
                step_ev.append(ev)
        finish(ctl)
        if cp is not None and cp.cuda:
            import torch as _t
            _t.cuda.synchronize()
        if self.worker is not None:
            self.worker.check()                         # a failed CPU job; the times of finished ones
        wall = time.perf_counter() - w0
        res = LiveResult(spec.name, C, cap, len(self.rows), L, ctlmod.counters_dict(ctl), S,
                         int(np.diff(tok_ptr[: S + 1])[decode[:S] == 1].sum()), wall_s=wall)
        res.policy_s = dec_host_policy
        if clock is not None:
            res.extra["pred_cpu_busy_s"] = clock.predicted_cpu_busy_s
        if self.worker is not None and hybrid is not None:
            dj = [j for j in self.worker.jobs if decode[j.step] == 1]
            res.cpu_jobs = len(dj)
            res.cpu_busy_s = float(sum(j.seconds for j in dj))
            res.extra["cpu_threads"] = self.worker.threads
            res.extra["cpu_kernel"] = self.worker.kernel
            res.extra["cpu_result_wait"] = self.worker.gpu_wait
        res.bytes_total = float(step_bytes.sum()) if cp is not None else \
            ctlmod.experts_copied(res.counters) * self.shapes.expert_bytes
        res.bytes_decode = float(step_bytes[decode[:S] == 1].sum()) if cp is not None else \
            ctlmod.experts_copied(res.counters, decode=True) * self.shapes.expert_bytes
        if torch is not None:
            self._read_timing(res, cp, start, step_ev, spans, decode[:S], self._cpu_waits)
        elif cp is not None:
            res.decode_s = wall * res.decode_tokens / max(1, int(np.diff(tok_ptr[: S + 1]).sum()))
        return res

    # ---- one layer --------------------------------------------------------------------------
    def _layer(self, cp, rows, l, step, xs, ntoks, spans):
        """Attention stand-in, this layer's copies, CPU misses and FFNs. -> (bytes copied, output [n, H])."""
        import torch

        moved = 0.0
        ev0 = None
        if spans is not None:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev0.record(cp.compute)
        y, _ = self.nonexp(l, xs)                      # [n, H]
        route = cp.mark("route")
        jobs = self._cpu_jobs(rows, l, step, xs, ntoks, route) if self.worker is not None else ()
        last_user: dict = {}                           # slot -> index of the last compute row on it
        deferred: dict = {}
        for i, r in enumerate(rows):
            kind, ll, sl = r[0], r[1], r[3]
            if kind == CPU:
                continue
            if kind == SPLIT:
                moved += self._split_copy(cp, r, route, step)
                continue
            if kind != HIT:
                moved += self.shapes.expert_bytes
                if ll == l and sl in last_user:        # the slot's previous expert is computed first
                    deferred.setdefault(last_user[sl], []).append(r)
                else:
                    self._copy(cp, r, route, step)
            if kind != PREFETCH:
                last_user[sl] = i
        F = self.shapes.F
        for i, r in enumerate(rows):
            kind, sl, ri = r[0], r[3], r[4]
            if kind == PREFETCH or kind == CPU:
                continue
            ne = int(ntoks[ri])
            if kind == SPLIT:                          # its leading rows, from the staging buffer
                for j, (f0, f1) in enumerate(self._split_rows(sl)[0]):
                    cp.wait_chunk(l, self.C, j, step)
                    ffn_rows(xs[:ne], self.stage, y[:ne], f0, f1)
                cp.pending[l][self.C] = False
                continue
            xe, ye, w = xs[:ne], y[:ne], self.w[l][sl]
            if cp.pending[l][sl]:                      # first use since its copy: chunk by chunk
                for j, (f0, f1) in enumerate(self.rows):
                    cp.wait_chunk(l, sl, j, step)
                    ffn_rows(xe, w, ye, f0, f1)
                cp.pending[l][sl] = False
            else:
                ffn_rows(xe, w, ye, 0, F)
            cp.release(l, sl)
            for d in deferred.get(i, ()):
                self._copy(cp, d, None, step)
        if jobs:                                       # CPU misses: the layer needs their results now
            pre = post = None
            if spans is not None:
                pre, post = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                pre.record(cp.compute)
            for j, (job, ne) in enumerate(jobs):
                self.worker.collect(job, l % 2, j, ne, y)
            if pre is not None:
                post.record(cp.compute)
                self._cpu_waits.append((step, pre, post))
        if spans is not None:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record(cp.compute)
            spans.append((step, ev0, ev1))
        return moved, y

    def _cpu_jobs(self, rows, l, step, xs, ntoks, route) -> list:
        """Send the hidden state to the host once for the layer's CPU misses and queue their FFNs
        (a SPLIT miss: its rows after the copied ones)."""
        cpu = [r for r in rows if r[0] == CPU or r[0] == SPLIT]
        if not cpu:
            return []
        wk, p = self.worker, l % 2
        n = max(int(ntoks[r[4]]) for r in cpu)
        xh, ev = wk.send_hidden(xs, n, p, route)
        E3 = (self.shapes.F, 3, self.shapes.H)
        out = []
        for j, r in enumerate(cpu):
            ne = int(ntoks[r[4]])
            f0 = self.split_at(r[3]) if r[0] == SPLIT else 0      # the first row the host computes
            w = self.store.layers[l][r[2]].view(E3)[f0:]
            out.append((wk.submit(ev, xh[:ne], w, p, j, step, src=(l, r[2], f0)), ne))
        return out

    def split_at(self, k: int) -> int:
        return ctlmod.split_at(k, self.shapes.F)

    def _split_rows(self, k: int) -> tuple:
        """(the copy's chunks (row ranges) cut at split_at(k), their element bounds); built once per k,
        since the copy and the GPU's part of every split both need them."""
        plan = self._splits.get(k)
        if plan is None:
            fk, H3 = self.split_at(k), 3 * self.shapes.H
            parts = [(f0, min(f1, fk)) for f0, f1 in self.rows if f0 < fk]
            bounds = [f0 * H3 for f0, _ in parts] + [parts[-1][1] * H3] if parts else []
            plan = self._splits[k] = (parts, bounds)
        return plan

    def _split_copy(self, cp, r, after, step) -> float:
        """Copy a SPLIT miss's leading rows to the staging buffer (slot index C). Returns the bytes."""
        ll, e, k = r[1], r[2], r[3]
        parts, bounds = self._split_rows(k)
        if not parts:
            return 0.0
        cp.copy(ll, self.C, self.stage.view(-1), self.store.layers[ll][e], bounds, after, step)
        return float(bounds[-1] * 2)

    def _copy(self, cp, r, after, step) -> None:
        ll, e, sl = r[1], r[2], r[3]
        cp.copy(ll, sl, self.flat[ll][sl], self.store.layers[ll][e], self.bounds, after, step)

    # ---- timing -----------------------------------------------------------------------------
    @staticmethod
    def _read_timing(res, cp, start, step_ev, spans, decode, cpu_waits=()) -> None:
        S = len(step_ev)
        step_ms = np.zeros(S)
        prev = start
        for s, ev in enumerate(step_ev):
            step_ms[s] = prev.elapsed_time(ev)
            prev = ev
        stall = np.zeros(S)
        for s, a, b in cp.stalls:
            stall[s] += a.elapsed_time(b)
        span = np.zeros(S)
        for s, a, b in spans:
            span[s] += a.elapsed_time(b)
        cpu_wait = np.zeros(S)
        for s, a, b in cpu_waits:
            cpu_wait[s] += a.elapsed_time(b)
        busy = 0.0
        for _, a, b, _nb in cp.copies:
            busy += a.elapsed_time(b)
        d = decode == 1
        res.timed = True
        res.decode_s = float(step_ms[d].sum()) * 1e-3
        res.stall_s = float(stall[d].sum()) * 1e-3
        res.cpu_wait_s = float(cpu_wait[d].sum()) * 1e-3
        res.compute_s = float((span[d] - stall[d] - cpu_wait[d]).sum()) * 1e-3
        res.gap_s = float((step_ms[d] - span[d]).sum()) * 1e-3
        res.copy_busy_s = busy * 1e-3
        res.extra["all_steps_s"] = float(step_ms.sum()) * 1e-3
