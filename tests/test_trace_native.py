"""Native trace format: round trip, partial recordings, validation errors (no torch needed)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracekit.errors import UserError
from tracekit.trace import SCHEMA_VERSION, read_trace
from tracekit.trace import schema as S
from tracekit.trace.native import TraceWriter

L, E, K, D, H = 3, 8, 2, 5, 16


def _rows(rng, step: int, n: int) -> dict:
    return dict(seq_id=np.arange(n, dtype=np.int32), step=np.full(n, step, np.int32),
                phase=np.full(n, 0 if step == 0 else 1, np.int8), position=np.arange(n, dtype=np.int32) + step,
                token_id=rng.integers(3, 200, n).astype(np.int32),
                experts=rng.integers(0, E, (n, L, K)).astype(np.int16),
                weights=rng.random((n, L, K)).astype(np.float32),
                logits=rng.standard_normal((n, L, E)).astype(np.float32),
                hidden=rng.standard_normal((n, L, D)).astype(np.float16))


def _writer(out, **kw) -> TraceWriter:
    args = dict(num_layers=L, num_experts=E, top_k=K, meta={"model": "unit", "num_layers": L},
                router=np.arange(L * E * H, dtype=np.float32).reshape(L, E, H), hidden_kind="proj:5",
                hidden_dim=D, hidden_proj_seed=7)
    args.update(kw)
    return TraceWriter(out, **args)


def _cat(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_round_trip_all_columns(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "t.parquet"
    w = _writer(out, flush_rows=4)
    rows = [_rows(rng, s, 3) for s in range(6)]
    for r in rows:
        w.append(r)
    w.close()
    assert out.exists() and not (tmp_path / "t.parquet.tmp").exists()
    t = read_trace(out)
    want = _cat(rows)
    assert t.format == "tracekit" and t.complete and t.num_tokens == 18 and t.num_steps == 6
    assert (t.num_layers, t.num_experts, t.top_k) == (L, E, K)
    for k in ("seq_id", "step", "phase", "position", "token_id"):
        np.testing.assert_array_equal(getattr(t, k), want[k])
    np.testing.assert_array_equal(t.experts, want["experts"])
    np.testing.assert_array_equal(t.weights, want["weights"])
    np.testing.assert_array_equal(t.logits, want["logits"])
    np.testing.assert_array_equal(t.hidden, want["hidden"])
    assert t.hidden.dtype == np.float16 and t.experts.dtype == np.int16
    np.testing.assert_array_equal(t.router, np.arange(L * E * H, dtype=np.float32).reshape(L, E, H))
    assert t.hidden_kind == "proj:5" and t.hidden_proj_seed == 7 and t.meta["model"] == "unit"
    md = pq.read_schema(out).metadata
    assert md[S.KEY_VERSION.encode()] == str(SCHEMA_VERSION).encode()
    assert md[S.KEY_COMPLETE.encode()] == b"true"


def test_load_hidden_false_skips_column(tmp_path):
    rng = np.random.default_rng(1)
    out = tmp_path / "t.parquet"
    w = _writer(out)
    w.append(_rows(rng, 0, 4))
    w.close()
    t = read_trace(out, load_hidden=False)
    assert t.hidden is None and t.hidden_kind == "proj:5" and t.logits.shape == (4, L, E)


def test_partial_recording_is_readable_and_incomplete(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "p.parquet"
    w = _writer(out, flush_rows=3)
    rows = [_rows(rng, s, 3) for s in range(4)]
    for r in rows:
        w.append(r)
    w.append(_rows(rng, 4, 2))      # buffered, not flushed: lost if the process dies now
    tmp = tmp_path / "p.parquet.tmp"
    # final.inprogress is the streamed final file: no footer (unreadable) until close()
    assert sorted(os.listdir(tmp)) == ["final.inprogress", "meta.json", "part-00000.parquet",
                                       "part-00001.parquet", "part-00002.parquet", "part-00003.parquet",
                                       "router.npy"]
    for part in sorted(tmp.glob("part-*.parquet")):  # every part is a complete Parquet file with metadata
        assert pq.read_schema(part).metadata[S.KEY_COMPLETE.encode()] == b"false"
    for path in (out, tmp):  # X (missing) falls back to X.tmp; X.tmp directly
        t = read_trace(path)
        assert not t.complete and t.num_tokens == 12
        np.testing.assert_array_equal(t.experts, _cat(rows)["experts"])
        assert t.router.shape == (L, E, H)
    w.abort()
    assert not (tmp / "final.inprogress").exists() and read_trace(out).num_tokens == 14
    assert read_trace(out).num_tokens == 14


def test_empty_partial(tmp_path):
    out = tmp_path / "e.parquet"
    _writer(out)
    t = read_trace(out)
    assert not t.complete and t.num_tokens == 0 and t.experts.shape == (0, L, K)


def test_existing_out_not_clobbered(tmp_path):
    out = tmp_path / "x.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        _writer(out)
    assert out.read_bytes() == b"precious" and not (tmp_path / "x.parquet.tmp").exists()
    w = _writer(out, force=True)
    w.append(_rows(np.random.default_rng(3), 0, 2))
    w.close()
    assert read_trace(out).num_tokens == 2


def test_leftover_tmp_needs_force(tmp_path):
    out = tmp_path / "y.parquet"
    _writer(out)
    with pytest.raises(UserError, match="partial recording"):
        _writer(out)
    _writer(out, force=True).close()
    assert read_trace(out).complete


def test_output_paths_that_cannot_hold_a_recording(tmp_path, monkeypatch):
    from tracekit.trace import native

    (tmp_path / "f").write_text("x")
    for out, needle in [(str(tmp_path / "new") + os.sep, "names a folder"), (tmp_path, "names a folder"),
                        (tmp_path / "f" / "x.parquet", "output folder does not exist")]:
        with pytest.raises(UserError, match=needle):
            _writer(out)
    assert not (tmp_path / "new").exists()       # a trailing "/" once recorded, then failed to rename
    real = os.makedirs

    def refused(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(native.os, "makedirs", refused)  # e.g. a read-only file system (root passes os.access)
    with pytest.raises(UserError, match="cannot write the recording there"):
        _writer(tmp_path / "z.parquet")
    monkeypatch.setattr(native.os, "makedirs", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def _rewrite_meta(src, dst, **changes):
    table = pq.read_table(src)
    md = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    md.update(changes)
    pq.write_table(table.replace_schema_metadata(md), dst)


def test_newer_schema_version_rejected(tmp_path):
    out = tmp_path / "v.parquet"
    w = _writer(out)
    w.append(_rows(np.random.default_rng(4), 0, 2))
    w.close()
    header = json.loads(pq.read_schema(out).metadata[S.KEY_HEADER.encode()])
    header["schema_version"] = SCHEMA_VERSION + 1
    _rewrite_meta(out, tmp_path / "v2.parquet", **{S.KEY_HEADER: json.dumps(header)})
    with pytest.raises(UserError, match="newer"):
        read_trace(tmp_path / "v2.parquet")
    _rewrite_meta(out, tmp_path / "v3.parquet", **{S.KEY_HEADER: "{not json"})
    with pytest.raises(UserError, match="metadata"):
        read_trace(tmp_path / "v3.parquet")


def test_wrong_column_type_rejected(tmp_path):
    out = tmp_path / "c.parquet"
    w = _writer(out)
    w.append(_rows(np.random.default_rng(5), 0, 2))
    w.close()
    table = pq.read_table(out)
    bad = table.set_column(table.schema.get_field_index("experts"), "experts",
                           pa.array([[1, 2]] * 2, type=pa.list_(pa.int64())))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="experts"):
        read_trace(tmp_path / "bad.parquet")


@pytest.mark.parametrize("content", [b"", b"garbage, not parquet", "truncate"])
def test_corrupt_files_give_user_error(tmp_path, content):
    good = tmp_path / "g.parquet"
    w = _writer(good)
    w.append(_rows(np.random.default_rng(6), 0, 5))
    w.close()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content == "truncate" else content)
    with pytest.raises(UserError, match="bad.parquet"):
        read_trace(bad)


def test_foreign_and_missing(tmp_path):
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "f.parquet")
    with pytest.raises(UserError, match="not a routing trace"):
        read_trace(tmp_path / "f.parquet")
    with pytest.raises(UserError, match="no such file"):
        read_trace(tmp_path / "nope.parquet")


def test_writer_and_record_path_do_not_import_polars_or_torch_eagerly():
    code = ("import sys; import tracekit.trace.native, tracekit.record.recorder, tracekit.record.hooks, "
            "tracekit.record.generate, tracekit.record.models, tracekit.record.adapters, tracekit.record.prompts; "
            "bad = [m for m in ('polars', 'torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


LONG = dict(seq_id=[0, 0, 0, 0], token_idx=[0, 0, 1, 1], layer=[0, 0, 0, 0], expert=[1, 2, 3, 4], rank=[0, 1, 0, 1],
            weight=[.5, .5, .5, .5], phase=[1, 1, 1, 1])


@pytest.mark.parametrize("change, md, needle", [
    (dict(expert=[-1, 2, 3, 4]), None, "expert -1 at row 0 is outside 0..4"),
    (dict(layer=[0, 0, 0, -2]), None, "layer -2 at row 3 is outside 0..0"),
    (dict(phase=[7, 7, 7, 7]), None, "phase must be 0 (prefill) or 1 (decode)"),       # was read as prefill
    (dict(expert=["a", "b", "c", "d"]), None, "column expert holds string"),         # was a ValueError traceback
    (dict(expert=[1.0, 2.0, 3.0, 4.0]), None, "column expert holds double"),
    (dict(token_idx=[0, None, 1, 1]), None, "column token_idx has missing"),
    (dict(token_idx=[0, 0, 1, 2**40]), None, "token_idx 1099511627776 at row 3 is outside"),   # int32 wrap
    (dict(expert=[1, 2, 3, 100000]), None, "at most 32767"),                   # int16 ids wrapped: a row was lost
    ({k: pa.array([], pa.int64()) for k in LONG}, None, "no rows"),
    # metadata must describe the data; a huge top_k / num_layers once asked for petabytes
    ({}, {"num_experts": "4"}, "expert 4 at row 3 is outside 0..3 (metadata num_experts 4)"),
    ({}, {"num_experts": "4", "top_k": "1000000000"}, "top_k 1000000000 exceeds num_experts 4"),
    ({}, {"num_layers": "1000000000"}, "metadata num_layers 1000000000 contradicts the data: no row has layer"),
    ({}, {"top_k": "3"}, "metadata top_k 3 contradicts the data: no row has rank 2 (the highest is 1"),
    ({}, {"num_layers": "1e9"}, "metadata num_layers '1e9' is not an integer"),
    ({}, {"top_k": "0"}, "metadata top_k 0 must be >= 1"),
    (dict(layer=[0, 0, 0, 2**40]), None, "tokens 2 x layers 1099511627777 x top_k 2 = .* entries; tracekit holds at most"),
    (dict(token_idx=[0, 0, 0, 0]), None, "row 2 repeats seq_id 0, phase 1, token_idx 0, layer 0, rank 0 of an earlier row"),
    (dict(weight=[.5, float("nan"), .5, .5]), None, "weight nan at row 1 is not a finite number"),
])
def test_long_format_values_are_checked(tmp_path, change, md, needle):
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({**LONG, **change}).replace_schema_metadata(md), f)
    with pytest.raises(UserError, match="t.parquet: .*" + needle.replace("(", r"\(").replace(")", r"\)")):
        read_trace(f)
    pq.write_table(pa.table(LONG).replace_schema_metadata({"num_layers": "1", "num_experts": "9", "top_k": "2"}), f)
    t = read_trace(f)
    assert t.num_experts == 9 and t.experts.shape == (2, 1, 2) and (t.phase == 1).all()


def test_bad_bytes_per_expert_metadata_is_one_error_unless_overridden(tmp_path):
    from tracekit.replay.cost import load_profile
    from tracekit.replay.sweep import SweepConfig, load_plans, run_sweep

    f = tmp_path / "t.parquet"
    for bad in ("abc", "-5"):                 # 'abc' was a ValueError traceback; -5 gave negative bytes per token
        pq.write_table(pa.table(LONG).replace_schema_metadata({"bytes_per_expert": bad}), f)
        with pytest.raises(UserError, match="bytes_per_expert .* not a positive number; pass --expert-mb"):
            read_trace(f).expert_bytes
        cfg = SweepConfig(policies=["lru"], capacities=[1], profile=load_profile("h100-pcie5"), expert_bytes=100e6, jobs=1)
        (row,) = run_sweep(load_plans([str(f)], False), cfg)
        assert row["bytes_per_token"] > 0 and row["bytes_per_token"] % 100e6 == 0
    pq.write_table(pa.table(LONG).replace_schema_metadata({"bytes_per_expert": "3.5e8"}), f)
    assert read_trace(f).expert_bytes == 350_000_000


def _write(out, rows: dict, finish: bool = True) -> str:
    """A finished trace, or (finish=False) a partial recording whose one part is flushed."""
    w = _writer(out, flush_rows=1)
    w.append(rows)
    return w.close() if finish else str(out)


def _good(tmp_path) -> str:
    return _write(tmp_path / "g.parquet", _rows(np.random.default_rng(8), 0, 2))


@pytest.mark.parametrize("finish", [True, False])
@pytest.mark.parametrize("bad", [99, 8, -5])             # 99 made replay and live --dry-run segfault
def test_expert_ids_outside_range_refused(tmp_path, bad, finish):
    rows = _rows(np.random.default_rng(7), 0, 3)
    rows["experts"][0, 0] = (-1, E - 1)                 # a missing slot and the highest id are fine
    np.testing.assert_array_equal(read_trace(_write(tmp_path / "good.parquet", rows, finish)).experts, rows["experts"])
    rows["experts"][1, 2, 1] = bad
    with pytest.raises(UserError, match=rf"t\.parquet(\.tmp)?: expert id {bad} at row 1, layer 2, rank 1 is outside -1\.\.7"):
        read_trace(_write(tmp_path / "t.parquet", rows, finish))


@pytest.mark.parametrize("key, value, needle", [
    (S.KEY_HEADER, "[1, 2]", "tracekit header is an array, not a JSON object"),     # were AttributeErrors
    (S.KEY_HEADER, "null", "tracekit header is null, not a JSON object"),
    (S.KEY_META, "5", "tracekit meta is a number, not a JSON object"),
    (S.KEY_META, '{"model": 5}', "tracekit meta model is 5, not a string"),
    (S.KEY_HEADER, {"hidden_dim": "abc"}, "hidden_dim is 'abc'; it must be null or an integer >= 0"),  # TypeError
    (S.KEY_HEADER, {"num_layers": "3"}, "num_layers is '3'; it must be an integer >= 1"),
    (S.KEY_HEADER, {"num_layers": 0}, "num_layers is 0; it must be an integer >= 1"),
    (S.KEY_HEADER, {"num_experts": True}, "num_experts is True; it must be an integer >= 1"),
    (S.KEY_HEADER, {"top_k": 9}, "top_k is 9; it must be at most num_experts \\(8\\)"),
    (S.KEY_HEADER, {"num_layers": 10**12}, "make a row wider than Arrow allows"),   # was an OverflowError
    (S.KEY_HEADER, {"hidden_kind": "proj:x"}, "hidden_kind is 'proj:x'; it must be 'none', 'full' or 'proj:N'"),
    (S.KEY_HEADER, {"with_logits": "yes"}, "with_logits is 'yes'; it must be true or false"),
    (S.KEY_ROUTER, S.encode_array(np.zeros((2, 2, 2), np.float32)), r"router weights have shape \(2, 2, 2\)"),
])
def test_bad_native_metadata_refused(tmp_path, key, value, needle):
    good = _good(tmp_path)
    if isinstance(value, dict):
        value = json.dumps({**json.loads(pq.read_schema(good).metadata[S.KEY_HEADER.encode()]), **value})
    _rewrite_meta(good, tmp_path / "bad.parquet", **{key: value})
    with pytest.raises(UserError, match="bad.parquet: .*" + needle):
        read_trace(tmp_path / "bad.parquet")


def test_null_values_in_native_columns_refused(tmp_path):
    table = pq.read_table(_good(tmp_path))
    values = pa.array([1, None] + [0] * (2 * L * K - 2), pa.int16())
    bad = table.set_column(table.schema.get_field_index("experts"), table.schema.field("experts"),
                           pa.FixedSizeListArray.from_arrays(values, L * K))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="bad.parquet: column 'experts' has missing"):
        read_trace(tmp_path / "bad.parquet")


@pytest.mark.parametrize("make, needle", [          # make(good header) -> meta.json's content
    (lambda h: [1, 2], "meta.json is not a JSON object with a header"),             # was a TypeError
    (lambda h: {"header": [1, 2]}, "tracekit header is an array, not a JSON object"),  # was an AttributeError
    (lambda h: {"header": h, "meta": None}, "tracekit meta is null, not a JSON object"),
    (lambda h: {"header": {**h, "top_k": "2"}}, "tracekit header top_k is '2'; it must be an integer >= 1"),
])
def test_bad_partial_meta_json_refused(tmp_path, make, needle):
    tmp = tmp_path / "p.parquet.tmp"
    _writer(tmp_path / "p.parquet")
    (tmp / S.TMP_META).write_text(json.dumps(make(json.loads((tmp / S.TMP_META).read_text())["header"])))
    with pytest.raises(UserError, match="p.parquet.tmp: " + needle):
        read_trace(tmp)


def test_partial_paths_that_are_not_recordings(tmp_path):
    (tmp_path / "f.tmp").write_text("x")
    (tmp_path / "d").mkdir()
    for path, needle in [("f.tmp", "a file, not a partial recording"), ("d", "not a tracekit partial recording"),
                         ("gone.tmp", "no such partial recording directory")]:
        with pytest.raises(UserError, match=f"{path}: {needle}"):
            read_trace(tmp_path / path)


@pytest.mark.parametrize("spec, needle", [
    ("tokens=100000000000,layers=100000", r"= 20000000000000000 entries; tracekit holds at most 2\*\*31"),  # MemoryError
    ("tokens=10,hidden_dim=1000000000", r"hidden_dim 1000000000 = 40000000000 entries"),
    ("seed=99999999999999999999", r"seed must be in 0\.\.2\*\*32-1"),               # was 'Int value is too large'
    ("tokens=10,tokens=20", "key 'tokens' is given twice"),                         # silently took the last
    ("tokens=1e3", "tokens wants an integer, got '1e3'"),
    ("stickiness=x", "stickiness wants a number"),
])
def test_bad_synthetic_specs_refused(spec, needle):
    with pytest.raises(UserError, match=needle):
        read_trace("synthetic:" + spec)
    assert read_trace("synthetic:tokens=5,seed=4294967295").experts.shape == (5, 4, 2)


def test_expert_id_error_is_one_line_from_the_cli(tmp_path):
    rows = _rows(np.random.default_rng(9), 0, 2)
    rows["experts"][0, 0, 0] = 99
    p = subprocess.run([sys.executable, "-m", "tracekit.cli", "replay", _write(tmp_path / "t.parquet", rows),
                        "-p", "lru", "-c", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "expert id 99 at row 0, layer 0, rank 0" in p.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                              "traces", "*.parquet"))) or ["missing"])
def test_shared_long_format_traces_still_read(path):
    if path == "missing":
        pytest.skip("../shared/traces not present")
    t = read_trace(path)
    md = pq.read_schema(path).metadata
    assert (t.num_layers, t.num_experts, t.top_k) == tuple(int(md[k]) for k in (b"num_layers", b"num_experts", b"top_k"))
