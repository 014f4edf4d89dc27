"""`tracekit inspect`: statistics are right, and it works on native, partial and long-format traces."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracekit.cli.inspect_cmd import expert_popularity, repeat_rate
from tracekit.trace.native import TraceWriter

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces")
L, E, K = 2, 4, 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tracekit.cli", *args], capture_output=True, text=True)


def test_repeat_rate_by_hand():
    # one sequence, 4 tokens, layer 0 sets: {0,1} {1,0} {2,3} {2,3} -> repeats at tokens 1 and 3 = 2/3
    # layer 1 all different; a second sequence starts fresh (its first token is not compared)
    ex = np.array([[[0, 1], [0, 1]], [[1, 0], [2, 3]], [[2, 3], [0, 2]], [[3, 2], [1, 3]],
                   [[3, 2], [1, 3]]], dtype=np.int16)
    seq = np.array([0, 0, 0, 0, 1])
    pos = np.array([0, 1, 2, 3, 0])
    per, overall = repeat_rate(seq, np.zeros(5), pos, ex)
    np.testing.assert_allclose(per, [2 / 3, 0.0])
    assert overall == pytest.approx(2 / 6)
    ovl, _ = repeat_rate(seq, np.zeros(5), pos, ex, overlap=True)
    np.testing.assert_allclose(ovl, [(2 + 0 + 2) / 2 / 3, (0 + 0 + 1) / 2 / 3])
    # order matters by position, not by row order
    perm = np.array([3, 1, 4, 0, 2])
    per2, _ = repeat_rate(seq[perm], np.zeros(5), pos[perm], ex[perm])
    np.testing.assert_allclose(per2, per)


def test_repeat_rate_skips_missing_events():
    ex = np.array([[[0, 1]], [[-1, -1]], [[0, 1]], [[1, 0]]], dtype=np.int16)
    per, _ = repeat_rate(np.zeros(4), np.zeros(4), np.arange(4), ex)
    assert per[0] == 1.0  # only the pair (2,3) is valid


def test_expert_popularity():
    ex = np.array([[[0, 1]], [[0, 2]], [[0, -1]]], dtype=np.int16)
    pop = expert_popularity(ex, 4)
    np.testing.assert_allclose(pop, [[0.6, 0.2, 0.2, 0.0]])


def _native(path, steps=3, close=True, flush_rows=1):
    rng = np.random.default_rng(0)
    w = TraceWriter(path, num_layers=L, num_experts=E, top_k=K, meta={"model": "unit-test-model",
                                                                       "bytes_per_expert": 73728},
                    flush_rows=flush_rows)
    for s in range(steps):
        n = 2
        w.append(dict(seq_id=np.arange(n), step=np.full(n, s), phase=np.full(n, int(s > 0)),
                      position=np.full(n, s), token_id=np.arange(n),
                      experts=np.tile(np.array([[0, 1], [2, 3]], np.int16), (n, 1, 1)),
                      weights=np.full((n, L, K), 0.5), logits=rng.standard_normal((n, L, E))))
    if close:
        w.close()
    return w


def test_inspect_native_trace(tmp_path):
    out = tmp_path / "n.parquet"
    _native(out)
    p = run_cli("inspect", str(out))
    assert p.returncode == 0, p.stderr
    o = p.stdout
    assert "complete" in o and "INCOMPLETE" not in o and "unit-test-model" in o
    assert "tokens 6 (prefill 2, decode 4)" in o and "steps 3" in o and "layers 2" in o
    assert "experts 4" in o and "top-k 2" in o and "hidden states: no" in o
    assert "temporal repeat rate (top-k set equals the previous token's): 100.0%" in o
    assert "expert size: 0.07373 MB (recorded)" in o


def test_inspect_partial_recording(tmp_path):
    out = tmp_path / "p.parquet"
    _native(out, steps=4, close=False)
    for target in (out, str(out) + ".tmp"):
        p = run_cli("inspect", str(target))
        assert p.returncode == 0, p.stderr
        assert "INCOMPLETE" in p.stdout and "tokens 8" in p.stdout


@pytest.mark.parametrize("name", ["mixtral8x7b_humaneval0_prefill_decode.parquet",
                                  "flame_moe_290m_prefill_4x512.parquet"])
def test_inspect_shared_long_format(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip("../shared/traces not present")
    p = run_cli("inspect", path)
    assert p.returncode == 0, p.stderr
    assert "expert size: not recorded" in p.stdout            # the long format carries no size
    if name.startswith("mixtral"):
        assert "tokens 218 (prefill 135, decode 83)" in p.stdout and "steps 84" in p.stdout
        assert "layers 32  experts 8  top-k 2" in p.stdout and "missing token-layer events: 199" in p.stdout
    else:
        assert "experts 64  top-k 6" in p.stdout and "top experts" in p.stdout


def test_inspect_errors_are_one_line(tmp_path):
    good = tmp_path / "g.parquet"
    _native(good)
    data = good.read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.parquet").write_bytes(b"junk" * 100)
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "foreign.parquet")
    cases = {"missing.parquet": "no such file", "trunc.parquet": "not a readable Parquet",
             "junk.parquet": "not a readable Parquet", "foreign.parquet": "not a routing trace"}
    for name, needle in cases.items():
        p = run_cli("inspect", str(tmp_path / name))
        assert p.returncode == 2 and needle in p.stderr, (name, p.stderr)
        assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0
        assert p.stdout == ""
    assert good.read_bytes() == data
