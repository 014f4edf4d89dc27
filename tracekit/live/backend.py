"""Model-driven mode: a transformers ExpertsInterface backend whose experts live in the pinned store.

Every Mixtral experts module is served by one OffloadRunner through the SAME controller functions
as replay (serve -> copies -> expert math -> after -> prefetch copies). Non-expert weights stay on
the device. The expert math is transformers' eager Mixtral code, line for line, with the expert's
weights read from its GPU slot (same shapes and layout as gate_up_proj[e] / down_proj[e]); each
expert's weighted output is kept and index_add_-ed in ascending expert order, as eager does, so
greedy output is identical to the model run with experts_implementation="eager".
The routing must reach the host to decide copies: one device->host copy of top_k_index per layer
(inherent to model-driven offloading; the trace-driven executor has none).

Hybrid (`hybrid=profile`): each miss goes through the compiled `serve_hybrid`, fed by cpu_worker's
HybridClock (replay's cost-model timeline advanced in replay's order), so the choices equal a hybrid
replay of the requests served. A CPU action (kind CPU) is computed on the host and NOT inserted in
the GPU cache. The host computation is SYNCHRONOUS, in the main thread (no worker thread): the layer's
hidden states go device->host once (right after the routing sync, so no extra wait), the layer's
copies are issued, then the CPU experts run on the host store's weights: bf16 experts of at most 2
tokens (decode) with host_ffn.ffn_fused_hf (one pass over the weights, numba threads, bf16 rounding
where eager rounds), others with the eager math itself (gate_up / act_fn / down, torch's host
matmuls). Their outputs go back to the device, are weighted there and index_add_-ed in ascending
expert order with the GPU experts' outputs. Copies run on the copy stream meanwhile. No worker
thread: the next layer's routing sync would wait for this layer's CPU experts anyway.
Split (`split=True`, with hybrid): a SPLIT action's first f0 intermediate rows (gate rows, up rows and
down's columns, the last by a 2-D copy) go to a staging slot (slot C of the copier); the GPU's part is
queued first, then the host computes rows f0..F, and the two partial outputs are added.
Token-identity is tested on CPU only (fp32: both paths use the same kernels); in bf16 the host
result may differ in the last bits from the device one (docs/results_live.md).
"""

from __future__ import annotations

import numpy as np

from tracekit.errors import UserError
from tracekit.live.copier import Copier
from tracekit.live.store import ExpertStore
from tracekit.policies import NotApplicable, PolicyContext
from tracekit.policies.base import NEVER
from tracekit.replay import controller as ctlmod

NAME = "tracekit_offload"
HIT, PREFETCH, CPU, SPLIT = ctlmod.HIT, ctlmod.PREFETCH, ctlmod.CPU, ctlmod.SPLIT


def experts_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if not mods:
        raise UserError(f"{type(model).__name__}: no fused experts modules (gate_up_proj/down_proj) found")
    return mods


def set_impl(model, name: str) -> None:
    """Select the experts implementation (the config attribute the experts forward dispatches on)."""
    model.config._experts_implementation = name
    for m in experts_modules(model):
        m.config._experts_implementation = name


def _forward(self, hidden_states, top_k_index, top_k_weights):
    return self._tk_runner.forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, _forward)


class OffloadRunner:
    def __init__(self, model, spec, capacity: int, cap: int = 2, chunk_mb: float = 16.0,
                 params: dict | None = None, decode_tokens: int = 1, hybrid=None,
                 expert_bytes: float | None = None, cpu_kernel: str = "fused", cpu_threads: int | None = None,
                 split: bool = False):
        """hybrid: None (transfer only) or a replay Profile (needs cpu_ffn_ms) deciding CPU vs copy;
        expert_bytes: what the cost model charges per copy (default: this model's expert bytes);
        cpu_kernel: "fused" (host_ffn.ffn_fused_hf for bf16 experts of <= FUSED_MAX_TOKENS tokens, with
        cpu_threads numba threads; torch above) or "torch" (torch's host matmuls, the eager code);
        split (with hybrid): a layer's only miss may be split between a partial copy and the host."""
        import torch

        if split and hybrid is None:
            raise UserError("--split is a kind of --hybrid: pass both")
        if spec.kind == "oracle":
            raise UserError(f"policy {spec.name} is an oracle (needs future requests): trace-driven mode only")
        mods = experts_modules(model)
        cfg = model.config
        self.L, self.E, self.K = len(mods), int(mods[0].num_experts), int(cfg.num_experts_per_tok)
        self.C = capacity
        if not 1 <= capacity <= self.E:
            raise UserError(f"--capacity {capacity}: must be between 1 and {self.E}")
        dev = mods[0].gate_up_proj.device
        dt = mods[0].gate_up_proj.dtype
        twoF, H = mods[0].gate_up_proj.shape[1:]
        F = twoF // 2
        self.shape_gu, self.shape_dn = (twoF, H), (H, F)
        gu = twoF * H
        numel = gu + H * F
        self.store = ExpertStore(self.L, self.E, numel, pin=dev.type == "cuda", fill="none", dtype=dt)
        try:
            for l, m in enumerate(mods):
                self.store.layers[l][:, :gu].copy_(m.gate_up_proj.detach().reshape(self.E, -1))
                self.store.layers[l][:, gu:].copy_(m.down_proj.detach().reshape(self.E, -1))
                m.gate_up_proj = torch.nn.Parameter(torch.empty(0, device=dev, dtype=dt), requires_grad=False)
                m.down_proj = torch.nn.Parameter(torch.empty(0, device=dev, dtype=dt), requires_grad=False)
                m._tk_layer, m._tk_runner = l, self
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            self.slots = torch.empty((self.L, capacity, numel), device=dev, dtype=dt)   # [L, C, 2FH + HF]
            self.stage = torch.empty(numel, device=dev, dtype=dt) if split else None   # slot C: a split's rows
        except BaseException:
            self.store.free()
            raise
        self.gu = [[self.slots[l, s, :gu].view(twoF, H) for s in range(capacity)] for l in range(self.L)]
        self.dn = [[self.slots[l, s, gu:].view(H, F) for s in range(capacity)] for l in range(self.L)]
        step = max(1, int(chunk_mb * 1e6 // self.slots.element_size())) if chunk_mb > 0 else numel
        self.bounds = list(range(0, numel, step)) + [numel]
        self.F, self.H = F, H
        self.split = split
        self.cp = Copier(dev, self.L, capacity + split, len(self.bounds) - 1, timing=False)
        ctx = PolicyContext(self.L, self.E, capacity, self.K, 0, "none", None, self.K, dict(params or {}))
        try:
            self.st = spec.make_state(ctx)
        except NotApplicable as exc:
            self.store.free()
            raise UserError(f"policy {spec.name} cannot run model-driven: {exc}") from None
        self.spec = spec
        self.serve, self.after, self.finish = ctlmod.build(spec)
        self.ctl = ctlmod.new_controller(self.L, self.E, capacity, cap)
        self.expert_bytes = float(expert_bytes or numel * self.slots.element_size())
        self.clock = None
        if hybrid is not None:
            from types import SimpleNamespace

            from tracekit.live.cpu_worker import HybridClock

            try:
                self.clock = HybridClock(spec, SimpleNamespace(L=self.L, E=self.E), capacity, hybrid,
                                         self.expert_bytes, self.ctl, split)
            except BaseException:
                self.store.free()
                raise
            self.ctl = self.clock.ctl
        self.cpu_jobs = 0
        self.cpu_s = 0.0                 # host seconds in CPU experts (decode and prefill)
        self._host = None
        if hybrid is not None:
            try:
                self._host = _HostKernel(self.store, dt, F, H, cpu_kernel, cpu_threads)
            except BaseException:
                self.store.free()
                raise
        self.act = ctlmod.action_rows(self.ctl)
        self.decode_tokens = decode_tokens
        self.step, self.now = -1, 0
        self.log: list = []          # (step, layer, experts int16[n, K], decode) for bookkeeping checks
        register()
        set_impl(model, NAME)

    # ---- the experts forward --------------------------------------------------------------
    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        import torch
        import torch.nn.functional as Fn

        l = mod._tk_layer
        if l == 0:
            self.step += 1
        n = hidden_states.shape[0]
        idx = top_k_index.to("cpu").numpy().astype(np.int16)          # [n, K]: the one sync per layer
        flat = idx.reshape(-1)
        _, first = np.unique(flat, return_index=True)
        req_e = flat[np.sort(first)]                                   # distinct, (token, rank) order
        dec = n <= self.decode_tokens
        pos = self.step * self.L + l
        self.log.append((self.step, l, idx, dec))
        req_next = np.full(req_e.shape[0], NEVER, dtype=np.int64)
        if self.clock is None:
            m = self.serve(self.ctl, self.st, pos, l, req_e, self.now, req_next, dec, self.act)
        else:
            req_ntok = np.bincount(flat, minlength=self.E)[req_e].astype(np.int32)
            m = self.clock.serve(self.st, pos, l, req_e, self.now, req_next, dec, self.act, req_ntok, n)
        self.now += req_e.shape[0]
        rows = self.act[:m].tolist()
        cp = self.cp
        cpu_rows = [r for r in rows if r[0] == CPU or r[0] == SPLIT]
        hs_host = hidden_states.detach().to("cpu") if cpu_rows else None   # routing already synced
        route = cp.mark("route")
        last_user, deferred = {}, {}
        for i, r in enumerate(rows):
            kind, ll, sl = r[0], r[1], r[3]
            if kind == CPU:
                continue
            if kind == SPLIT:
                self._split_copy(r, route)
                continue
            if kind != HIT:
                if ll == l and sl in last_user:
                    deferred.setdefault(last_user[sl], []).append(r)
                else:
                    self._copy(r, route)
            if kind != PREFETCH:
                last_user[sl] = i
        with torch.no_grad():
            expert_mask = Fn.one_hot(top_k_index, num_classes=self.E + 1).permute(2, 1, 0)
            outs = {}
            for r in cpu_rows:                                         # host experts, copies in flight
                e, f0 = r[2], self.split_at(r[3]) if r[0] == SPLIT else 0
                gpu_part = 0.0
                if f0:                                                 # SPLIT: rows [0, f0) on the GPU, queued
                    gpu_part = self._split_gpu(mod, l, f0, hidden_states[torch.where(expert_mask[e])[1]])
                top_k_pos, token_idx, cur = self._host_expert(mod, l, e, idx, hs_host, hidden_states.device, f0)
                outs[e] = (token_idx, (cur + gpu_part) * top_k_weights[token_idx, top_k_pos, None])
            self.cpu_jobs += len(cpu_rows)
            for i, r in enumerate(rows):
                kind, e, sl = r[0], r[2], r[3]
                if kind == PREFETCH or kind == CPU or kind == SPLIT:
                    continue
                cp.wait_pending(l, sl, len(self.bounds) - 2)           # whole expert: its last chunk
                top_k_pos, token_idx = torch.where(expert_mask[e])
                current_state = hidden_states[token_idx]
                gate, up = Fn.linear(current_state, self.gu[l][sl]).chunk(2, dim=-1)
                cur = mod.act_fn(gate) * up
                cur = Fn.linear(cur, self.dn[l][sl])
                cur = cur * top_k_weights[token_idx, top_k_pos, None]
                outs[e] = (token_idx, cur)
                cp.release(l, sl)
                for d in deferred.get(i, ()):
                    self._copy(d, None)
            final = torch.zeros_like(hidden_states)
            for e in sorted(outs):
                token_idx, cur = outs[e]
                final.index_add_(0, token_idx, cur.to(final.dtype))
        lend = cp.mark("lend")
        hid = np.zeros((n, 1, 0), dtype=np.float32)
        m = self.after(self.ctl, self.st, pos, l, idx[:, None, :], hid, 0, n, 0, dec, self.spec.prefetches and dec,
                       self.act)
        if self.clock is not None:
            self.clock.after_copies(self.act, m)
        for r in self.act[:m].tolist():
            self._copy(r, lend)
        return final

    def _host_expert(self, mod, l, e, idx, hs_host, dev, f0: int = 0):
        """Expert e of layer l on the host, from the store's weights (its intermediate rows f0..F). ->
        (top_k_pos, token_idx, unweighted output), all on dev; tokens in torch.where(expert_mask[e]) order
        (rank-major), as the GPU path."""
        import time

        import torch
        import torch.nn.functional as Fn

        top_k_pos, token_idx = np.nonzero(idx.T == e)
        tok_h = torch.from_numpy(token_idx.astype(np.int64))
        t0 = time.perf_counter()
        cur = self._host.fused(l, e, hs_host[tok_h], f0)
        if cur is None:
            gu, dn = self._expert_views(self.store.layers[l][e])
            if f0 == 0:
                gate, up = Fn.linear(hs_host[tok_h], gu).chunk(2, dim=-1)
            else:
                gate, up = Fn.linear(hs_host[tok_h], gu[f0:self.F]), Fn.linear(hs_host[tok_h], gu[self.F + f0:])
            cur = Fn.linear(mod.act_fn(gate) * up, dn[:, f0:])
        self.cpu_s += time.perf_counter() - t0
        return torch.from_numpy(top_k_pos.astype(np.int64)).to(dev), tok_h.to(dev), cur.to(dev)

    @property
    def host_kernel(self) -> str | None:
        """The kernel CPU misses run ("fused" or "torch"); None without hybrid."""
        return None if self._host is None else ("fused" if self._host.on else "torch")

    @property
    def host_threads(self) -> int | None:
        """The fused kernel's numba threads; None where torch's kernel (its own threads) runs."""
        return self._host.threads if self._host is not None and self._host.on else None

    def _expert_views(self, w):
        """flat expert w [2FH + HF] -> (gate_up [2F, H], down [H, F]) views"""
        n = self.shape_gu[0] * self.shape_gu[1]
        return w[:n].view(self.shape_gu), w[n:].view(self.shape_dn)

    def split_at(self, k: int) -> int:
        return ctlmod.split_at(k, self.F)

    def _stage(self, r: int) -> tuple:
        """The staging slot's views for a split's first r rows: gate [r, H], up [r, H], down [H, r]."""
        H = self.H
        st = self.stage
        return st[: r * H].view(r, H), st[r * H: 2 * r * H].view(r, H), st[2 * r * H: 3 * r * H].view(H, r)

    def _split_copy(self, r, after) -> None:
        # a SPLIT miss's first rows (gate rows, up rows, down's columns: a 2-D copy) to the staging slot
        ll, e, k = r[1], r[2], r[3]
        f0 = self.split_at(k)
        if f0 == 0:
            return
        gu, dn = self._expert_views(self.store.layers[ll][e])
        g, u, d = self._stage(f0)
        self.cp.copy_views(ll, self.C, [(g, gu[:f0]), (u, gu[self.F: self.F + f0]), (d, dn[:, :f0])], after)

    def _split_gpu(self, mod, l: int, f0: int, x):
        """The GPU's part of a split miss: rows [0, f0) of the expert from the staging slot, on x [n, H]."""
        import torch.nn.functional as Fn

        cp = self.cp
        cp.wait_pending(l, self.C, 0)                                  # copy_views: one event, chunk 0
        g, u, d = self._stage(f0)
        y = Fn.linear(mod.act_fn(Fn.linear(x, g)) * Fn.linear(x, u), d)
        cp.release(l, self.C)
        return y

    def _copy(self, r, after) -> None:
        ll, e, sl = r[1], r[2], r[3]
        self.cp.copy(ll, sl, self.slots[ll, sl], self.store.layers[ll][e], self.bounds, after)

    def counters(self) -> dict:
        return ctlmod.counters_dict(self.ctl)

    def as_plan(self):
        """The requests this runner served, as a replay Plan (req_next = NEVER, as the runner saw it)."""
        from tracekit.replay.plan import Plan, _build

        steps = sorted({s for s, _, _, _ in self.log})
        by = {(s, l): (x, d) for s, l, x, d in self.log}
        tok_ptr, tok_ex, decode = [0], [], []
        for s in steps:
            n = by[(s, 0)][0].shape[0]
            ex = np.stack([by[(s, l)][0] for l in range(self.L)], axis=1)    # [n, L, K]
            tok_ex.append(ex)
            tok_ptr.append(tok_ptr[-1] + n)
            decode.append(1 if by[(s, 0)][1] else 0)
        tok_ptr = np.array(tok_ptr, dtype=np.int64)
        tok_ex = np.ascontiguousarray(np.concatenate(tok_ex), dtype=np.int16)
        req_ptr, req_e, req_ntok, _ = _build(tok_ptr, tok_ex, self.E)
        req_next = np.full(req_e.shape[0], NEVER, dtype=np.int64)
        hid = np.zeros((tok_ex.shape[0], self.L, 0), dtype=np.float32)
        return Plan(self.L, self.E, self.K, tok_ptr, np.array(decode, dtype=np.int8), tok_ex, hid,
                    req_ptr, req_e, req_ntok, req_next)

    def close(self) -> None:
        self.finish(self.ctl)
        self.store.free()


class _HostKernel:
    """The fused host kernel on the store's weights in transformers' layout (gate_up [2F, H] then
    down [H, F] per expert), for bf16 experts of at most FUSED_MAX_TOKENS tokens; `fused` returns None
    where torch's eager code runs instead (another dtype, more tokens, or kernel "torch")."""

    def __init__(self, store, dtype, F: int, H: int, kernel: str, threads: int | None):
        import torch

        from tracekit.live import host_ffn
        from tracekit.live.cpu_worker import default_threads

        if kernel not in host_ffn.KERNELS:
            raise UserError(f"CPU kernel {kernel!r}: expected one of {', '.join(host_ffn.KERNELS)}")
        self.kernel, self.F, self.H = kernel, F, H
        self.on = kernel == "fused" and dtype == torch.bfloat16
        self.threads = 0
        if not self.on:
            return
        import numba

        self.threads = max(1, min(threads or default_threads(), numba.config.NUMBA_NUM_THREADS))
        self.W = [t.view(torch.int16).numpy().view(np.uint16) for t in store.layers]   # [E, 2FH + HF]
        self.a = np.zeros((host_ffn.FUSED_MAX_TOKENS, F), dtype=np.float32)
        self.fn, self.max_tokens = host_ffn.ffn_fused_hf, host_ffn.FUSED_MAX_TOKENS
        numba.set_num_threads(self.threads)
        self.fn(np.zeros((1, 1), np.float32), np.zeros((2, 1), np.uint16), np.zeros((1, 1), np.uint16), 0,
                np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint16))          # compile (or load) now

    def fused(self, l: int, e: int, x, f0: int = 0):
        """x bf16 [n, H] (host) -> bf16 [n, H] (host): the expert's rows f0..F; None: not for this kernel."""
        n = x.shape[0]
        if not self.on or n > self.max_tokens or n == 0:
            return None
        import numba
        import torch

        F, H = self.F, self.H
        w = self.W[l][e]
        out = torch.empty((n, H), dtype=torch.bfloat16)
        numba.set_num_threads(self.threads)
        self.fn(x.float().numpy(), w[: 2 * F * H].reshape(2 * F, H), w[2 * F * H:].reshape(H, F), f0, self.a[:n],
                out.view(torch.int16).numpy().view(np.uint16))
        return out
