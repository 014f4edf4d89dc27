"""Turn a ReplayResult into the metric row every output format shows (formulas: docs/metrics.md)."""

from __future__ import annotations

from tracekit.replay.controller import experts_copied
from tracekit.replay.engine import ReplayResult

# Columns in display order; json/csv/parquet carry all of them.
COLUMNS = (
    "trace", "policy", "kind", "capacity", "applicable", "reason",
    "requests", "hits", "hit_rate", "decode_requests", "decode_hits", "decode_hit_rate",
    "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_dropped",
    "transfers", "decode_transfers", "transfers_per_token", "bytes_per_token",
    "transfers_above_belady", "stall_ms_per_token", "compute_ms_per_token", "time_ms_per_token",
    "stall_share", "sim_tokens_per_s", "decode_tokens", "cpu_misses", "cpu_miss_share",
    "split_misses", "split_miss_share", "cpu_ms_per_token", "expert_bytes",
)

# Each column's type (the rest are floats), so that files of any run share one schema even when a
# column holds only nulls (a trace without decode steps, a policy that cannot run).
TEXT_COLUMNS = ("trace", "policy", "kind", "reason")
INT_COLUMNS = ("capacity", "requests", "hits", "decode_requests", "decode_hits", "prefetch_issued",
               "prefetch_used", "prefetch_wasted", "prefetch_dropped", "transfers", "decode_transfers",
               "decode_tokens", "cpu_misses", "split_misses")


def _div(a: float, b: float) -> float | None:
    # a ratio over nothing (no decode tokens, no requests, no misses) is undefined: None
    # (null in JSON/CSV/Parquet, "-" in the table), never a 0 that reads as a measured zero
    return a / b if b else None


def _ms(a: float, b: float) -> float | None:
    v = _div(a, b)
    return None if v is None else 1e3 * v


def metric_row(trace: str, policy: str, kind: str, capacity: int, r: ReplayResult) -> dict:
    c = r.counters
    tok = r.decode_tokens
    return {
        "trace": trace, "policy": policy, "kind": kind, "capacity": capacity,
        "applicable": True, "reason": "",
        "requests": c["requests"], "hits": c["hits"], "hit_rate": _div(c["hits"], c["requests"]),
        "decode_requests": c["decode_requests"], "decode_hits": c["decode_hits"],
        "decode_hit_rate": _div(c["decode_hits"], c["decode_requests"]),
        "prefetch_issued": c["prefetch_issued"], "prefetch_used": c["prefetch_used"],
        "prefetch_wasted": c["prefetch_wasted"], "prefetch_dropped": c["prefetch_dropped"],
        "transfers": c["transfers"], "decode_transfers": c["decode_transfers"],
        "transfers_per_token": _div(c["decode_transfers"], tok),
        "bytes_per_token": _div(experts_copied(c, decode=True) * r.expert_bytes, tok),
        "transfers_above_belady": None,
        "stall_ms_per_token": _ms(r.decode_stall_s, tok),
        "compute_ms_per_token": _ms(r.decode_compute_s, tok),
        "time_ms_per_token": _ms(r.decode_s, tok),
        "stall_share": _div(r.decode_stall_s, r.decode_s),
        "sim_tokens_per_s": _div(tok, r.decode_s),
        "decode_tokens": tok,
        "cpu_misses": c["cpu_misses"],
        "cpu_miss_share": _div(c["cpu_misses"], c["requests"] - c["hits"]),
        "split_misses": c["split_misses"],
        "split_miss_share": _div(c["split_misses"], c["requests"] - c["hits"]),
        "cpu_ms_per_token": _ms(r.decode_cpu_busy_s, tok),
        "expert_bytes": r.expert_bytes,
    }


def not_applicable_row(trace: str, policy: str, kind: str, capacity: int, reason: str) -> dict:
    row = {k: None for k in COLUMNS}
    row.update(trace=trace, policy=policy, kind=kind, capacity=capacity, applicable=False, reason=reason)
    return row


def add_belady_gap(rows: list[dict]) -> None:
    """transfers_above_belady = decode transfers per token minus Belady's, same trace and capacity."""
    bound = {(r["trace"], r["capacity"]): r["transfers_per_token"]
             for r in rows if r["policy"] == "belady" and r["applicable"]}
    for r in rows:
        b = bound.get((r["trace"], r["capacity"]))
        if r["applicable"] and b is not None and r["transfers_per_token"] is not None:
            r["transfers_above_belady"] = r["transfers_per_token"] - b
