"""Arrow schema and metadata keys of the native tracekit trace (see docs/format.md).

One Parquet row per (step, token). Per-layer values are flattened layer-major into fixed-size lists:
  experts  fixed_size_list<int16>[L*K]     ordered top-k expert ids per layer (-1 = missing)
  weights  fixed_size_list<float32>[L*K]   their routing weights
  logits   fixed_size_list<float32>[L*E]   full router logits (optional column)
  hidden   fixed_size_binary[L*D*2]        hidden state entering each MoE block as raw little-endian
                                           float16 [L, D] (optional column; a blob because Parquet
                                           encodes float16 lists 3-5x slower, measured)
The model facts, router weights [L,E,H] and versions live in the Parquet key-value metadata.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa

from tracekit.trace.core import SCHEMA_VERSION

KEY_VERSION = "tracekit.schema_version"   # "1"
KEY_COMPLETE = "tracekit.complete"        # "true" | "false"
KEY_HEADER = "tracekit.header"            # JSON: num_layers, num_experts, top_k, hidden_dim, hidden_kind, ...
KEY_META = "tracekit.meta"                # JSON: model facts, versions, generation settings, prompt source
KEY_ROUTER = "tracekit.router"            # base64 of a .npy float32 [L, E, H] (final file only)

BASE_COLUMNS = ("seq_id", "step", "phase", "position", "token_id")
BASE_TYPES = {"seq_id": pa.int32(), "step": pa.int32(), "phase": pa.int8(),
              "position": pa.int32(), "token_id": pa.int32()}
# tmp-dir layout of a recording in progress: OUT.tmp/{meta.json, router.npy, part-00000.parquet, ...}
PART_GLOB = "part-*.parquet"
TMP_META = "meta.json"
TMP_ROUTER = "router.npy"


def build_schema(num_layers: int, num_experts: int, top_k: int, hidden_dim: int | None,
                 with_logits: bool = True) -> pa.Schema:
    L, E, K = num_layers, num_experts, top_k
    fields = [pa.field(c, BASE_TYPES[c], nullable=False) for c in BASE_COLUMNS]
    fields.append(pa.field("experts", pa.list_(pa.int16(), L * K), nullable=False))
    fields.append(pa.field("weights", pa.list_(pa.float32(), L * K), nullable=False))
    if with_logits:
        fields.append(pa.field("logits", pa.list_(pa.float32(), L * E), nullable=False))
    if hidden_dim:
        fields.append(pa.field("hidden", pa.binary(L * hidden_dim * 2), nullable=False))
    return pa.schema(fields)


def header_dict(num_layers: int, num_experts: int, top_k: int, hidden_kind: str, hidden_dim: int | None,
                hidden_proj_seed: int | None, with_logits: bool) -> dict:
    return {"schema_version": SCHEMA_VERSION, "num_layers": num_layers, "num_experts": num_experts,
            "top_k": top_k, "hidden_kind": hidden_kind, "hidden_dim": hidden_dim,
            "hidden_proj_seed": hidden_proj_seed, "with_logits": with_logits}


def schema_metadata(header: dict, meta: dict, complete: bool, router: np.ndarray | None = None) -> dict:
    md = {KEY_VERSION: str(SCHEMA_VERSION), KEY_COMPLETE: "true" if complete else "false",
          KEY_HEADER: json.dumps(header), KEY_META: json.dumps(meta, default=str)}
    if router is not None:
        md[KEY_ROUTER] = encode_array(router)
    return md


def write_options(schema: pa.Schema) -> dict:
    """Parquet options: zstd + dictionaries for the small columns; the float payload (logits, hidden
    states) is stored plain and uncompressed, since it barely compresses and encoding it costs time."""
    comp, dictionary = {}, []
    for f in schema:
        path = f"{f.name}.list.element" if pa.types.is_fixed_size_list(f.type) else f.name
        comp[path] = "none" if f.name in ("logits", "hidden") else "zstd"
        if f.name in BASE_COLUMNS or f.name == "experts":
            dictionary.append(path)
    return {"compression": comp, "use_dictionary": dictionary}


def encode_array(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(s: str | bytes) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


def table_from_arrays(schema: pa.Schema, arrays: dict[str, np.ndarray]) -> pa.Table:
    """arrays: base columns [T]; experts/weights [T,L,K]; logits [T,L,E]; hidden [T,L,D]."""
    cols = []
    for f in schema:
        a = arrays[f.name]
        if pa.types.is_fixed_size_binary(f.type):  # hidden: raw little-endian float16 per row
            raw = np.ascontiguousarray(a, dtype="<f2")
            cols.append(pa.FixedSizeBinaryArray.from_buffers(f.type, raw.shape[0], [None, pa.py_buffer(raw)]))
        elif pa.types.is_fixed_size_list(f.type):
            flat = np.ascontiguousarray(a, dtype=f.type.value_type.to_pandas_dtype()).reshape(-1)
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=f.type.value_type),
                                                          f.type.list_size))
        else:
            cols.append(pa.array(np.asarray(a, dtype=f.type.to_pandas_dtype()), type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def list_column(table: pa.Table, name: str, inner: int, dtype) -> np.ndarray:
    """Fixed-size list column -> numpy [T, n/inner, inner]."""
    col = table.column(name).combine_chunks()
    T = len(col)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values.reshape(T, col.type.list_size // inner, inner)


def blob_column(table: pa.Table, name: str, inner: int) -> np.ndarray:
    """fixed_size_binary column of little-endian float16 -> numpy [T, n/inner, inner] float16."""
    col = table.column(name).combine_chunks()
    T, width = len(col), col.type.byte_width
    if T == 0:
        return np.zeros((0, width // 2 // inner, inner), dtype=np.float16)
    buf = col.buffers()[1]
    flat = np.frombuffer(buf, dtype="<f2", count=T * width // 2, offset=col.offset * width)
    return flat.astype(np.float16, copy=False).reshape(T, width // 2 // inner, inner)
