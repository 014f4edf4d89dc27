"""tracekit replay end to end: outputs, errors, no torch, hybrid, the cost model's breakdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
TWO = SHARED / "mixtral8x7b_humaneval_2probs_decode.parquet"
needs_shared = pytest.mark.skipif(not TWO.exists(), reason="../shared/traces not present")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tracekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)                # a hang fails the test instead of stalling the suite


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@needs_shared
def test_json_rows_reproduce_reference_and_bound(tmp_path):
    out = tmp_path / "r.parquet"
    r = run_cli("replay", TWO, "--policy", "lru,belady,trajectory", "--capacity", "2,4", "--format", "json",
                "--out", out, "--jobs", "1")
    assert r.returncode == 0, r.stderr
    rows = {(x["policy"], x["capacity"]): x for x in json_rows(r.stdout)}
    assert len(rows) == 6
    for key in ("trace", "policy", "capacity", "applicable", "requests", "hit_rate", "decode_hit_rate",
                "transfers_per_token", "bytes_per_token", "sim_tokens_per_s"):
        assert key in rows[("lru", 2)]
    assert round(rows[("lru", 2)]["decode_hit_rate"], 4) == 0.3431
    assert round(rows[("belady", 4)]["decode_hit_rate"], 4) == 0.7628
    assert rows[("belady", 2)]["transfers_above_belady"] == 0
    assert rows[("lru", 2)]["transfers_above_belady"] > 0
    # fewer bytes per token -> more simulated tokens/s
    assert rows[("belady", 2)]["sim_tokens_per_s"] > rows[("lru", 2)]["sim_tokens_per_s"]
    assert rows[("trajectory", 2)]["applicable"] is False and "hidden" in rows[("trajectory", 2)]["reason"]
    table = pq.read_table(out)
    assert table.num_rows == 6 and "sim_tokens_per_s" in table.column_names


@needs_shared
def test_plot_and_csv(tmp_path):
    png = tmp_path / "c.png"
    r = run_cli("replay", TWO, "-p", "lru,belady", "-c", "1,2", "--format", "csv", "--plot", png, "-j", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("trace,policy,kind,capacity")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_shared
def test_table_gives_a_policy_that_cannot_run_one_row_and_its_reason_once():
    r = run_cli("replay", TWO, "--policy", "lru,trajectory", "--capacity", "2,4", "-j", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    lru = [ln for ln in lines if ln.startswith("│ lru ")]
    traj = [ln for ln in lines if ln.startswith("│ trajectory ")]
    assert len(lru) == 2 and "0.3431" in lru[0] and "0.6033" in lru[1]
    assert len(traj) == 1 and "2,4" in traj[0] and "n/a" in traj[0]
    reasons = [ln for ln in lines if "not applicable" in ln]
    assert len(reasons) == 1 and reasons[0].startswith("trajectory: not applicable: needs hidden states")
    assert max(map(len, lines)) < 160          # the reason no longer stretches a column


def test_table_units_follow_the_expert_size():
    # a tiny model's bytes and times once printed as 0.000 GB/tok and 0.0 ms
    rows = {}
    for mb in ("352", "0.07"):
        r = run_cli("replay", "synthetic:tokens=200,layers=2", "-p", "lru", "-c", "2", "--expert-mb", mb,
                    "--format", "json", "-j", "1")
        rows[mb] = json.loads(r.stdout)
        r = run_cli("replay", "synthetic:tokens=200,layers=2", "-p", "lru", "-c", "2", "--expert-mb", mb, "-j", "1")
        rows[mb]["table"] = next(ln for ln in r.stdout.splitlines() if ln.startswith("│ lru ")).split("│")
        rows[mb]["header"] = next(ln for ln in r.stdout.splitlines() if "xfer/tok" in ln)
    big, small = rows["352"], rows["0.07"]
    assert "GB/tok" in big["header"] and f"{big['bytes_per_token'] / 1e9:.3f}" == big["table"][6].strip()
    assert f"{big['stall_ms_per_token']:.1f}" == big["table"][8].strip()
    assert "MB/tok" in small["header"] and f"{small['bytes_per_token'] / 1e6:.2f}" == small["table"][6].strip()
    assert small["stall_ms_per_token"] < 1 and f"{small['stall_ms_per_token']:.3g}" == small["table"][8].strip()
    assert float(small["table"][6]) > 0 and float(small["table"][8]) > 0


@needs_shared
def test_table_names_the_policy_with_the_most_tokens_per_s_and_the_bound():
    r = run_cli("replay", TWO, "--policy", "lru,fifo,belady", "--capacity", "2,4", "--format", "json", "-j", "1")
    rows = json_rows(r.stdout)
    want = []
    for C in (2, 4):
        online = [x for x in rows if x["capacity"] == C and x["policy"] != "belady"]
        top = max(online, key=lambda x: x["sim_tokens_per_s"])
        bound = next(x for x in rows if x["capacity"] == C and x["policy"] == "belady")
        assert bound["sim_tokens_per_s"] >= top["sim_tokens_per_s"]
        want.append(f"C={C} {top['policy']} {top['sim_tokens_per_s']:.2f} (belady {bound['sim_tokens_per_s']:.2f})")
    r = run_cli("replay", TWO, "--policy", "lru,fifo,belady", "--capacity", "2,4", "-j", "1")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("most simulated tokens/s"))
    assert "; ".join(want) in line
    r = run_cli("replay", TWO, "--policy", "fifo", "--capacity", "2", "-j", "1")      # no belady asked for
    assert "C=2 fifo " in r.stdout and "(belady" not in r.stdout


def test_errors_are_one_line_and_nothing_is_overwritten(tmp_path):
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    existing = tmp_path / "keep.parquet"
    existing.write_bytes(b"precious")
    profiles = {"list": "[1, 2]", "missing": '{"h2d_GBps": 54}',     # a list ended in an AttributeError
                "negative": '{"h2d_GBps": -5, "copy_overhead_us": 7, "expert_MB": 352, "attn_ms": 0.1}',
                "ffn": '{"h2d_GBps": 54, "copy_overhead_us": 7, "expert_MB": 352, "attn_ms": 0.1, "ffn_ms": {"x": 1}}',
                "inf": '{"h2d_GBps": Infinity, "copy_overhead_us": 7, "expert_MB": 352, "attn_ms": 0.1}',
                "chunks": '{"h2d_GBps": 54, "copy_overhead_us": 7, "expert_MB": 352, "attn_ms": 0.1, "chunks": 2.5}'}
    for name, text in profiles.items():
        (tmp_path / f"{name}.json").write_text(text)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")     # these two ended in tracebacks
    (tmp_path / "dir.json").mkdir()
    profiles.update(binary=None, dir=None)
    cases = [("replay", "synthetic:tokens=50,layers=2", "--profile", tmp_path / f"{n}.json") for n in profiles] + [
        ("replay", tmp_path / "missing.parquet"),
        ("replay", foreign),
        ("replay", corrupt),
        ("replay", "synthetic:tokens=50,layers=2", "--policy", "nope"),
        ("replay", "synthetic:tokens=50,layers=2", "--capacity", "0"),
        ("replay", "synthetic:tokens=50,layers=2", "--profile", "no-such-gpu"),
        ("replay", "synthetic:tokens=50,layers=2", "--out", existing),
        ("replay", "synthetic:tokens=50,layers=2", "--out", tmp_path, "--force"),     # a folder
        ("replay", "synthetic:tokens=50,layers=2", "--plot", str(tmp_path / "new") + "/"),
        ("replay", "synthetic:tokens=50,layers=2", "--expert-mb", "-5"),
        ("replay", "synthetic:tokens=50,layers=2", "--expert-mb", "inf"),     # printed Infinity, not JSON
        ("replay", "synthetic:tokens=50,layers=2", "--policy", ","),           # ran no policy
        ("replay", foreign, "--out", foreign, "--force"),                      # an input, even with --force
        ("replay", "synthetic:tokens=50,layers=2", "--out", tmp_path / "o", "--plot", tmp_path / "o"),
        ("replay", "synthetic:tokens=50,layers=2", "--jobs", "-3"),
        ("replay", "synthetic:tokens=50,layers=2", "--depth", "-1"),
        ("replay", "synthetic:tokens=0"),                      # ran, with empty rows
        ("replay", "synthetic:tokens=50,experts=2,top_k=4"),   # drawing 4 distinct of 2 experts never ended
        ("replay", "synthetic:tokens=50,stickiness=2"),
        ("replay", tmp_path),                 # a folder of Parquet files, not a partial recording
    ]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode != 0, args
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert existing.read_bytes() == b"precious" and not (tmp_path / "o").exists()
    (tmp_path / "nocpu.json").write_text('{"name": "h100-pcie5", "h2d_GBps": 54, "copy_overhead_us": 7, '
                                         '"expert_MB": 352, "attn_ms": 0.1}')
    r2 = run_cli("replay", "synthetic:tokens=50,layers=2", "--hybrid", "--profile", tmp_path / "nocpu.json")
    assert r2.returncode == 2 and "nocpu.json: no cpu_ffn_ms table" in r2.stderr   # named the name inside
    assert pq.read_table(foreign).column_names == ["a"]
    assert "a directory of 3 Parquet file(s), not a trace" in r.stderr


def test_replay_never_imports_torch():
    code = ("import sys; from tracekit.cli.app import main\n"
            "try:\n    main(['replay', 'synthetic:tokens=200,layers=2', '-p', 'lru', '-c', '1', '-f', 'json', '-j', '1'])\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_help_imports_no_heavy_library():
    code = ("import sys; import tracekit.cli.app as a; a._register()\n"
            "heavy = [m for m in ('torch', 'transformers', 'numba') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_shared
def test_hybrid_moves_fewer_bytes_and_uses_the_cpu():
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.trace import read_trace

    plan = build_plan(read_trace(TWO))
    prof = load_profile("h100-pcie5")
    base = replay_one(policies.get("lru"), plan, 2, prof)
    hyb = replay_one(policies.get("lru"), plan, 2, prof, hybrid=True)
    c0, c1 = base.counters, hyb.counters
    assert c0["cpu_misses"] == 0 and c1["cpu_misses"] > 0
    # every request is a hit, a copied miss or a CPU miss
    assert c1["hits"] + c1["demand_transfers"] + c1["cpu_misses"] == c1["requests"]
    assert c1["transfers"] < c0["transfers"]
    assert hyb.decode_tokens / hyb.decode_s > base.decode_tokens / base.decode_s
    assert hyb.cpu_busy_s > 0


@needs_shared
def test_cli_split_json_rows():
    # `tracekit replay --hybrid --split --format json`: the split columns are there, every request is a
    # hit, a copied miss, a CPU miss or a split miss, and split misses cut the bytes per token further
    rows = {}
    for flags in (["--hybrid"], ["--hybrid", "--split"]):
        r = run_cli("replay", TWO, "--policy", "lru", "--capacity", "2", "--format", "json", "--jobs", "1", *flags)
        assert r.returncode == 0, r.stderr
        rows[len(flags)] = json_rows(r.stdout)[0]
    h, sp = rows[1], rows[2]
    assert h["split_misses"] == 0 and sp["split_misses"] > 0 and 0 < sp["split_miss_share"] < 1
    assert sp["bytes_per_token"] < h["bytes_per_token"]
    assert sp["sim_tokens_per_s"] > h["sim_tokens_per_s"]


def test_cost_breakdown_adds_up():
    """A decode-only trace with every request a miss: time = attention + copies, stall = copy wait."""
    import numpy as np

    from tracekit import policies
    from tracekit.replay.cost import Profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.trace.core import Trace

    T, L = 10, 1
    ex = np.zeros((T, L, 1), dtype=np.int16)
    ex[1::2] = 1                                 # experts 0,1,0,1,... with C=1: every request misses
    tr = Trace(path="t", format="synthetic", complete=True, num_layers=L, num_experts=2, top_k=1,
               seq_id=np.zeros(T, np.int32), step=np.arange(T, dtype=np.int32), phase=np.ones(T, np.int8),
               position=np.arange(T, dtype=np.int32), token_id=np.zeros(T, np.int32), experts=ex,
               weights=np.ones((T, L, 1), np.float32))
    prof = Profile(name="t", h2d_GBps=1.0, copy_overhead_us=0.0, expert_MB=1.0, attn_ms=1.0, ffn_ms={"1": 2.0})
    r = replay_one(policies.get("lru"), build_plan(tr), 1, prof)
    assert r.counters["transfers"] == T and r.counters["hits"] == 0
    # per token: attention 1 ms, copy 1 ms (1 MB at 1 GB/s) issued after attention, FFN 2 ms
    assert r.decode_s == pytest.approx(T * 4e-3)
    assert r.decode_stall_s == pytest.approx(T * 1e-3)
    assert r.decode_compute_s == pytest.approx(T * 3e-3)
    assert r.bytes == pytest.approx(T * 1e6)


def test_split_miss_cost_by_hand():
    """Every request the layer's only miss, copy 10 ms, CPU 6 ms, activation 0.5 ms each way: both parts
    end together at x = (0.5 + 6 + 0.5) / (10 + 6) = 28/64 of the rows over the bus, 36/64 on the CPU."""
    import numpy as np

    from tracekit import policies
    from tracekit.replay.cost import Profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.metrics import metric_row
    from tracekit.replay.plan import build_plan
    from tracekit.trace.core import Trace

    T, L, D = 6, 1, 4                                          # D decode steps after T - D prefill steps
    ex = np.zeros((T, L, 1), dtype=np.int16)
    ex[1::2] = 1
    phase = np.ones(T, np.int8)
    phase[:T - D] = 0
    tr = Trace(path="t", format="synthetic", complete=True, num_layers=L, num_experts=2, top_k=1,
               seq_id=np.zeros(T, np.int32), step=np.arange(T, dtype=np.int32), phase=phase,
               position=np.arange(T, dtype=np.int32), token_id=np.zeros(T, np.int32), experts=ex,
               weights=np.ones((T, L, 1), np.float32))
    prof = Profile(name="t", h2d_GBps=1.0, copy_overhead_us=0.0, expert_MB=10.0, attn_ms=1.0, ffn_ms={"1": 0.64},
                   cpu_ffn_ms={"1": 6.0}, act_copy_us=500.0)
    spec, plan = policies.get("lru"), build_plan(tr)
    whole = replay_one(spec, plan, 1, prof, hybrid=True)
    r = replay_one(spec, plan, 1, prof, hybrid=True, split=True)
    assert whole.counters["cpu_misses"] == T                  # 6 + 2 x 0.5 ms beats a 10 ms copy
    c = r.counters
    assert c["split_misses"] == T and c["split_units"] == 28 * T and c["cpu_misses"] == 0
    assert c["transfers"] == 0 and c["hits"] == 0             # split experts are never cached
    # per token: attention 1; copy part 10 x 28/64 = 4.375, then the GPU's part 0.64 x 28/64 = 0.28;
    # CPU part 0.5 + 6 x 36/64 + 0.5 = 4.375 -> the layer ends at 1 + 4.375 + 0.28
    assert r.decode_s == pytest.approx(D * 5.655e-3)
    assert whole.decode_s == pytest.approx(D * 8e-3)          # 1 + 0.5 + 6 + 0.5
    assert r.bytes == pytest.approx(T * 10e6 * 28 / 64)
    assert r.cpu_busy_s == pytest.approx(T * 6e-3 * 36 / 64)   # all steps; the per-token metric: decode only
    assert r.decode_cpu_busy_s == pytest.approx(D * 6e-3 * 36 / 64)
    assert metric_row("t", "lru", "demand", 1, r)["cpu_ms_per_token"] == pytest.approx(6 * 36 / 64)
    assert r.decode_stall_s == pytest.approx(D * 4.375e-3)     # the GPU waits for the copy part


def test_calibrate_never_overwrites_a_profile(tmp_path):
    prof = tmp_path / "gpu.json"
    prof.write_text('{"keep": true}')
    r = run_cli("live", "--calibrate", "--out", prof)
    # refused for the existing file before anything is measured (also on a GPU machine)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "exists" in r.stderr
    assert prof.read_text() == '{"keep": true}'


def test_token_steps_make_every_token_a_decode_step():
    from tracekit import policies
    from tracekit.replay.cost import load_profile
    from tracekit.replay.engine import replay_one
    from tracekit.replay.plan import build_plan
    from tracekit.trace.synthetic import synthetic_trace

    tr = synthetic_trace(tokens=40, layers=2, experts=4, top_k=2, prefill=40, seed=3)   # all prefill
    assert tr.num_steps == 1 and (tr.phase == 0).all()
    tt = tr.with_token_steps()
    assert tt.num_steps == 40 and (tt.phase == 1).all()
    r = replay_one(policies.get("lru"), build_plan(tt), 2, load_profile("h100-pcie5"))
    assert r.decode_tokens == 40 and r.counters["decode_requests"] == r.counters["requests"] == 40 * 2 * 2


@pytest.mark.skipif(not (SHARED / "flame_moe_290m_prefill_4x512.parquet").exists(), reason="../shared/traces not present")
def test_a_trace_without_decode_steps_has_undefined_not_zero_decode_metrics(tmp_path):
    flame = SHARED / "flame_moe_290m_prefill_4x512.parquet"
    r = run_cli("replay", flame, "--policy", "lru,belady", "--capacity", "8", "--format", "json", "-j", "1",
                "--out", tmp_path / "flame.parquet")
    assert r.returncode == 0, r.stderr
    # the all-null decode columns keep their types: results files of any two runs share one schema
    r2 = run_cli("replay", "synthetic:tokens=50,layers=2", "-p", "lru,trajectory", "-c", "2", "--format", "csv",
                 "-j", "1", "--out", tmp_path / "syn.parquet")
    assert r2.returncode == 0, r2.stderr
    schema = pq.read_schema(tmp_path / "flame.parquet")
    assert schema.equals(pq.read_schema(tmp_path / "syn.parquet"))
    assert schema.field("decode_hit_rate").type == pa.float64() and schema.field("capacity").type == pa.int64()
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for x in r.stdout.splitlines()]
    assert len(rows) == 2 and all(x["decode_tokens"] == 0 and x["requests"] > 0 for x in rows)
    for x in rows:
        assert 0 < x["hit_rate"] < 1                          # prefill requests are still scored
        for key in ("decode_hit_rate", "transfers_per_token", "bytes_per_token", "sim_tokens_per_s",
                    "time_ms_per_token", "transfers_above_belady"):
            assert x[key] is None, key
    assert "no decode steps" in r.stderr and "--steps tokens" in r.stderr
    png = tmp_path / "c.png"
    r = run_cli("replay", flame, "-p", "lru", "-c", "8", "--plot", png, "-j", "1")    # table + plot: no crash
    assert r.returncode == 0 and "│ lru" in r.stdout and png.exists(), r.stderr
    r = run_cli("replay", flame, "-p", "trajectory", "-c", "8", "--plot", tmp_path / "na.png", "-j", "1")
    assert r.returncode == 0 and (tmp_path / "na.png").exists() and "Warning" not in r.stderr, r.stderr  # leaked
    r = run_cli("replay", flame, "-p", "lru", "-c", "8", "--steps", "tokens", "--format", "json", "-j", "1")
    row = json.loads(r.stdout)
    assert row["sim_tokens_per_s"] > 0 and "no decode steps" not in r.stderr
    # the long format records no expert size: the profile's Mixtral size is used, and said so
    assert row["expert_bytes"] == 352e6 and "records no expert size" in r.stderr and "--expert-mb" in r.stderr
    r = run_cli("replay", flame, "-p", "lru", "-c", "8", "--steps", "tokens", "--format", "json", "-j", "1",
                "--expert-mb", "2.5")
    small = json.loads(r.stdout)
    assert small["expert_bytes"] == 2.5e6 and "expert size" not in r.stderr
    assert small["bytes_per_token"] == pytest.approx(small["transfers_per_token"] * 2.5e6)
    assert small["sim_tokens_per_s"] > row["sim_tokens_per_s"]         # smaller copies, faster decode


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    # typer hands Ctrl-C back as a return code (130) in non-standalone mode; it used to end in exit 0
    from tracekit.cli.app import main
    from tracekit.replay import sweep

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["replay", "synthetic:tokens=20,layers=2", "--policy", "lru", "--capacity", "1"])
    assert exc.value.code == 130
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ["error: interrupted"]


def test_usage_errors_print_usage_not_a_traceback():
    # typer >= 0.20 raises its own vendored click's exceptions: these once ended in a Python traceback
    for args in [(), ("replay",), ("replay", "x.parquet", "--bogus"), ("replay", "x.parquet", "--cap", "abc"),
                 ("record", "--hidden")]:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.returncode)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert (len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0]) or \
            (not args and "Usage: " in r.stdout + r.stderr), (args, r.stderr)
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == run_cli("version").stdout.strip() != ""


def test_a_minimal_profile_file_loads_and_prices_copies(tmp_path):
    from tracekit.replay.cost import load_profile

    f = tmp_path / "my-gpu.json"
    f.write_text('{"h2d_GBps": 25, "copy_overhead_us": 0, "expert_MB": 100, "attn_ms": 0}')
    p = load_profile(str(f))
    assert p.name == "my-gpu" and p.ffn_ms == {"1": 0.14}          # the name is the file's, FFN the default
    assert p.copy_seconds() == pytest.approx(100e6 / 25e9)


def test_output_files_that_cannot_be_written_are_one_error_and_leave_nothing(tmp_path, monkeypatch):
    from tracekit import outfiles
    from tracekit.errors import UserError
    from tracekit.live.calibrate import write

    real = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outfiles.os, "replace", full_disk)
    out = tmp_path / "p.json"
    out.write_text("old")
    with pytest.raises(UserError, match="p.json: cannot write it .No space left on device"):
        write({"h2d_GBps": 1}, str(out))
    monkeypatch.setattr(outfiles.os, "replace", real)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_repeated_policies_and_capacities_give_one_row_each():
    from tracekit import policies

    assert policies.parse("lru, lru ,fifo") == ["lru", "fifo"]
    assert policies.parse("markov,all") == ["markov"] + [n for n in policies.names() if n != "markov"]
    r = run_cli("replay", "synthetic:tokens=50,layers=2", "-p", "lru,lru", "-c", "2,1,2", "--format", "json", "-j", "1")
    assert [(x["policy"], x["capacity"]) for x in json_rows(r.stdout)] == [("lru", 2), ("lru", 1)], r.stderr


def test_an_unusable_jit_folder_falls_back_to_a_temporary_one(tmp_path, monkeypatch, capsys):
    from tracekit.replay import jit

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TRACEKIT_JIT_DIR", str(tmp_path / "file" / "jit"))   # under a file: cannot exist
    jit.cache_dir.cache_clear()
    try:
        d = jit.cache_dir()                   # was a FileNotFoundError traceback from the replay workers
        assert d.is_dir() and os.access(d, os.W_OK) and not str(d).startswith(str(tmp_path))
        assert "compiled replay engines go to" in capsys.readouterr().err
    finally:
        jit.cache_dir.cache_clear()
