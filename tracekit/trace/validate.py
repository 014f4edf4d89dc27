"""Checks shared by the trace readers: every problem a file can have becomes one `UserError` line."""

from __future__ import annotations

import math

import numpy as np

from tracekit.errors import UserError
from tracekit.trace.core import MAX_ENTRIES, MAX_EXPERTS, SCHEMA_VERSION

ARROW_WIDTH = 2**31 - 1     # Arrow's fixed-size list / binary widths are int32


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_kind(x) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number")


def _hidden_kind_ok(kind) -> bool:
    """'none', 'full' or 'proj:N', N > 0 as the recorder's --hidden parser reads it (int())."""
    if kind in ("none", "full"):
        return True
    try:
        return kind.startswith("proj:") and int(kind[5:]) > 0
    except (AttributeError, ValueError):
        return False


def check_header(path: str, header) -> None:
    """`tracekit.header` (native file or OUT.tmp/meta.json): a JSON object with sane field types."""
    if not isinstance(header, dict):
        raise UserError(f"{path}: tracekit header is {_json_kind(header)}, not a JSON object")
    v = header.get("schema_version")
    if not is_int(v):
        raise UserError(f"{path}: tracekit metadata has no schema version")
    if v > SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {v} is newer than this tracekit ({SCHEMA_VERSION}); upgrade tracekit")

    def bad(key: str, want: str):
        return UserError(f"{path}: tracekit header {key} is {header.get(key)!r}; it must be {want}")

    for k in ("num_layers", "num_experts", "top_k"):
        if not is_int(header.get(k)) or header[k] < 1:
            raise bad(k, "an integer >= 1")
    L, E, K = header["num_layers"], header["num_experts"], header["top_k"]
    D = header.get("hidden_dim")
    if E > MAX_EXPERTS:
        raise bad("num_experts", f"at most {MAX_EXPERTS} (expert ids are int16)")
    if K > E:
        raise bad("top_k", f"at most num_experts ({E})")
    if D is not None and (not is_int(D) or D < 0):
        raise bad("hidden_dim", "null or an integer >= 0")
    kind = header.get("hidden_kind", "none")
    if not _hidden_kind_ok(kind):
        raise bad("hidden_kind", "'none', 'full' or 'proj:N'")
    if header.get("hidden_proj_seed") is not None and not is_int(header["hidden_proj_seed"]):
        raise bad("hidden_proj_seed", "null or an integer")
    if not isinstance(header.get("with_logits", True), bool):
        raise bad("with_logits", "true or false")
    if max(L * K, L * E, L * (D or 0) * 2) > ARROW_WIDTH:
        raise UserError(f"{path}: tracekit header sizes L={L}, E={E}, K={K}, D={D} make a row wider than "
                        f"Arrow allows (L*E, L*K and L*D*2 must be <= {ARROW_WIDTH})")


def check_meta(path: str, meta) -> None:
    if not isinstance(meta, dict):
        raise UserError(f"{path}: tracekit meta is {_json_kind(meta)}, not a JSON object")
    if "model" in meta and not isinstance(meta["model"], str):
        raise UserError(f"{path}: tracekit meta model is {meta['model']!r}, not a string")


def check_router(path: str, router: np.ndarray, L: int, E: int, hidden_kind: str, D) -> None:
    ok = router.ndim == 3 and router.shape[:2] == (L, E)
    if not ok or (hidden_kind == "full" and D and router.shape[2] != D):
        raise UserError(f"{path}: stored router weights have shape {router.shape}, expected "
                        f"[{L}, {E}, {D if hidden_kind == 'full' and D else 'H'}]")


def check_range(path: str, what: str, a: np.ndarray, lo: int, hi: int, where, why: str = "") -> None:
    """Refuse values of `a` outside lo..hi-1, naming the first one; where(index tuple) -> 'row 3, ...'."""
    bad = (a < lo) | (a >= hi)
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), a.shape)
        raise UserError(f"{path}: {what} {a[i]} at {where(i)} is outside {lo}..{hi - 1}{why}")


def check_entries(what: str, **dims: int) -> None:
    """Refuse a dense array of more than MAX_ENTRIES entries (dims e.g. tokens=, layers=, top_k=)."""
    n = math.prod(int(v) for v in dims.values())
    if n > MAX_ENTRIES:
        shape = " x ".join(f"{k} {v}" for k, v in dims.items())
        raise UserError(f"{what}: {shape} = {n} entries; tracekit holds at most 2**31 = {MAX_ENTRIES}")
