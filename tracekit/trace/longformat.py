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
from tracekit.trace.validate import check_entries, check_range

LONG_COLUMNS = ("seq_id", "token_idx", "layer", "expert", "rank", "weight", "phase")
DIMS = (("layer", "num_layers"), ("expert", "num_experts"), ("rank", "top_k"))   # column -> metadata key


def is_long_format(schema: pa.Schema) -> bool:
    return all(c in schema.names for c in LONG_COLUMNS)


def _meta_int(path: str, meta: dict, key: str) -> int | None:
    if key not in meta:
        return None
    try:
        v = int(meta[key])
    except ValueError:
        raise UserError(f"{path}: metadata {key} {meta[key]!r} is not an integer") from None
    if v < 1:
        raise UserError(f"{path}: metadata {key} {v} must be >= 1")
    return v


def _row(i: tuple) -> str:
    return f"row {i[0]}"


def _checked_columns(table: pa.Table, path: str, meta: dict) -> tuple[dict, int, int, int]:
    """-> (column -> numpy, L, E, K), refusing bad values and metadata that contradicts the rows."""
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
    for c in ("seq_id", "token_idx"):                  # kept as int32
        check_range(path, c, cols[c], -2**31, 2**31, _row)
    bad = ~np.isfinite(cols["weight"])
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{path}: weight {cols['weight'][i]} at row {i} is not a finite number")
    given = {k: _meta_int(path, meta, k) for k in ("num_layers", "num_experts", "top_k")}
    data = {k: max(int(cols[c].max()) + 1, 1) for c, k in DIMS}           # what the rows imply
    L, E, K = (given[k] or data[k] for k in ("num_layers", "num_experts", "top_k"))
    if E > MAX_EXPERTS:
        raise UserError(f"{path}: {E} experts per layer; tracekit supports at most {MAX_EXPERTS}")
    if K > E:
        raise UserError(f"{path}: top_k {K} exceeds num_experts {E}")
    for c, k in DIMS:
        n = given[k] or data[k]
        check_range(path, c, cols[c], 0, n, _row, f" (metadata {k} {n})" if given[k] else "")
    for c, k in (("layer", "num_layers"), ("rank", "top_k")):
        if given[k] and given[k] != data[k]:     # a layer (rank) that no row has: not this file's metadata
            raise UserError(f"{path}: metadata {k} {given[k]} contradicts the data: no row has {c} {given[k] - 1} "
                            f"(the highest is {data[k] - 1}, so {k} would be {data[k]})")
    return cols, L, E, K


def trace_from_long(table: pa.Table, path: str) -> Trace:
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    cols, L, E, K = _checked_columns(table, path, meta)
    layer, expert, rank = (cols[c].astype(np.int64) for c in ("layer", "expert", "rank"))
    # Token positions: unique (seq_id, phase, token_idx), sorted.
    seq = cols["seq_id"].astype(np.int64)
    ph = cols["phase"].astype(np.int64)
    tok = cols["token_idx"].astype(np.int64)
    key = np.stack([seq, ph, tok], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    T = uniq.shape[0]
    check_entries(path, tokens=T, layers=L, top_k=K)
    flat = (inv.astype(np.int64) * L + layer) * K + rank     # one slot per (token, layer, rank)
    order = np.argsort(flat, kind="stable")
    dup = flat[order[1:]] == flat[order[:-1]]
    if dup.any():
        i = int(order[1:][dup].min())
        raise UserError(f"{path}: row {i} repeats seq_id {seq[i]}, phase {ph[i]}, token_idx {tok[i]}, "
                        f"layer {layer[i]}, rank {rank[i]} of an earlier row")
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
