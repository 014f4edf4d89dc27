"""tracekit live without a GPU: the executor's bookkeeping equals replay's, the model-driven backend is
token-identical on CPU, and the error paths give one clear line."""

import os

import numpy as np
import pytest

from tracekit import policies as P
from tracekit.errors import UserError
from tracekit.live.executor import Shapes, TraceExecutor, make_context
from tracekit.live.store import ExpertStore, check_fits
from tracekit.live.tracecut import check_shape, cut
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan
from tracekit.trace import read_trace
from tracekit.trace.core import Trace

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces")
MIX = [os.path.join(SHARED, f) for f in ("mixtral8x7b_humaneval_2probs_decode.parquet",
                                         "mixtral8x7b_humaneval0_prefill_decode.parquet")]
PROFILE = load_profile("h100-pcie5")


def synthetic(L=4, E=8, K=2, prefill=9, decode=30, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    T = prefill + decode
    ex = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    step = np.concatenate([np.zeros(prefill), np.arange(1, decode + 1)]).astype(np.int32)
    phase = np.concatenate([np.zeros(prefill), np.ones(decode)]).astype(np.int8)
    return Trace("synthetic", "tracekit", True, L, E, K, np.zeros(T, np.int32), step, phase,
                 np.arange(T, dtype=np.int32), np.full(T, -1, np.int32), ex, np.full((T, L, K), 0.5, np.float32))


def _replay(spec, plan, C, tr, cap=2):
    ctx = make_context(plan, C, tr)
    return replay_one(spec, plan, C, PROFILE, cap=cap, depth=ctx.depth, router=ctx.router,
                      hidden_kind=ctx.hidden_kind, params=ctx.params).counters, ctx


@pytest.mark.parametrize("policy", ["lru", "belady", "markov"])
@pytest.mark.parametrize("C", [2, 4])
def test_dry_bookkeeping_equals_replay_shared_traces(policy, C):
    for path in MIX:
        if not os.path.exists(path):
            pytest.skip("shared traces not found")
        tr = read_trace(path)
        plan = build_plan(tr)
        spec = P.get(policy)
        want, ctx = _replay(spec, plan, C, tr)
        sh = Shapes(tr.num_layers, tr.num_experts, 8, 8, 8)
        ex = TraceExecutor(sh, C, dry=True)
        loops = []
        real_loop = ex._loop
        ex._loop = lambda *a, **k: loops.append(a[5]) or real_loop(*a, **k)     # a[5]: steps run
        got = ex.run(spec, plan, C, 2, ctx, warmup_steps=2).counters
        assert got == want, (path, policy, C)                  # a warm-up run leaves no trace in them
        assert got["transfers"] > 0
        assert loops == [2, plan.num_steps]   # dry runs warm up too: policy time once included the JIT compile


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "markov"])
def test_cpu_executor_full_path_equals_replay(policy):
    # real tensors on a CPU "device", tiny shapes, chunked FFN and copies, prefill with slot conflicts
    tr = synthetic()
    plan = build_plan(tr)
    sh = Shapes(4, 8, 16, 24, 8)
    spec = P.get(policy)
    for C, cap in ((2, 2), (3, 1)):
        want, ctx = _replay(spec, plan, C, tr, cap)
        store = ExpertStore(4, 8, sh.numel, pin=False)
        ex = TraceExecutor(sh, C, "cpu", store, rows=[(0, 8), (8, 16), (16, 24)], timing=False, max_tokens=16)
        res = ex.run(spec, plan, C, cap, ctx)
        assert res.counters == want
        assert res.bytes_total == want["transfers"] * sh.expert_bytes
        store.free()


def test_cpu_executor_on_cut_shared_trace():
    if not os.path.exists(MIX[1]):
        pytest.skip("shared traces not found")
    tr = cut(read_trace(MIX[1]), layers=3, max_decode_tokens=5)
    assert tr.num_layers == 3 and (tr.phase == 1).sum() == 5
    plan = build_plan(tr)
    sh = Shapes(3, 8, 16, 16, 8)
    spec = P.get("lru")
    want, ctx = _replay(spec, plan, 2, tr)
    store = ExpertStore(3, 8, sh.numel, pin=False)
    res = TraceExecutor(sh, 2, "cpu", store, timing=False, max_tokens=256).run(spec, plan, 2, 2, ctx)
    assert res.counters == want and res.decode_tokens == 5


def test_backend_cpu_identical_and_bookkeeping():
    torch = pytest.importorskip("torch")
    from tracekit.live.backend import OffloadRunner, set_impl
    from tracekit.record.models import load_model

    ids = None
    ref = None
    for policy in ("lru", "markov"):
        ld = load_model("tiny-mixtral", device="cpu")
        if ref is None:
            ids = torch.tensor([ld.tokenizer.encode("def add(a, b):")])
            set_impl(ld.model, "eager")
            with torch.no_grad():
                ref = ld.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                        min_new_tokens=10, do_sample=False)
            ld = load_model("tiny-mixtral", device="cpu")
        runner = OffloadRunner(ld.model, P.get(policy), 2, 2, chunk_mb=0.01)
        with torch.no_grad():
            out = ld.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                    min_new_tokens=10, do_sample=False)
        assert torch.equal(out, ref), policy
        runner.close()                      # finish(): in-flight prefetches count as wasted, as in replay
        counters = runner.counters()
        plan = runner.as_plan()
        want = replay_one(P.get(policy), plan, 2, PROFILE, cap=2).counters
        assert counters == want
        assert counters["requests"] == plan.req_e.shape[0] > 0


def test_backend_refuses_oracle():
    from tracekit.live.backend import OffloadRunner
    from tracekit.record.models import load_model

    ld = load_model("tiny-mixtral", device="cpu")
    with pytest.raises(UserError, match="oracle"):
        OffloadRunner(ld.model, P.get("belady"), 2)


def test_store_refused_before_allocating():
    with pytest.raises(UserError, match=r"needs 90\.2 GB .* only 64\.0 GB"):
        check_fits(int(90.2e9), "the expert store", avail=int(64e9))


def test_trace_shape_mismatch_refused():
    tr = synthetic(L=4, E=8)
    with pytest.raises(UserError, match="8 experts per layer but the model") as ei:
        check_shape(tr, 4, 16, "the model")
    assert "--model" not in str(ei.value)           # this trace names no model to pass
    tr.meta = {**tr.meta, "model": "tiny-mixtral"}   # as recorded with --model tiny-mixtral
    with pytest.raises(UserError, match="4 layers but the model .* has 32; pass --model tiny-mixtral"):
        check_shape(tr, 32, 8, "the model (32 layers x 8 experts)")
    with pytest.raises(UserError, match="4 layers"):
        check_shape(tr, 32, 8, "the model")


def _cli(args, capsys):
    from tracekit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


def test_cli_no_cuda_one_line(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tr = os.path.abspath(MIX[0])
    code, cap = _cli(["live", "--policy", "lru", "--trace", tr, "--capacity", "2"], capsys)
    assert code != 0
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    code, cap = _cli(["live", "--calibrate", "--out", "/tmp/p.json"], capsys)
    assert code != 0 and "needs a CUDA GPU" in cap.err


def test_cli_refusals(capsys, tmp_path):
    code, cap = _cli(["live", "--trace", "x.parquet", "--chunk-mb", "1"], capsys)
    assert code == 2 and "4 MB" in cap.err
    flame = os.path.join(SHARED, "flame_moe_290m_prefill_4x512.parquet")
    if os.path.exists(flame):
        code, cap = _cli(["live", "--trace", flame, "--dry-run"], capsys)
        assert code == 2 and "64 experts per layer" in cap.err
    # bad numbers: one line each (--capacity 0 once ended in a ValueError traceback, and 0 caps, tokens,
    # layers or threads, or more slots than experts, ran)
    bad = [(["--capacity", "9"], "9 > 8 experts"), (["--layers", "40"], "40 > the trace's 32 layers")] \
        if os.path.exists(MIX[0]) else []
    for args, needle in bad + [(["--capacity", "0"], "--capacity must be >= 1"), (["--cap", "0"], "--cap must be >= 1"),
                         (["--max-tokens", "0"], "--max-tokens must be >= 1"), (["--layers", "0"], "--layers must"),
                         (["--cpu-threads", "0"], "--cpu-threads must"),
                         (["--device", "bogus"], "expected cpu or cuda")]:       # was a torch RuntimeError
        code, cap = _cli(["live", "--trace", MIX[0], "--dry-run", *args], capsys)
        assert code == 2 and needle in cap.err and cap.err.strip().count("\n") == 0, (args, cap.err)
    code, cap = _cli(["live", "--model", "tiny-mixtral", "--device", "cpu", "--capacity", "9"], capsys)
    assert code == 2 and "9 > 8 experts" in cap.err
    code, cap = _cli(["live", "--model", "tiny-mixtral", "--device", "cpu", "--dry-run"], capsys)  # ran the model
    assert code == 2 and "needs --trace" in cap.err and cap.err.strip().count("\n") == 0
    for args, needle in [(["--out", "p.json"], "only with --calibrate"), (["--prompts", "p.txt"], "model-driven")]:
        code, cap = _cli(["live", "--trace", "x.parquet", "--dry-run", *args], capsys)   # were ignored
        assert code == 2 and needle in cap.err and cap.err.strip().count("\n") == 0
    code, cap = _cli(["live", "--trace", "x.parquet", "--device", "cpu"], capsys)     # a torch RuntimeError
    assert code == 2 and "needs --dry-run" in cap.err and cap.err.strip().count("\n") == 0
    from tracekit.trace.native import TraceWriter

    empty = TraceWriter(tmp_path / "empty.parquet", num_layers=32, num_experts=8, top_k=2, meta={}).close()
    code, cap = _cli(["live", "--trace", str(empty), "--dry-run"], capsys)
    assert code == 2 and "holds no tokens" in cap.err and cap.err.strip().count("\n") == 0


def test_cli_dry_run_json(capsys):
    import json

    if not os.path.exists(MIX[0]):
        pytest.skip("shared traces not found")
    from tracekit.cli.app import main

    main(["live", "--policy", "lru", "--trace", MIX[0], "--capacity", "2", "--dry-run", "--format", "json",
          "--max-tokens", "20"])
    out = capsys.readouterr().out
    rows = json.loads(out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert rows[0]["bookkeeping_equal"] is True and rows[0]["decode_tokens"] == 20
    assert rows[0]["live_tok_s"] is None and rows[0]["pred_tok_s"] > 0      # nothing timed in a dry run
    assert rows[0]["stall_ms_per_token"] is None and rows[0]["compute_ms_per_token"] is None   # not 0
    assert rows[0]["policy_ms_per_token"] > 0 and rows[0]["bytes_per_token_MB"] > 0           # these are counted
    main(["live", "--policy", "lru", "--trace", MIX[0], "--capacity", "2", "--dry-run", "--max-tokens", "20"])
    cap = capsys.readouterr()
    assert "nan" not in cap.out.lower() and "│ lru" in cap.out and "- (dry run)" in cap.err


def test_live_table_cells():
    from tracekit.cli.live import _mb
    from tracekit.live.compare import cell as _cell

    assert [_cell(v, _mb) for v in (27523.4, 150.0, 0.03125, 0.0, float("nan"))] == ["27523", "150", "0.0312", "0",
                                                                                       "-"]
    assert _cell(0.27891, "{:.3f}") == "0.279"


def test_cli_ctrl_c_in_live_exits_130_with_one_line(capsys, monkeypatch):
    from tracekit.live import session

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "trace_sweep", interrupted)
    code, cap = _cli(["live", "--trace", "x.parquet", "--dry-run"], capsys)
    assert code == 130
    assert [x for x in cap.err.splitlines() if x.strip()] == ["error: interrupted; pinned memory freed"]
