"""GPU checks for tracekit live (run on the GPU machine: pytest -m gpu)."""

import os

import pytest

pytestmark = pytest.mark.gpu

TRACES = os.environ.get("TRACEKIT_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces"))
DEC = os.path.join(TRACES, "mixtral8x7b_humaneval_2probs_decode.parquet")


@pytest.fixture(scope="module")
def torch():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return torch


def _cheap_cpu_profile(tmp_path, cpu_ms: float, act_us: float) -> str:
    """h100-pcie5 with a host CPU FFN of cpu_ms per expert-token and act_us per activation copy, written
    to a file: tiny experts copy in microseconds, so hybrid tests need a CPU that costs about as much."""
    import json

    prof = json.load(open(os.path.join(os.path.dirname(__file__), "..", "tracekit", "replay", "profiles",
                                       "h100-pcie5.json")))
    prof.update(name="cheap-cpu", cpu_ffn_ms={"1": cpu_ms}, act_copy_us=act_us)
    path = tmp_path / "cheap_cpu.json"
    path.write_text(json.dumps(prof))
    return str(path)


def test_chunked_ffn_equals_whole(torch):
    from tracekit.live.ffn import chunk_rows, ffn_rows

    H, F = 256, 1024
    w = (torch.randn(F, 3, H, device="cuda") * 0.05).to(torch.bfloat16)
    x = torch.randn(3, H, device="cuda").to(torch.bfloat16)
    whole = torch.zeros(3, H, device="cuda", dtype=torch.float32)
    ffn_rows(x.float(), w.float(), whole, 0, F)
    part = torch.zeros(3, H, device="cuda", dtype=torch.float32)
    for f0, f1 in chunk_rows(F, H, 0.3):
        ffn_rows(x.float(), w.float(), part, f0, f1)
    assert torch.allclose(whole, part, rtol=1e-4, atol=1e-4)
    ref = (torch.nn.functional.silu(x.float() @ w[:, 0].float().T) * (x.float() @ w[:, 1].float().T)) @ w[:, 2].float()
    assert torch.allclose(whole, ref, rtol=1e-3, atol=1e-3)


def test_pinned_store_registers_and_frees(torch):
    from tracekit.live.store import ExpertStore

    st = ExpertStore(1, 2, 1 << 20, pin=True)
    assert st.pinned and st.layers[0].is_pinned()
    st.free()
    assert not st.pinned and st.layers == []


@pytest.mark.skipif(not os.path.exists(DEC), reason="shared trace not found")
def test_live_counters_equal_replay_small_shapes(torch):
    from tracekit.live.executor import Shapes
    from tracekit.live.session import trace_sweep

    sh = Shapes(32, 8, 512, 1024, 128)
    rows = trace_sweep(DEC, ["lru", "markov"], [2], 2, (0.0, 4.0), 4, 12, "h100-pcie5", "cuda", shapes=sh,
                       log=lambda m: None)
    assert all(r["bookkeeping_equal"] for r in rows)
    assert all(r["live_tok_s"] > 0 and r["achieved_GBps"] > 1 for r in rows)


def test_model_driven_tiny_identical(torch):
    from tracekit.live.session import model_run

    for pol in ("lru", "markov"):
        r = model_run("tiny-mixtral", pol, 2, 2, 4.0, random_weights=True, max_tokens=12, device="cuda",
                      n_prompts=2, log=lambda m: None)
        assert r["identical"], r


def test_model_driven_hybrid_tiny_identical(torch, tmp_path):
    # model-driven --hybrid on the GPU: misses computed on the host CPU (tiny experts, so a profile where
    # the CPU is cheap) and copies both happen, and greedy tokens stay identical to the plain model
    from tracekit.live.session import model_run

    path = _cheap_cpu_profile(tmp_path, cpu_ms=0.002, act_us=0.5)
    for pol in ("lru", "markov"):
        r = model_run("tiny-mixtral", pol, 2, 2, 4.0, random_weights=True, max_tokens=12, device="cuda",
                      n_prompts=2, log=lambda m: None, hybrid=True, profile=path)
        c = r["counters"]
        assert r["identical"], r
        assert c["cpu_misses"] > 0 and c["demand_transfers"] > 0, c


def test_model_driven_hybrid_split_tiny(torch, tmp_path):
    # model-driven --hybrid --split on the GPU (bf16 tiny-mixtral): single misses are split between a
    # partial copy (2-D copy of down's columns) and the host; the counters equal a split replay
    from tracekit.live.session import model_run

    path = _cheap_cpu_profile(tmp_path, cpu_ms=0.004, act_us=0.5)
    r = model_run("tiny-mixtral", "lru", 2, 2, 4.0, random_weights=True, max_tokens=12, device="cuda",
                  n_prompts=2, log=lambda m: None, hybrid=True, profile=path, split=True)
    c = r["counters"]
    assert r["split"] and c["split_misses"] > 0 and c["demand_transfers"] > 0, c
    assert r["cpu_kernel"] == "fused"


def test_memcpy2d_copies_a_column_block(torch):
    # copier.memcpy2d_h2d: a [H, r] block of a pinned [H, F] matrix lands on the GPU exactly
    from tracekit.live.copier import memcpy2d_h2d

    H, F, r = 64, 96, 40
    src = torch.randn(H, F).to(torch.bfloat16).pin_memory()
    dst = torch.empty(H, r, device="cuda", dtype=torch.bfloat16)
    st = torch.cuda.Stream()
    memcpy2d_h2d(dst, src[:, :r], st)
    st.synchronize()
    assert torch.equal(dst.cpu(), src[:, :r])
    memcpy2d_h2d(dst, src[:, F - r:], st)
    st.synchronize()
    assert torch.equal(dst.cpu(), src[:, F - r:])


def test_cpu_worker_expert_equals_gpu_expert(torch):
    # the same expert (live layout, bf16) computed by the CPU worker on pinned host memory and by the
    # GPU path: equal within bf16 tolerance; the result comes back through the worker's D2H/H2D path
    from tracekit.live.cpu_worker import CpuWorker
    from tracekit.live.executor import Shapes
    from tracekit.live.ffn import ffn_rows

    sh = Shapes(1, 2, 512, 1024, 128)
    w = (torch.randn(sh.F, 3, sh.H) * 0.05).to(torch.bfloat16).pin_memory()
    xd = torch.randn(4, sh.H, device="cuda").to(torch.bfloat16)
    yd = torch.zeros(4, sh.H, device="cuda", dtype=torch.bfloat16)
    ffn_rows(xd, w.cuda(), yd, 0, sh.F)
    wk = CpuWorker(sh, 8, "cuda", threads=2)
    try:
        ev = torch.cuda.Event()
        ev.record()
        xh, evx = wk.send_hidden(xd, 4, 0, ev)
        job = wk.submit(evx, xh, w, 0, 0, 0)
        out = torch.zeros_like(yd)
        wk.collect(job, 0, 0, 4, out)
        torch.cuda.synchronize()
    finally:
        wk.close()
    scale = yd.float().abs().max()
    assert torch.allclose(out.float(), yd.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.skipif(not os.path.exists(DEC), reason="shared trace not found")
def test_live_hybrid_split_counters_equal_replay(torch, tmp_path):
    # trace-driven --hybrid --split on the GPU (small shapes, chunked and whole copies; a profile whose CPU
    # FFN costs about a copy of these 3 MB experts, so that splitting pays): counters equal replay's and
    # some misses are split
    from tracekit.live.executor import Shapes
    from tracekit.live.session import trace_sweep

    path = _cheap_cpu_profile(tmp_path, cpu_ms=0.05, act_us=5.0)
    sh = Shapes(32, 8, 512, 1024, 128)
    rows = trace_sweep(DEC, ["lru"], [2], 2, (0.0, 4.0), 4, 12, path, "cuda", shapes=sh,
                       log=lambda m: None, hybrids=("split",), cpu_threads=2)
    assert all(r["bookkeeping_equal"] and r["split"] for r in rows)
    assert all(r["counters"]["split_misses"] > 0 and r["live_tok_s"] > 0 for r in rows)
    assert all(r["cpu_result_wait"] == "stream" for r in rows)     # the GIL-free ring worker ran


@pytest.mark.parametrize("worker", ["thread", "ring"])
def test_split_layer_output_equals_copied_expert_gpu(torch, worker):
    # one layer, one miss: copied whole, computed on the host, and split at several points, through the
    # executor's layer code with real streams and events: outputs agree within bf16 tolerance (with the
    # thread worker the host waits for CPU results; with the ring worker the compute stream does)
    import numpy as np

    from tracekit.live.copier import Copier
    from tracekit.live.cpu_worker import CpuWorker
    from tracekit.live.executor import Shapes, TraceExecutor
    from tracekit.live.ring_worker import RingWorker
    from tracekit.live.store import ExpertStore
    from tracekit.replay.controller import CPU, MISS, SPLIT

    sh = Shapes(2, 4, 256, 1024, 64)
    store = ExpertStore(2, 4, sh.numel, pin=True, seed=3)
    g = torch.Generator().manual_seed(1)
    store.layers[1][2].copy_((torch.randn(sh.numel, generator=g) * 0.05).to(torch.bfloat16))
    ex = TraceExecutor(sh, 2, "cuda", store, chunk_mb=0.5, timing=False, max_tokens=4)
    ex.worker = CpuWorker(sh, 4, "cuda", threads=2) if worker == "thread" else RingWorker(sh, 4, store, "cuda", 2)
    assert ex.worker.gpu_wait == ("host" if worker == "thread" else "stream")
    try:
        xs = ex.x[:2]
        outs = {}
        for name, row in (("copy", [MISS, 1, 2, 1, 0]), ("cpu", [CPU, 1, 2, -1, 0]),
                          ("split1", [SPLIT, 1, 2, 1, 0]), ("split37", [SPLIT, 1, 2, 37, 0])):
            cp = Copier("cuda", 2, 3, len(ex.rows), False)
            moved, y = ex._layer(cp, [row], 1, 0, xs, np.array([2]), None)
            torch.cuda.synchronize()
            outs[name] = y.float().cpu()
        ref = outs["copy"]
        tol = 3e-2 * ref.abs().max()
        for name in ("cpu", "split1", "split37"):
            assert torch.allclose(outs[name], ref, atol=tol), name
    finally:
        ex.close()
        store.free()


def test_stream_and_host_flags(torch):
    # a stream waits for a flag the host sets (work behind the wait does not run before), and a stream
    # writes a flag once its earlier work is done
    import time

    from tracekit.live.stream_wait import StreamFlags

    sf = StreamFlags.open(4)
    assert sf is not None
    s = torch.cuda.Stream()
    src = torch.ones(1 << 20, device="cuda")
    dst = torch.zeros(1 << 20, device="cuda")
    sf.wait(s, 2, 5)
    with torch.cuda.stream(s):
        dst.copy_(src)
        done = torch.cuda.Event()
        done.record(s)
    sf.write(s, 3, 7)
    sf.set(2, 4)                                   # below the value waited for
    time.sleep(0.2)
    assert not done.query() and int(sf.np[3]) == 0
    sf.set(2, 5)
    t0 = time.perf_counter()
    while int(sf.np[3]) != 7:                      # the host sees the stream's write
        assert time.perf_counter() - t0 < 10
    assert done.query()                            # written after the copy
    torch.cuda.synchronize()
    assert dst.sum().item() == 1 << 20
