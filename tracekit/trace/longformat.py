"""Reader for the long interchange format used by ../shared/traces.

One row per selected expert: seq_id, token_idx, layer, expert, rank, weight, phase.
Model facts (num_layers, num_experts, top_k, ...) live in the Parquet key-value metadata.
Steps: the whole prefill of a sequence is one step; each decode token is its own step.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tracekit.errors import UserError
from tracekit.trace.core import MAX_EXPERTS, Trace

LONG_COLUMNS = ("seq_id", "token_idx", "layer", "expert", "rank", "weight", "phase")


def is_long_format(schema: pa.Schema) -> bool:
    return all(c in schema.names for c in LONG_COLUMNS)


def _meta_int(meta: dict, key: str, fallback: int) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return fallback


def trace_from_long(table: pa.Table, path: str) -> Trace:
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    if table.num_rows == 0:
        raise UserError(f"{path}: the trace has no rows")
    for c in LONG_COLUMNS:
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or (c == "weight" and pa.types.is_floating(t))):
            raise UserError(f"{path}: column {c} holds {t}, not {'numbers' if c == 'weight' else 'integers'}")
        if table.column(c).null_count:
            raise UserError(f"{path}: column {c} has missing (null) values")
    cols = {c: table.column(c).to_numpy() for c in LONG_COLUMNS}
    if not np.isin(cols["phase"], (0, 1)).all():
        raise UserError(f"{path}: phase must be 0 (prefill) or 1 (decode), found {sorted(set(cols['phase'].tolist()) - {0, 1})[:5]}")
    layer = cols["layer"].astype(np.int64)
    expert = cols["expert"].astype(np.int64)
    rank = cols["rank"].astype(np.int64)
    if layer.min() < 0 or expert.min() < 0 or rank.min() < 0:
        raise UserError(f"{path}: negative layer, expert or rank values")
    L = _meta_int(meta, "num_layers", int(layer.max()) + 1)
    E = _meta_int(meta, "num_experts", int(expert.max()) + 1)
    K = _meta_int(meta, "top_k", int(rank.max()) + 1)
    if layer.max() >= L or expert.max() >= E or rank.max() >= K:
        raise UserError(f"{path}: layer/expert/rank out of range for metadata L={L} E={E} top_k={K}")
    if E > MAX_EXPERTS:
        raise UserError(f"{path}: {E} experts per layer; tracekit supports at most {MAX_EXPERTS}")
    # Token positions: unique (seq_id, phase, token_idx), sorted.
    seq = cols["seq_id"].astype(np.int64)
    ph = cols["phase"].astype(np.int64)
    tok = cols["token_idx"].astype(np.int64)
    key = np.stack([seq, ph, tok], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    T = uniq.shape[0]
    experts = np.full((T, L, K), -1, dtype=np.int16)
    weights = np.zeros((T, L, K), dtype=np.float32)
    experts[inv, layer, rank] = expert
    weights[inv, layer, rank] = cols["weight"]
    # Step index: one step per prefill of a sequence, one per decode token.
    seq_u, ph_u, tok_u = uniq[:, 0], uniq[:, 1], uniq[:, 2]
    step_key = np.where(ph_u == 0, -1, tok_u)
    new_step = np.ones(T, dtype=bool)
    new_step[1:] = (seq_u[1:] != seq_u[:-1]) | (ph_u[1:] != ph_u[:-1]) | (step_key[1:] != step_key[:-1])
    step = (np.cumsum(new_step) - 1).astype(np.int32)
    meta = dict(meta)
    meta.setdefault("model", "unknown")
    return Trace(
        path=path, format="long", complete=True, num_layers=L, num_experts=E, top_k=K,
        seq_id=seq_u.astype(np.int32), step=step, phase=ph_u.astype(np.int8),
        position=tok_u.astype(np.int32), token_id=np.full(T, -1, dtype=np.int32),
        experts=experts, weights=weights, meta=meta,
    )
