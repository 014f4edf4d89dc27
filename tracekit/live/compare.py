"""Replay's prediction beside a live run: the same plan, policy, capacity, cap and a profile."""

from __future__ import annotations

import dataclasses

from tracekit.replay.cost import Profile, interp, load_profile
from tracekit.replay.engine import replay_one


def is_nan(v) -> bool:
    # a figure a run has no value for (e.g. live tok/s under --dry-run, anything with no decode tokens)
    return isinstance(v, float) and v != v


def cell(v, f) -> str:
    # v for a table or log: "-" where there is no figure; f a format string, or a function of the value
    return "-" if is_nan(v) else f(v) if callable(f) else f.format(v)


def load_with_extras(name_or_path: str) -> tuple[Profile, dict]:
    """load_profile plus the raw JSON (for keys replay ignores, such as h2d_chunk_GBps)."""
    import json
    import os
    from importlib import resources

    prof = load_profile(name_or_path)
    if os.path.exists(name_or_path):
        raw = json.loads(open(name_or_path).read())
    else:
        raw = json.loads((resources.files("tracekit.replay") / "profiles" / f"{name_or_path}.json").read_text())
    return prof, raw


def profile_for(profile: Profile, chunks: int, chunk_mb: float, raw: dict | None = None) -> Profile:
    """The profile as the live run uses it: its chunk count, and the bandwidth measured at that chunk size."""
    bw = profile.h2d_GBps
    table = (raw or {}).get("h2d_chunk_GBps") or {}
    if chunks > 1 and table:
        sizes = sorted(float(k) for k in table)
        near = min(sizes, key=lambda k: abs(k - chunk_mb))
        bw = float(table[_key(table, near)])
    return dataclasses.replace(profile, chunks=chunks, h2d_GBps=bw)


def _key(table: dict, v: float):
    for k in table:
        if float(k) == v:
            return k
    raise KeyError(v)


def predict(spec, plan, capacity: int, cap: int, profile: Profile, expert_bytes: float, ctx=None,
            hybrid: bool = False, split: bool = False):
    """(ReplayResult, predicted decode tokens/s)."""
    kw = {"hybrid": True, "split": split} if hybrid else {}
    if ctx is not None:
        kw.update(depth=ctx.depth, router=ctx.router, hidden_kind=ctx.hidden_kind, params=ctx.params)
    r = replay_one(spec, plan, capacity, profile, cap=cap, expert_bytes=expert_bytes, **kw)
    tok_s = r.decode_tokens / r.decode_s if r.decode_s > 0 else float("nan")
    return r, tok_s


def model_compute_s(plan, profile: Profile, steps: int | None = None) -> float:
    """Decode compute of the plan by the profile alone (attention + FFN table), no copies."""
    sc, tok, sec = profile.vectors()
    attn, attn_tok = profile.attn_ms * 1e-3, profile.attn_ms_per_token * 1e-3
    S = plan.num_steps if steps is None else steps
    total = 0.0
    for s in range(S):
        if plan.decode[s] != 1:
            continue
        ntok = plan.tok_ptr[s + 1] - plan.tok_ptr[s]
        for l in range(plan.L):
            pos = s * plan.L + l
            a, b = plan.req_ptr[pos], plan.req_ptr[pos + 1]
            total += attn + attn_tok * ntok
            for i in range(a, b):
                total += interp(tok, sec, float(plan.req_ntok[i]))
    return total


def row(live, pred_tok_s: float, profile: Profile, plan, bw_GBps: float, trace_name: str = "",
        pred_nondecode_s: float = float("nan")) -> dict:
    """One results row (all per decode token where it says so). A run that timed nothing (--dry-run)
    has NaN, not 0, for every time it did not measure (null in JSON, "-" in the table)."""
    n = max(1, live.decode_tokens)
    per_tok = (1e3 / n) if live.decode_s > 0 else float("nan")     # s -> ms per decode token
    comp = model_compute_s(plan, profile)
    ideal = live.bytes_decode / (bw_GBps * 1e9) + comp
    eff = ideal / live.decode_s if live.decode_s > 0 else float("nan")
    c = live.counters
    return {
        "trace": trace_name, "policy": live.policy, "capacity": live.capacity, "cap": live.cap,
        "chunks": live.chunks, "layers": live.layers, "decode_tokens": live.decode_tokens,
        "live_tok_s": live.tok_s, "pred_tok_s": pred_tok_s,
        "ratio_pred_live": pred_tok_s / live.tok_s if live.tok_s > 0 else float("nan"),
        "fidelity_err": abs(pred_tok_s - live.tok_s) / live.tok_s if live.tok_s > 0 else float("nan"),
        "hit_rate": live.hit_rate,
        "decode_hit_rate": c["decode_hits"] / c["decode_requests"] if c["decode_requests"] else float("nan"),
        "transfers": c["transfers"], "decode_transfers": c["decode_transfers"],
        "bytes_per_token_MB": live.bytes_decode / n / 1e6,
        "ms_per_token": live.decode_s * per_tok,
        "stall_ms_per_token": live.stall_s * per_tok,
        "compute_ms_per_token": live.compute_s * per_tok,
        "gap_ms_per_token": live.gap_s * per_tok,
        "policy_ms_per_token": live.policy_s / n * 1e3,
        "stall_share": live.stall_s / live.decode_s if live.decode_s > 0 else float("nan"),
        "achieved_GBps": live.achieved_GBps,
        "model_compute_ms_per_token": comp / n * 1e3,
        "efficiency": eff,
        "nondecode_s": live.extra.get("all_steps_s", float("nan")) - live.decode_s,   # prefill steps (GPU)
        "pred_nondecode_s": pred_nondecode_s,
        "counters": dict(c),
        "hybrid": bool(live.extra.get("hybrid", False)),
        "cpu_misses": c.get("cpu_misses", 0), "decode_cpu_misses": c.get("decode_cpu_misses", 0),
        "cpu_share": (c.get("decode_cpu_misses", 0) / (c["decode_requests"] - c["decode_hits"])
                      if c["decode_requests"] > c["decode_hits"] else 0.0),
        "split": bool(live.extra.get("split", False)),
        "split_share": (c.get("decode_split_misses", 0) / (c["decode_requests"] - c["decode_hits"])
                        if c["decode_requests"] > c["decode_hits"] else 0.0),
        "cpu_wait_ms_per_token": live.cpu_wait_s * per_tok,
        "cpu_busy_ms_per_token": live.cpu_busy_s * per_tok,
        "cpu_ms_per_job": live.cpu_busy_s / live.cpu_jobs * 1e3 if live.cpu_jobs else float("nan"),
        "cpu_threads": live.extra.get("cpu_threads", 0),
        "cpu_kernel": live.extra.get("cpu_kernel", ""),
        "cpu_result_wait": live.extra.get("cpu_result_wait", ""),
    }
