"""What `tracekit live` and bench/gpu_live.py run: trace-driven sweeps and model-driven equality runs."""

from __future__ import annotations

import time

from tracekit.errors import UserError
from tracekit.live.compare import cell, load_with_extras, predict, profile_for, row
from tracekit.live.executor import MIXTRAL, Shapes, TraceExecutor, make_context
from tracekit.live.ffn import chunk_rows
from tracekit.live.store import ExpertStore, layers_that_fit
from tracekit.live.tracecut import check_shape, cut


def need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"tracekit live needs a CUDA GPU, and torch {torch.__version__} sees none "
                        "(torch.cuda.is_available() is False); --trace T --dry-run runs a trace's bookkeeping alone")


def shapes_from_config(cfg) -> Shapes:
    kv = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    return Shapes(cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, kv)


def prepare(trace_path: str, layers: int | None, max_tokens: int | None, shapes: Shapes = MIXTRAL,
            dry: bool = False, log=print):
    """Read, check and cut the trace; choose how many layers the host can pin. -> (trace, plan, shapes)."""
    from tracekit.replay.plan import build_plan
    from tracekit.trace import read_trace
    from tracekit.trace.core import INCOMPLETE

    tr = read_trace(trace_path)
    if not tr.complete:
        log(f"note: {trace_path} is {INCOMPLETE}")
    if tr.num_tokens == 0:
        raise UserError(f"{trace_path}: the trace holds no tokens; nothing to run")
    check_shape(tr, shapes.L, shapes.E, f"the model ({shapes.L} layers x {shapes.E} experts)")
    if layers and layers > tr.num_layers:
        raise UserError(f"--layers {layers} > the trace's {tr.num_layers} layers")
    want = layers or shapes.L
    if not dry:
        fit = layers_that_fit(shapes.E * shapes.expert_bytes, want)
        if fit < 1:
            raise UserError(f"host RAM cannot hold even one layer of experts "
                            f"({shapes.E * shapes.expert_bytes / 1e9:.1f} GB)")
        if fit < want:
            if layers:
                from tracekit.live.store import check_fits
                check_fits(want * shapes.E * shapes.expert_bytes, f"--layers {want}")
            log(f"note: host RAM holds {fit} of {want} layers of experts; using the first {fit} layers")
            want = fit
    tr = cut(tr, want if want < tr.num_layers else None, max_tokens)
    shapes = Shapes(tr.num_layers, shapes.E, shapes.H, shapes.F, shapes.kvdim)
    return tr, build_plan(tr), shapes


def check_capacity(C: int, E: int) -> None:
    """Refuse more GPU slots per layer than the model has experts (before anything is pinned or loaded)."""
    if C > E:
        raise UserError(f"--capacity {C} > {E} experts per layer")


def trace_sweep(trace_path: str, policies: list[str], capacities: list[int], cap: int = 2,
                chunk_mbs: tuple = (16.0,), layers: int | None = None, max_tokens: int | None = 100,
                profile: str = "h100-pcie5", device: str = "cuda", dry: bool = False,
                shapes: Shapes = MIXTRAL, store=None, log=print, hybrids: tuple = (False,),
                cpu_threads: int | None = None, on_row=None, cpu_kernel: str = "fused") -> list[dict]:
    """One row per (capacity, chunking, policy, hybrid): live beside replay's prediction.
    hybrids: False (transfer only), True (hybrid) or "split" (hybrid --split). Hybrid runs decide CPU vs
    copy with replay's cost model and the same profile as the prediction."""
    from tracekit import policies as P

    tr, plan, shapes = prepare(trace_path, layers, max_tokens, shapes, dry, log)
    check_capacity(max(capacities), tr.num_experts)
    prof, raw = load_with_extras(profile)
    own = store is None and not dry
    if own:
        t0 = time.perf_counter()
        store = ExpertStore(shapes.L, shapes.E, shapes.numel, pin=device.startswith("cuda"))
        log(f"pinned store: {store.nbytes / 1e9:.1f} GB ({shapes.L} layers) in {time.perf_counter() - t0:.1f} s")
    if any(hybrids) and not dry and "cpu_threads" in raw and raw.get("cpu_kernel", "torch") != cpu_kernel:
        log(f"warning: profile {profile!r} calibrated the CPU with the {raw.get('cpu_kernel', 'torch')!r} kernel; "
            f"this run computes CPU misses with {cpu_kernel!r} (--cpu-kernel), so replay's choice and "
            f"prediction assume another CPU speed")
    out = []
    try:
        for C in capacities:
            for cmb in chunk_mbs:
                ex = TraceExecutor(shapes, C, device, store, chunk_mb=cmb, dry=dry,
                                   max_tokens=int(max(plan.tok_ptr[1:] - plan.tok_ptr[:-1])), cpu_threads=cpu_threads,
                                   cpu_kernel=cpu_kernel)
                p = profile_for(prof, len(ex.rows), cmb, raw)
                try:
                    for name in policies:
                        for hy in hybrids:
                            r = _one(ex, P.get(name), plan, tr, C, cap, p, shapes, hy, trace_path, log)
                            r["chunk_mb"] = cmb
                            r["profile"] = prof.name
                            out.append(r)
                            if on_row is not None:
                                on_row(r)
                finally:
                    ex.close()
                del ex
                if device.startswith("cuda"):
                    import torch
                    torch.cuda.empty_cache()
    finally:
        if own:
            store.free()
    return out


def _one(ex, spec, plan, tr, C, cap, p, shapes, hy, trace_path, log) -> dict:
    import os

    ctx = make_context(plan, C, tr)
    split = hy == "split"
    live = ex.run(spec, plan, C, cap, ctx, warmup_steps=2, hybrid=p if hy else None, split=split)
    live.extra["hybrid"] = bool(hy)
    live.extra["split"] = split
    rep, tok_s = predict(spec, plan, C, cap, p, shapes.expert_bytes, ctx, hybrid=bool(hy), split=split)
    r = row(live, tok_s, p, plan, p.h2d_GBps, os.path.basename(trace_path), rep.total_s - rep.decode_s)
    r["bookkeeping_equal"] = rep.counters == live.counters
    r["pred_cpu_busy_s_all_steps"] = rep.cpu_busy_s
    live_s = "- (dry run)" if ex.dry else f"{r['live_tok_s']:.2f} tok/s"
    eff = "" if ex.dry else f", eff {r['efficiency']:.2f}"
    log(f"{r['trace']} C={C} chunks={len(ex.rows)} {spec.name}{' hybrid' if hy else ''}{' split' if split else ''}: live "
        f"{live_s}, pred {cell(tok_s, '{:.2f}')}, decode hit {cell(r['decode_hit_rate'], '{:.3f}')} over "
        f"{r['decode_tokens']} decode tokens, cpu share {cell(r['cpu_share'], '{:.2f}')}{eff}, "
        f"equal={r['bookkeeping_equal']}")
    return r


def first_divergence(a, b):
    """Index of the first position where token lists a and b differ (None: identical up to the shorter)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def model_run(model: str, policy: str, capacity: int, cap: int = 2, chunk_mb: float = 16.0,
              random_weights: bool = False, prompts: str | None = None, layers: int | None = None,
              max_tokens: int = 32, device: str = "cuda", n_prompts: int = 2, log=print,
              hybrid: bool = False, profile: str = "h100-pcie5", cpu_threads: int | None = None,
              cpu_kernel: str = "fused", split: bool = False) -> dict:
    """Greedy generation without and with offloading; tokens must be identical. hybrid: each miss is
    copied or computed on the host, as replay's cost model with `profile` (needs cpu_ffn_ms) decides, with
    the host kernel `cpu_kernel` (backend.OffloadRunner) on `cpu_threads` threads; split: a layer's only
    miss may be split between a partial copy and the host."""
    import torch

    from tracekit import policies as P
    from tracekit.live.backend import OffloadRunner, set_impl
    from tracekit.record.models import load_model
    from tracekit.record.prompts import load_prompts

    texts, _src = load_prompts(prompts)
    texts = texts[:n_prompts]

    def gen(mdl, tok):
        outs, ntok = [], 0
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for t in texts:
            ids = torch.tensor([tok.encode(t)], device=device)
            with torch.no_grad():
                o = mdl.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
            outs.append(o[0, ids.shape[1]:].tolist())
            ntok += o.shape[1] - ids.shape[1]
        sync()
        return outs, ntok / (time.perf_counter() - t0)

    ld = load_model(model, device=device, random_weights=random_weights, num_layers=layers)
    set_impl(ld.model, "eager")
    gen(ld.model, ld.tokenizer) if device.startswith("cuda") else None       # warm-up
    ref, ref_tps = gen(ld.model, ld.tokenizer)
    prof = load_with_extras(profile)[0] if hybrid else None
    runner = OffloadRunner(ld.model, P.get(policy), capacity, cap, chunk_mb, hybrid=prof, cpu_kernel=cpu_kernel,
                           cpu_threads=cpu_threads, split=split)
    try:
        gen(ld.model, ld.tokenizer) if device.startswith("cuda") else None
        off, off_tps = gen(ld.model, ld.tokenizer)
    finally:
        runner.close()
    counters = runner.counters()
    info = ld.info
    res = {"model": model, "layers": info["num_hidden_layers"], "policy": policy, "capacity": capacity,
           "cap": cap, "prompts": len(texts), "new_tokens": max_tokens, "identical": ref == off,
           "first_divergence": [first_divergence(a, b) for a, b in zip(ref, off)],
           "resident_tok_s": ref_tps, "offloaded_tok_s": off_tps, "hit_rate":
           counters["hits"] / max(1, counters["requests"]), "counters": counters,
           "bytes_per_expert": info.get("bytes_per_expert"), "hybrid": hybrid,
           "cpu_share": 0.0}
    if hybrid:
        misses = max(1, counters["cpu_misses"] + counters["split_misses"] + counters["demand_transfers"])
        res.update(split=split, split_share=counters["split_misses"] / misses,
                   cpu_share=counters["cpu_misses"] / misses, cpu_kernel=runner.host_kernel,
                   cpu_threads=runner.host_threads, cpu_ms_per_job=1e3 * runner.cpu_s / max(1, runner.cpu_jobs))
    log(f"model {model} ({res['layers']} layers) {policy} C={capacity}: identical={res['identical']}, "
        f"resident {ref_tps:.2f} tok/s, offloaded {off_tps:.2f} tok/s")
    return res


__all__ = ["need_cuda", "prepare", "trace_sweep", "model_run", "first_divergence", "shapes_from_config", "chunk_rows"]
