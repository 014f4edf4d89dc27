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


def _replay(spec, plan, C, tr, prof, cap=2, expert_bytes=None):
    ctx = make_context(plan, C, tr)
    r = replay_one(spec, plan, C, prof, cap=cap, depth=ctx.depth, router=ctx.router, hidden_kind=ctx.hidden_kind,
                   params=ctx.params, hybrid=True, expert_bytes=expert_bytes)
    return r.counters, ctx


@pytest.mark.parametrize("policy", ["lru", "belady", "markov", "lfu"])
@pytest.mark.parametrize("C", [2, 4])
def test_dry_hybrid_bookkeeping_equals_replay_shared_traces(policy, C):
    for path in MIX:
        if not os.path.exists(path):
            pytest.skip("shared traces not found")
        tr = read_trace(path)
        plan = build_plan(tr)
        spec = P.get(policy)
        sh = Shapes(tr.num_layers, tr.num_experts, 4096, 14336, 1024)      # Mixtral expert bytes
        want, ctx = _replay(spec, plan, C, tr, PROFILE, expert_bytes=sh.expert_bytes)
        got = TraceExecutor(sh, C, dry=True).run(spec, plan, C, 2, ctx, hybrid=PROFILE).counters
        assert got == want, (path, policy, C)
        assert got["cpu_misses"] > 0 and got["transfers"] > 0
        plain = TraceExecutor(sh, C, dry=True).run(spec, plan, C, 2, ctx).counters
        assert plain["cpu_misses"] == 0
        assert got["transfers"] < plain["transfers"]       # CPU misses are not copied or cached


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


def test_cli_hybrid_model_cpu_threads_refused(capsys):
    # model-driven --hybrid exists (tests/test_hybrid_model.py); its host compute has no worker thread
    code, cap = _cli(["live", "--model", "tiny-mixtral", "--hybrid", "--cpu-threads", "2", "--device", "cpu"],
                     capsys)
    assert code != 0 and "--cpu-threads" in cap.err and len(cap.err.strip().splitlines()) == 1


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
