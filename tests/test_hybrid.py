"""Hybrid miss handling in live, without a GPU: live's CPU-vs-copy choices equal replay's (same
serve_hybrid, same profile, the cost-model clock kept in lockstep), the CPU worker computes the expert
the GPU path computes (bf16 tolerance), and the CLI options behave."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tracekit import policies as P
from tracekit.errors import UserError
from tracekit.live.cpu_worker import default_threads
from tracekit.live.executor import Shapes, TraceExecutor, make_context
from tracekit.live.ffn import ffn_rows
from tracekit.live.host_ffn import FUSED_MAX_TOKENS, HostFFN
from tracekit.live.store import ExpertStore
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan
from tracekit.trace import read_trace

sys.path.insert(0, str(Path(__file__).parent))
from test_live_cpu import MIX, synthetic  # noqa: E402

PROFILE = load_profile("h100-pcie5")        # has cpu_ffn_ms (6.6 ms per token)


def _replay(spec, plan, C, tr, prof, cap=2, expert_bytes=None, split=False):
    ctx = make_context(plan, C, tr)
    r = replay_one(spec, plan, C, prof, cap=cap, depth=ctx.depth, router=ctx.router, hidden_kind=ctx.hidden_kind,
                   params=ctx.params, hybrid=True, expert_bytes=expert_bytes, split=split)
    return r.counters, ctx


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("policy", ["lru", "belady", "markov", "lfu"])
@pytest.mark.parametrize("C", [2, 4])
def test_dry_hybrid_bookkeeping_equals_replay_shared_traces(policy, C, split):
    for path in MIX:
        if not os.path.exists(path):
            pytest.skip("shared traces not found")
        tr = read_trace(path)
        plan = build_plan(tr)
        spec = P.get(policy)
        sh = Shapes(tr.num_layers, tr.num_experts, 4096, 14336, 1024)      # Mixtral expert bytes
        want, ctx = _replay(spec, plan, C, tr, PROFILE, expert_bytes=sh.expert_bytes, split=split)
        res = TraceExecutor(sh, C, dry=True).run(spec, plan, C, 2, ctx, hybrid=PROFILE, split=split)
        got = res.counters
        assert got == want, (path, policy, C)
        assert got["cpu_misses"] > 0 and got["transfers"] > 0
        assert got["hits"] + got["demand_transfers"] + got["cpu_misses"] + got["split_misses"] == got["requests"]
        plain = TraceExecutor(sh, C, dry=True).run(spec, plan, C, 2, ctx).counters
        assert plain["cpu_misses"] == 0 and plain["split_misses"] == 0
        assert got["transfers"] < plain["transfers"]       # CPU misses are not copied or cached
        if split:
            # split misses copy part of an expert: bytes lie strictly between whole transfers and them + 1
            assert got["split_misses"] > 0
            assert 0 < got["split_units"] < got["split_misses"] * 64
            assert res.bytes_total == (got["transfers"] + got["split_units"] / 64) * sh.expert_bytes
        else:
            assert got["split_misses"] == 0


def test_split_only_for_a_layers_single_miss():
    # --split: a SPLIT action only where the layer's requests found exactly one expert missing; replay's
    # actions, read back through the controller the live executor drives
    from tracekit.replay import controller as ctlmod
    from tracekit.replay.jit import engine_module

    tr = synthetic()
    plan = build_plan(tr)
    spec = P.get("lru")
    prof = dataclasses.replace(PROFILE, cpu_ffn_ms={"1": 0.006, "64": 0.012}, act_copy_us=0.5)
    sh = Shapes(4, 8, 16, 64, 8)
    ctl = ctlmod.new_controller(plan.L, plan.E, 2, 2)
    from tracekit.live.cpu_worker import HybridClock

    clock = HybridClock(spec, plan, 2, prof, sh.expert_bytes, ctl, split=True)
    st = spec.make_state(make_context(plan, 2, tr))
    act = ctlmod.action_rows(clock.ctl)
    after = engine_module(spec).after
    kinds = []
    for s in range(plan.num_steps):
        t0, t1 = plan.tok_ptr[s], plan.tok_ptr[s + 1]
        for l in range(plan.L):
            pos = s * plan.L + l
            a, b = plan.req_ptr[pos], plan.req_ptr[pos + 1]
            resident = clock.ctl[0][l].copy()
            n = clock.serve(st, pos, l, plan.req_e[a:b], a, plan.req_next[a:b], plan.decode[s] == 1, act,
                            plan.req_ntok[a:b], t1 - t0)
            missing = sum(resident[e] == 0 for e in plan.req_e[a:b])
            rows = act[:n].tolist()
            for r in rows:
                kinds.append(r[0])
                if r[0] == ctlmod.SPLIT:
                    assert missing == 1 and 0 < r[3] < ctlmod.SPLIT_GRID
                    assert clock.ctl[0][l, r[2]] == 0            # not cached
            after(clock.ctl, st, pos, l, plan.tok_ex, plan.hid, t0, t1, l, plan.decode[s] == 1, False, act)
    assert ctlmod.SPLIT in kinds and ctlmod.MISS in kinds


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "markov"])
def test_cpu_executor_hybrid_full_path_equals_replay(policy):
    # real tensors on a CPU "device" and a real worker thread; a profile whose CPU FFN costs about a copy,
    # so that both paths are taken
    tr = synthetic()
    plan = build_plan(tr)
    sh = Shapes(4, 8, 16, 24, 8)
    prof = dataclasses.replace(PROFILE, cpu_ffn_ms={"1": 0.006, "64": 0.012}, act_copy_us=0.5)
    spec = P.get(policy)
    for C, cap in ((2, 2), (3, 1)):
        want, ctx = _replay(spec, plan, C, tr, prof, cap, expert_bytes=sh.expert_bytes)
        assert want["cpu_misses"] > 0 and want["demand_transfers"] > 0
        store = ExpertStore(4, 8, sh.numel, pin=False)
        ex = TraceExecutor(sh, C, "cpu", store, rows=[(0, 8), (8, 16), (16, 24)], timing=False, max_tokens=16,
                           cpu_threads=1)
        try:
            res = ex.run(spec, plan, C, cap, ctx, hybrid=prof)
            assert res.counters == want
            assert res.bytes_total == want["transfers"] * sh.expert_bytes
            assert res.cpu_jobs == want["decode_cpu_misses"]
            assert ex.worker.jobs and all(j.seconds > 0 for j in ex.worker.jobs)
        finally:
            ex.close()
            store.free()


@pytest.mark.parametrize("worker", ["thread", "ring"])
def test_cpu_executor_split_full_path_equals_replay(worker):
    # --split on a CPU "device" with a real worker (the thread worker, or the GIL-free ring worker of
    # tracekit/live/ring_worker.py): counters equal replay's, split misses happen, and the
    # bytes copied are whole experts plus exactly the split rows (F = 64: a grid unit is one row)
    tr = synthetic()
    plan = build_plan(tr)
    sh = Shapes(4, 8, 16, 64, 8)
    prof = dataclasses.replace(PROFILE, cpu_ffn_ms={"1": 0.006, "64": 0.012}, act_copy_us=0.5)
    spec = P.get("lru")
    want, ctx = _replay(spec, plan, 2, tr, prof, 2, expert_bytes=sh.expert_bytes, split=True)
    assert want["split_misses"] > 0
    store = ExpertStore(4, 8, sh.numel, pin=False)
    ex = TraceExecutor(sh, 2, "cpu", store, rows=[(0, 24), (24, 48), (48, 64)], timing=False, max_tokens=16,
                       cpu_threads=1)
    if worker == "ring":
        from tracekit.live.ring_worker import RingWorker

        ex.worker = RingWorker(sh, 16, store, "cpu", 1)
    try:
        res = ex.run(spec, plan, 2, 2, ctx, hybrid=prof, split=True)
        assert res.counters == want
        assert res.bytes_total == (want["transfers"] + want["split_units"] / 64) * sh.expert_bytes
        assert res.cpu_jobs == want["decode_cpu_misses"] + want["decode_split_misses"]
        assert res.cpu_busy_s > 0 and want["cpu_misses"] > 0
        if worker == "ring":
            assert ex.worker.ctl[1] == ex.worker.ctl[0] > 0          # every queued job was done
            t = ex.worker._t
            ex.run(spec, plan, 2, 2, ctx)                            # a transfer-only run stops the worker
            assert ex.worker is None and not t.is_alive()
    finally:
        ex.close()
        store.free()


@pytest.mark.parametrize("k", [1, 21, 40, 63])
def test_split_layer_output_equals_copied_expert(k):
    # one layer with one miss, run three ways through the executor's layer code: copied whole (MISS),
    # computed on the host (CPU), and split at k/64 (SPLIT: rows on both sides of a chunk boundary):
    # the layer outputs agree within bf16 tolerance, and the split copies exactly its leading rows
    torch = pytest.importorskip("torch")
    from tracekit.live.copier import Copier
    from tracekit.live.cpu_worker import CpuWorker
    from tracekit.replay.controller import CPU, MISS, SPLIT

    sh = Shapes(2, 4, 32, 128, 8)
    store = ExpertStore(2, 4, sh.numel, pin=False, seed=3)
    g = torch.Generator().manual_seed(1)
    for e in range(4):            # distinct experts
        store.layers[1][e].copy_((torch.randn(sh.numel, generator=g) * 0.1).to(torch.bfloat16))
    ex = TraceExecutor(sh, 2, "cpu", store, rows=[(0, 48), (48, 96), (96, 128)], timing=False, max_tokens=4)
    ex.worker = CpuWorker(sh, 4, "cpu", threads=1)
    try:
        xs = ex.x[:2]
        ntoks = np.array([2])
        outs = {}
        for name, row in (("copy", [MISS, 1, 2, 1, 0]), ("cpu", [CPU, 1, 2, -1, 0]), ("split", [SPLIT, 1, 2, k, 0])):
            cp = Copier("cpu", 2, 3, 3, False)
            moved, y = ex._layer(cp, [row], 1, 0, xs, ntoks, None)
            outs[name] = (moved, y.float())
        assert outs["copy"][0] == sh.expert_bytes and outs["cpu"][0] == 0
        assert outs["split"][0] == k * 2 * 3 * sh.H * 2                    # rows [0, 2k) of F = 128
        assert torch.equal(ex.stage[: 2 * k], store.layers[1][2].view(128, 3, 32)[: 2 * k])
        ref = outs["copy"][1]
        tol = 3e-2 * ref.abs().max()
        assert torch.allclose(outs["split"][1], ref, atol=tol) and torch.allclose(outs["cpu"][1], ref, atol=tol)
        assert not torch.allclose(ex.nonexp(1, xs)[0].float(), ref, atol=tol)   # the expert's part is not negligible
    finally:
        ex.close()
        store.free()


def _eager_expert(x, gate_up, down):
    # transformers' eager Mixtral expert: gate_up_proj [2F, H], down_proj [H, F]
    import torch

    g, u = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down)


@pytest.mark.parametrize("kernel,n", [("fused", 1), ("fused", FUSED_MAX_TOKENS), ("fused", FUSED_MAX_TOKENS + 1), ("torch", 3)])
def test_cpu_expert_equals_gpu_path_bf16(kernel, n):
    # The CPU worker's expert (host, bf16, live layout; the fused numba kernel up to FUSED_MAX_TOKENS
    # tokens, torch's matmuls above, or torch's always) against the GPU path's math (ffn_rows, float32
    # reference) and against transformers' eager expert on the same weights: equal within bf16 tolerance.
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    H, F = 64, 160
    w = (torch.randn(F, 3, H, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(n, H, generator=g).to(torch.bfloat16)
    out = torch.full((n, H), float("nan"), dtype=torch.bfloat16)
    HostFFN(H, 2, kernel)(x, w, out)
    ref = torch.zeros(n, H)
    ffn_rows(x.float(), w.float(), ref, 0, F)
    gpu_path = torch.zeros(n, H, dtype=torch.bfloat16)
    ffn_rows(x, w, gpu_path, 0, F)                  # the executor's GPU FFN, in bf16
    eager = _eager_expert(x.float(), torch.cat([w[:, 0], w[:, 1]]).float(), w[:, 2].t().float())
    scale = ref.abs().max()
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2 * scale)
    assert torch.allclose(out.float(), gpu_path.float(), rtol=2e-2, atol=2e-2 * scale)
    assert torch.allclose(eager, ref, rtol=1e-4, atol=1e-4 * scale)


def test_fused_kernel_rounds_as_torch_bf16():
    # the fused kernel's bf16 handling (bits -> float32, float32 -> nearest even bf16) equals torch's
    torch = pytest.importorskip("torch")
    from numba import njit

    from tracekit.live.host_ffn import _bf16_bits, _bits_to_f32

    @njit
    def rt(a, bits, back):
        for i in range(a.shape[0]):
            bits[i] = _bf16_bits(a[i])
            back[i] = _bits_to_f32(bits[i])

    a = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 37.0
    a[:4] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -0.0, 0.0])    # ties to even, zeros
    bits = np.empty(a.numel(), np.uint16)
    back = np.empty(a.numel(), np.float32)
    rt(a.numpy(), bits, back)
    expect = a.to(torch.bfloat16)
    assert np.array_equal(bits, expect.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(back, expect.float().numpy())


def test_host_ffn_rejects_unknown_kernel():
    with pytest.raises(UserError, match="CPU kernel"):
        HostFFN(64, 1, "blas")
    from tracekit.live.cpu_worker import CpuWorker

    with pytest.raises(UserError, match="CPU kernel"):       # raised by the worker's constructor
        CpuWorker(Shapes(1, 2, 64, 160, 16), 4, "cpu", threads=1, kernel="blas")


def test_worker_threads_default():
    assert default_threads() >= 1


def test_hybrid_needs_cpu_table(tmp_path):
    prof = dataclasses.replace(PROFILE, cpu_ffn_ms={})
    tr = synthetic()
    plan = build_plan(tr)
    with pytest.raises(UserError, match="cpu_ffn_ms"):
        TraceExecutor(Shapes(4, 8, 16, 24, 8), 2, dry=True).run(P.get("lru"), plan, 2, 2, hybrid=prof)


def _cli(args, capsys):
    from tracekit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


def test_cli_dry_run_hybrid_json(capsys):
    if not os.path.exists(MIX[0]):
        pytest.skip("shared traces not found")
    from tracekit.cli.app import main

    main(["live", "--policy", "lru", "--trace", MIX[0], "--capacity", "2", "--dry-run", "--format", "json",
          "--max-tokens", "20", "--hybrid", "--profile", "h100-pcie5"])
    rows = json.loads(capsys.readouterr().out)
    r = rows[0]
    assert r["bookkeeping_equal"] is True and r["hybrid"] is True
    assert r["cpu_misses"] > 0 and 0 < r["cpu_share"] < 1
    assert np.isfinite(r["pred_tok_s"])


def test_cli_dry_run_split_json(capsys):
    if not os.path.exists(MIX[0]):
        pytest.skip("shared traces not found")
    from tracekit.cli.app import main

    main(["live", "--policy", "lru", "--trace", MIX[0], "--capacity", "2", "--dry-run", "--format", "json",
          "--max-tokens", "20", "--hybrid", "--split", "--profile", "h100-pcie5"])
    r = json.loads(capsys.readouterr().out)[0]
    assert r["bookkeeping_equal"] is True and r["hybrid"] is True and r["split"] is True
    assert 0 < r["split_share"] < 1 and r["counters"]["split_units"] > 0


@pytest.mark.parametrize("args,msg", [
    (["replay", "t.parquet", "--split"], "--hybrid"),
    (["live", "--trace", "t.parquet", "--split"], "--hybrid"),
    (["live", "--model", "tiny-mixtral", "--split", "--device", "cpu"], "--hybrid"),
])
def test_cli_split_needs_hybrid(args, msg, capsys):
    code, cap = _cli(args, capsys)
    assert code != 0 and msg in cap.err and len(cap.err.strip().splitlines()) == 1


def test_cli_hybrid_model_split_runs(capsys):
    # model-driven --hybrid --split runs and reports its split share (h100-pcie5: tiny experts are copied)
    from tracekit.cli.app import main

    main(["live", "--model", "tiny-mixtral", "--hybrid", "--split", "--device", "cpu", "--max-tokens", "4",
          "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    assert r["identical"] is True and r["split"] is True and r["split_share"] == 0.0


def test_cli_hybrid_model_cpu_options(capsys):
    # model-driven --hybrid takes --cpu-threads and --cpu-kernel and reports the kernel that ran (fp32 on a
    # CPU device: torch's, the fused kernel is bf16 only); a bad kernel name is one clear line
    from tracekit.cli.app import main

    main(["live", "--model", "tiny-mixtral", "--hybrid", "--cpu-threads", "2", "--device", "cpu",
          "--max-tokens", "4", "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    assert r["cpu_kernel"] == "torch" and r["cpu_threads"] is None and "cpu_ms_per_job" in r
    code, cap = _cli(["live", "--model", "tiny-mixtral", "--hybrid", "--cpu-kernel", "blas", "--device", "cpu"],
                     capsys)
    assert code != 0 and "--cpu-kernel" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_cli_hybrid_model_runs(capsys):
    from tracekit.cli.app import main

    main(["live", "--model", "tiny-mixtral", "--hybrid", "--device", "cpu", "--max-tokens", "4",
          "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    assert r["identical"] is True and r["hybrid"] is True
    assert r["counters"]["cpu_misses"] == 0          # h100-pcie5: a tiny expert copies faster than the CPU computes


def test_cli_unknown_cpu_kernel_refused(capsys):
    code, cap = _cli(["live", "--policy", "lru", "--trace", "x.parquet", "--hybrid", "--cpu-kernel", "blas"], capsys)
    assert code != 0 and "--cpu-kernel" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_host_ffn_import_sets_passive_omp_before_torch():
    # libgomp reads OMP_WAIT_POLICY when torch loads it: importing host_ffn (as the live CLI does first)
    # must set it without importing torch; a value the user set is kept
    import subprocess

    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "import tracekit.live.host_ffn\n"
            "assert 'torch' not in sys.modules, 'host_ffn imported torch'\n"
            "print(os.environ['OMP_WAIT_POLICY'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", "import os, tracekit.live.host_ffn; print(os.environ['OMP_WAIT_POLICY'])"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="ACTIVE"))
    assert r.stdout.strip() == "ACTIVE", r.stderr
