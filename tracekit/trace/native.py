"""Native tracekit trace: streaming writer and validating readers (no polars, no torch).

Writing `OUT`:
  OUT.tmp/meta.json, OUT.tmp/router.npy       written first
  OUT.tmp/part-00000.parquet, ...             one complete Parquet file per flush (temp name, then rename)
  close(): OUT.tmp/final.inprogress (fed part by part) gets its footer, is renamed to OUT, OUT.tmp/ is removed.
A killed run leaves every flushed part readable through `read_partial` (Trace.complete = False).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit.errors import UserError
from tracekit.outfiles import check_new_file
from tracekit.trace import schema as S
from tracekit.trace.core import SCHEMA_VERSION, Trace
from tracekit.trace.validate import check_header, check_meta, check_range, check_router


def check_out_path(out: str | os.PathLike, force: bool) -> str:
    """The output file a recording may be written to (checked before any model loads), as str:
    check_new_file's rules, and no partial recording (OUT.tmp) in the way without force."""
    out = check_new_file(out, force)
    if os.path.exists(out + ".tmp") and not force:
        raise UserError(f"{out}.tmp: a partial recording is in the way (pass --force to replace it)")
    return out


class TraceWriter:
    """Append per-step token rows; flush to a part file every `flush_rows` rows.

    append() arrays: seq_id/step/phase/position/token_id [T]; experts/weights [T,L,K];
    logits [T,L,E] (if with_logits); hidden [T,L,D] (if hidden_dim).
    """

    def __init__(self, out: str | os.PathLike, *, num_layers: int, num_experts: int, top_k: int,
                 meta: dict, router: np.ndarray | None = None, hidden_kind: str = "none",
                 hidden_dim: int | None = None, hidden_proj_seed: int | None = None,
                 with_logits: bool = True, force: bool = False, flush_rows: int = 4096,
                 flush_bytes: int = 64 << 20, background: bool = False):
        self.out = check_out_path(out, force)
        self.tmp = self.out + ".tmp"
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp) if os.path.isdir(self.tmp) else os.remove(self.tmp)
        self.header = S.header_dict(num_layers, num_experts, top_k, hidden_kind,
                                    hidden_dim if hidden_kind != "none" else None, hidden_proj_seed, with_logits)
        self.meta = dict(meta)
        self.router = None if router is None else np.asarray(router, dtype=np.float32)
        self.schema = S.build_schema(num_layers, num_experts, top_k, self.header["hidden_dim"], with_logits)
        self.flush_rows, self.flush_bytes = flush_rows, flush_bytes
        self._buf: list[dict] = []
        self._buf_rows = self._buf_bytes = 0
        self.parts = 0
        self.rows = 0
        self.closed = False
        self._futures: list = []
        self._pool = None
        self._final = None         # OUT.tmp/final.inprogress, streamed part by part (no merge at close)
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracekit-writer")
        try:
            os.makedirs(self.tmp)
            if self.router is not None:
                np.save(os.path.join(self.tmp, S.TMP_ROUTER), self.router, allow_pickle=False)
            _atomic_write_text(os.path.join(self.tmp, S.TMP_META),
                               json.dumps({"header": self.header, "meta": self.meta}, default=str, indent=1))
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise UserError(f"{self.tmp}: cannot write the recording there ({exc.strerror or exc})") from None

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = int(np.asarray(arrays["seq_id"]).shape[0])
        if n == 0:
            return
        self._buf.append(arrays)
        self._buf_rows += n
        self._buf_bytes += sum(np.asarray(a).nbytes for a in arrays.values())
        if self._buf_rows >= self.flush_rows or self._buf_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        buf, part = self._buf, self.parts
        self._buf, self._buf_rows, self._buf_bytes = [], 0, 0
        self.parts += 1
        self.rows += sum(int(np.asarray(b["seq_id"]).shape[0]) for b in buf)
        if self._pool is None:
            self._write_part(buf, part)
        else:  # overlap Parquet encoding with generation; one worker keeps parts in order
            self._raise_failed()
            self._futures.append(self._pool.submit(self._write_part, buf, part))

    def _write_part(self, buf: list[dict], part: int) -> None:
        cat = {name: np.concatenate([b[name] for b in buf]) for name in self.schema.names}
        table = S.table_from_arrays(self.schema, cat)
        table = table.replace_schema_metadata(S.schema_metadata(self.header, self.meta, complete=False))
        final = os.path.join(self.tmp, f"part-{part:05d}.parquet")
        pq.write_table(table, final + ".inprogress", **S.write_options(self.schema))
        os.replace(final + ".inprogress", final)
        # the same rows go into the final file, which only gets a footer (and its name) at close
        if self._final is None:
            # complete=true is safe here: this file only gets its footer and its name at close()
            md = S.schema_metadata(self.header, self.meta, complete=True, router=self.router)
            self._final = pq.ParquetWriter(os.path.join(self.tmp, "final.inprogress"),
                                           self.schema.with_metadata(md), **S.write_options(self.schema))
        self._final.write_table(table.replace_schema_metadata(self._final.schema.metadata))

    def _raise_failed(self) -> None:
        for f in [f for f in self._futures if f.done()]:
            self._futures.remove(f)
            f.result()  # re-raises a failed background write

    def wait(self) -> None:
        """Block until every submitted part is on disk."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def update_meta(self, **kv) -> None:
        self.meta.update(kv)

    def close(self) -> str:
        """Flush, finish OUT.tmp/final.inprogress (complete=true), rename it to OUT, remove OUT.tmp/."""
        if self.closed:
            return self.out
        self.flush()
        self.wait()
        self._shutdown()
        inprog = os.path.join(self.tmp, "final.inprogress")
        if self._final is None:            # no rows at all: an empty, complete trace
            self._final = pq.ParquetWriter(inprog, self.schema.with_metadata(
                S.schema_metadata(self.header, self.meta, complete=True, router=self.router)),
                **S.write_options(self.schema))
        # meta gained fields while recording (generated text, counts): file-level key-value
        # metadata overrides the schema's copy (see read_native)
        self._final.add_key_value_metadata({S.KEY_META: json.dumps(self.meta, default=str)})
        self._final.close()
        self._final = None
        os.replace(inprog, self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.closed = True
        return self.out

    def abort(self) -> None:
        """Keep what was recorded: flush the buffer and leave OUT.tmp/ as a readable partial trace."""
        try:
            self.flush()
            self.wait()
        finally:
            self._shutdown()
            if self._final is not None:        # parts are the partial trace; the final file is not
                self._final.close()
                self._final = None
                os.remove(os.path.join(self.tmp, "final.inprogress"))
            self.closed = True

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _atomic_write_text(path: str, text: str) -> None:
    with open(path + ".inprogress", "w") as f:
        f.write(text)
    os.replace(path + ".inprogress", path)


def _parts(tmpdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(tmpdir, S.PART_GLOB)))


def _trace_from_table(path: str, table: pa.Table, header: dict, meta: dict, router, complete: bool,
                      load_hidden: bool) -> Trace:
    L, E, K = header["num_layers"], header["num_experts"], header["top_k"]
    D = header.get("hidden_dim")
    expected = S.build_schema(L, E, K, D, header.get("with_logits", True))
    for f in expected:
        if f.name == "hidden" and not load_hidden:
            continue
        if f.name not in table.schema.names or not table.schema.field(f.name).type.equals(f.type):
            raise UserError(f"{path}: column {f.name!r} is missing or has the wrong type for schema "
                            f"version {SCHEMA_VERSION}")
    for c in table.column_names:
        col = table.column(c)
        if col.null_count or (pa.types.is_fixed_size_list(col.type)
                              and sum(ch.flatten().null_count for ch in col.chunks)):
            raise UserError(f"{path}: column {c!r} has missing (null) values")
    if router is not None:
        check_router(path, router, L, E, header.get("hidden_kind", "none"), D)
    base = {c: table.column(c).to_numpy() for c in S.BASE_COLUMNS}
    experts = S.list_column(table, "experts", K, np.int16)
    check_range(path, "expert id", experts, -1, E, lambda i: f"row {i[0]}, layer {i[1]}, rank {i[2]}")
    logits = S.list_column(table, "logits", E, np.float32) if "logits" in expected.names else None
    hidden = S.blob_column(table, "hidden", D) if (D and load_hidden) else None
    return Trace(
        path=path, format="tracekit", complete=complete, num_layers=L, num_experts=E, top_k=K,
        seq_id=base["seq_id"].astype(np.int32), step=base["step"].astype(np.int32),
        phase=base["phase"].astype(np.int8), position=base["position"].astype(np.int32),
        token_id=base["token_id"].astype(np.int32), experts=experts,
        weights=S.list_column(table, "weights", K, np.float32),
        logits=logits, hidden=hidden, router=router,
        hidden_kind=header.get("hidden_kind", "none"), hidden_proj_seed=header.get("hidden_proj_seed"),
        meta=meta,
    )


def _columns(schema: pa.Schema, load_hidden: bool) -> list[str]:
    return [n for n in schema.names if load_hidden or n != "hidden"]


def read_native(path: str, load_hidden: bool = True) -> Trace:
    try:
        pf = pq.ParquetFile(path)
        raw = dict(pf.schema_arrow.metadata or {})
        raw.update(pf.metadata.metadata or {})     # keys added at close (complete, meta) win
        md = {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}
        header = json.loads(md[S.KEY_HEADER])
        meta = json.loads(md.get(S.KEY_META, "{}"))
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: tracekit metadata is missing or unreadable") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    check_header(path, header)
    check_meta(path, meta)
    router = None
    if S.KEY_ROUTER in md:
        try:
            router = S.decode_array(md[S.KEY_ROUTER]).astype(np.float32, copy=False)
        except Exception:
            raise UserError(f"{path}: stored router weights are corrupt") from None
    try:
        table = pf.read(columns=_columns(pf.schema_arrow, load_hidden))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: corrupt Parquet data ({_first_line(exc)})") from None
    complete = md.get(S.KEY_COMPLETE, "false") == "true"
    return _trace_from_table(path, table, header, meta, router, complete, load_hidden)


def read_partial(path: str, load_hidden: bool = True) -> Trace:
    """Read OUT.tmp/ (a recording in progress or killed): every flushed part, complete=False."""
    tmpdir = path
    if not os.path.isdir(tmpdir):
        if os.path.exists(tmpdir):
            raise UserError(f"{path}: a file, not a partial recording (a directory X.tmp/ with meta.json and parts)")
        raise UserError(f"{path}: no such partial recording directory")
    try:
        with open(os.path.join(tmpdir, S.TMP_META)) as f:
            info = json.load(f)
        header, meta = info["header"], info.get("meta", {})
    except (TypeError, AttributeError):       # valid JSON, but not {"header": ..., "meta": ...}
        raise UserError(f"{path}: {S.TMP_META} is not a JSON object with a header") from None
    except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        files = sorted(f for f in os.listdir(tmpdir) if f.endswith(".parquet"))
        if files and not _parts(tmpdir):      # Parquet files, but none a recording's part
            raise UserError(f"{path}: a directory of {len(files)} Parquet file(s), not a trace; pass the files "
                            f"themselves (e.g. {os.path.join(path, '*.parquet')})") from None
        raise UserError(f"{path}: not a tracekit partial recording (meta.json missing or unreadable)") from None
    check_header(path, header)
    check_meta(path, meta)
    router = None
    rpath = os.path.join(tmpdir, S.TMP_ROUTER)
    if os.path.exists(rpath):
        try:
            router = np.load(rpath, allow_pickle=False).astype(np.float32, copy=False)
        except Exception:
            router = None
    schema = S.build_schema(header["num_layers"], header["num_experts"], header["top_k"],
                            header.get("hidden_dim"), header.get("with_logits", True))
    cols = _columns(schema, load_hidden)
    tables = []
    for part in _parts(tmpdir):
        try:
            tables.append(pq.read_table(part, columns=cols).replace_schema_metadata(None))
        except (pa.ArrowInvalid, OSError):
            break  # a damaged part ends the readable prefix
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = schema.empty_table().select(cols)
    return _trace_from_table(path, table, header, meta, router, complete=False, load_hidden=load_hidden)


def _first_line(exc: Exception) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else type(exc).__name__
