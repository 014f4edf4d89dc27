"""Open any supported trace file and return a validated `Trace`.

The format is detected from the Parquet schema:
  - tracekit native (key `tracekit.schema_version` in the metadata)  -> tracekit.trace.native
  - long interchange format (seq_id, token_idx, layer, expert, rank, weight, phase) -> longformat
Every failure a user can cause becomes one `UserError` line.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from tracekit.errors import UserError
from tracekit.trace.core import MAX_EXPERTS, Trace
from tracekit.trace.longformat import is_long_format, trace_from_long
from tracekit.trace.validate import check_entries

NATIVE_KEY = b"tracekit.schema_version"


def _open_schema(path: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable Parquet file ({msg})") from None


def read_trace(path: str | os.PathLike, load_hidden: bool = True) -> Trace:
    path = os.fspath(path)
    if path.startswith("synthetic:"):
        return _synthetic(path)
    if os.path.isdir(path) or path.endswith(".tmp"):
        from tracekit.trace.native import read_partial

        return read_partial(path, load_hidden=load_hidden)
    if not os.path.exists(path):
        partial = path + ".tmp"
        if os.path.isdir(partial):
            from tracekit.trace.native import read_partial

            return read_partial(partial, load_hidden=load_hidden)
        raise UserError(f"{path}: no such file")
    schema = _open_schema(path)
    meta = schema.metadata or {}
    if NATIVE_KEY in meta:
        from tracekit.trace.native import read_native

        return read_native(path, load_hidden=load_hidden)
    if is_long_format(schema):
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: corrupt Parquet data ({str(exc).splitlines()[0]})") from None
        return trace_from_long(table, path)
    raise UserError(
        f"{path}: not a routing trace (columns {schema.names[:8]}); expected a tracekit trace "
        "or the long format (seq_id, token_idx, layer, expert, rank, weight, phase)"
    )


def _synthetic(spec: str) -> Trace:
    """'synthetic:tokens=1000000,layers=32,experts=8,top_k=2,seed=0' -> a generated trace (benchmarks)."""
    from tracekit.trace.synthetic import synthetic_trace

    kw: dict = {}
    allowed = {"tokens", "layers", "experts", "top_k", "prefill", "hidden_dim", "seed", "stickiness"}
    for item in filter(None, spec[len("synthetic:"):].split(",")):
        key, _, val = item.partition("=")
        if key not in allowed:
            raise UserError(f"{spec}: unknown synthetic trace key {key!r}; known: {', '.join(sorted(allowed))}")
        if key in kw:
            raise UserError(f"{spec}: synthetic trace key {key!r} is given twice")
        try:
            kw[key] = float(val) if key == "stickiness" else int(val)
        except ValueError:
            raise UserError(f"{spec}: {key} wants {'a number' if key == 'stickiness' else 'an integer'}, "
                            f"got {val!r}") from None
    import inspect

    v = {k: p.default for k, p in inspect.signature(synthetic_trace).parameters.items()} | kw
    for key, ok, want in (("tokens", v["tokens"] >= 1, ">= 1"), ("layers", v["layers"] >= 1, ">= 1"),
                          ("experts", 1 <= v["experts"] <= MAX_EXPERTS, f"in 1..{MAX_EXPERTS}"),
                          ("top_k", 1 <= v["top_k"] <= v["experts"], f"in 1..experts ({v['experts']})"),
                          ("prefill", 0 <= v["prefill"] <= v["tokens"], f"in 0..tokens ({v['tokens']})"),
                          ("hidden_dim", v["hidden_dim"] >= 0, ">= 0"),
                          ("seed", 0 <= v["seed"] < 2**32, "in 0..2**32-1 (numpy's seed range)"),
                          ("stickiness", 0 <= v["stickiness"] <= 1, "in 0..1")):
        if not ok:
            raise UserError(f"{spec}: {key} must be {want}, got {v[key]}")
    T, L, E, K, D = v["tokens"], v["layers"], v["experts"], v["top_k"], v["hidden_dim"]
    check_entries(spec, tokens=T, layers=L, top_k=K)
    if D:
        check_entries(spec, tokens=T, layers=L, hidden_dim=D)
        check_entries(spec, layers=L, experts=E, hidden_dim=D)
    return synthetic_trace(**kw)
