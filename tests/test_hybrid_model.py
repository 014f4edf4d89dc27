"""Model-driven hybrid (`tracekit live --model M --hybrid`) on CPU, tiny-mixtral: CPU misses are computed
on the host from the store's weights, greedy output is token-identical to the plain model, and the
backend's counters (cpu_misses included) equal a hybrid replay of the requests it served. On a CPU
"device" both paths run the same dtype and kernels; the identity still checks that the host path uses
the right expert, tokens and routing weights (a broken host path changes the tokens: see the last test)."""

import dataclasses

import pytest

from tracekit import policies as P
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one

torch = pytest.importorskip("torch")

# CPU FFN and activation copies far cheaper than a copy (7 us), growing per token: decode misses and
# small prefill misses go to the CPU, large prefill misses are copied
PROFILE = dataclasses.replace(load_profile("h100-pcie5"), cpu_ffn_ms={"1": 0.002}, act_copy_us=0.5)
NEW = 10


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module")
def reference():
    from tracekit.live.backend import set_impl
    from tracekit.record.models import load_model

    ld = load_model("tiny-mixtral", device="cpu")
    ids = torch.tensor([ld.tokenizer.encode("def add(a, b):\n    return a + b\n\ndef mul(a, b):")])
    set_impl(ld.model, "eager")
    return ids, _generate(ld.model, ids)


def _run(ids, policy, C, prof=PROFILE, patch=None, dtype="auto", **runner_kw):
    from tracekit.live.backend import OffloadRunner
    from tracekit.record.models import load_model

    ld = load_model("tiny-mixtral", device="cpu", dtype=dtype)
    runner = OffloadRunner(ld.model, P.get(policy), C, 2, chunk_mb=0.01, hybrid=prof, **runner_kw)
    if patch:
        patch(runner)
    try:
        out = _generate(ld.model, ids)
    finally:
        runner.close()
    return runner, out


@pytest.mark.parametrize("policy,C", [("lru", 2), ("markov", 2), ("lfu", 3)])
def test_model_hybrid_identical_and_equals_replay(reference, policy, C):
    runner, out = _run(reference[0], policy, C)
    assert torch.equal(out, reference[1]), policy
    c = runner.counters()
    assert c["cpu_misses"] > 0 and c["decode_cpu_misses"] > 0
    assert c["demand_transfers"] > 0                   # both paths taken
    assert runner.cpu_jobs == c["cpu_misses"]          # every CPU action was computed on the host
    plan = runner.as_plan()
    want = replay_one(P.get(policy), plan, C, PROFILE, cap=2, hybrid=True,
                      expert_bytes=runner.expert_bytes).counters
    assert c == want
    plain = replay_one(P.get(policy), plan, C, PROFILE, cap=2).counters
    assert plain["cpu_misses"] == 0 and c["transfers"] < plain["transfers"]   # CPU misses not cached


@pytest.mark.parametrize("policy", ["lru", "markov"])
def test_model_hybrid_split_identical_and_equals_replay(reference, policy):
    # --split model-driven: a layer's single miss is split (first rows copied to the staging slot and
    # computed there, the rest on the host); fp32 greedy tokens identical, counters = a split replay
    runner, out = _run(reference[0], policy, 2, split=True)
    assert torch.equal(out, reference[1]), policy
    c = runner.counters()
    assert c["split_misses"] > 0 and c["split_units"] > 0 and c["demand_transfers"] > 0
    assert runner.cpu_jobs == c["cpu_misses"] + c["split_misses"]
    want = replay_one(P.get(policy), runner.as_plan(), 2, PROFILE, cap=2, hybrid=True, split=True,
                      expert_bytes=runner.expert_bytes).counters
    assert c == want


def test_broken_split_gpu_part_changes_tokens(reference):
    # the split identity above is not vacuous: dropping the staging slot's rows changes the tokens
    def patch(runner):
        real = runner._split_gpu
        runner._split_gpu = lambda *a: real(*a) * 0

    runner, out = _run(reference[0], "lru", 2, patch=patch, split=True)
    assert runner.counters()["split_misses"] > 0
    assert not torch.equal(out, reference[1])


def test_model_hybrid_default_profile_copies_tiny_experts(reference):
    # the real profile (6.6 ms per CPU expert-token, 20 us activation copies) never prefers the CPU
    # for a tiny expert that copies in ~7 us: hybrid degenerates to transfer-only, still identical
    runner, out = _run(reference[0], "lru", 2, load_profile("h100-pcie5"))
    assert torch.equal(out, reference[1])
    assert runner.counters()["cpu_misses"] == 0


def test_broken_host_path_changes_tokens(reference):
    # the identity above is not vacuous: zeroing the host experts' output changes the greedy tokens
    def patch(runner):
        real = runner._host_expert

        def zero(*a):
            p, t, cur = real(*a)
            return p, t, torch.zeros_like(cur)
        runner._host_expert = zero

    runner, out = _run(reference[0], "lru", 2, patch=patch)
    assert runner.counters()["cpu_misses"] > 0
    assert not torch.equal(out, reference[1])


def test_model_hybrid_needs_cpu_table(reference):
    from tracekit.errors import UserError

    with pytest.raises(UserError, match="cpu_ffn_ms"):
        _run(reference[0], "lru", 2, dataclasses.replace(PROFILE, cpu_ffn_ms={}))


# ---- bf16: the fused host kernel on transformers' layout ----------------------------------------

@pytest.mark.parametrize("n,f0", [(1, 0), (2, 0), (1, 40)])
def test_fused_hf_kernel_matches_eager(n, f0):
    # host_ffn.ffn_fused_hf on [2F, H] / [H, F] bf16 weights (rows f0..F) against transformers' eager
    # expert maths with torch's host matmuls: equal within one bf16 step of the output's magnitude
    import numpy as np
    import torch.nn.functional as Fn

    from tracekit.live.host_ffn import ffn_fused_hf

    g = torch.Generator().manual_seed(n * 100 + f0)
    H, F = 64, 96
    gu = (torch.randn(2 * F, H, generator=g) * 0.1).bfloat16()
    dn = (torch.randn(H, F, generator=g) * 0.1).bfloat16()
    x = torch.randn(n, H, generator=g).bfloat16()
    gate, up = Fn.linear(x, torch.cat([gu[f0:F], gu[F + f0:]])).chunk(2, dim=-1)
    ref = Fn.linear(Fn.silu(gate) * up, dn[:, f0:].contiguous())
    out = torch.empty(n, H, dtype=torch.bfloat16)

    def bits(t):
        return t.view(torch.int16).numpy().view(np.uint16)

    ffn_fused_hf(x.float().numpy(), bits(gu), bits(dn), f0, np.zeros((n, F), np.float32), bits(out))
    scale = ref.float().abs().max()
    assert scale > 0.05
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -8 * float(scale))


def _run_bf16(ids, kernel, check=None):
    return _run(ids, "lru", 2, patch=check, dtype="bfloat16", cpu_kernel=kernel, cpu_threads=2)


def test_model_hybrid_bf16_fused_kernel_within_tolerance(reference):
    # bf16 model-driven hybrid: decode CPU misses run the fused kernel, each result within one bf16
    # step of the eager maths on the same tokens and weights; the counters equal a hybrid replay
    import torch.nn.functional as Fn

    seen = []

    def check(runner):
        assert runner._host.on and runner._host.threads == 2
        real = runner._host.fused

        def fused(l, e, x, f0=0):
            assert f0 == 0                               # no --split here
            y = real(l, e, x, f0)
            if y is not None:
                w = runner.store.layers[l][e]
                F2H = runner.shape_gu[0] * runner.shape_gu[1]
                gate, up = Fn.linear(x, w[:F2H].view(runner.shape_gu)).chunk(2, dim=-1)
                ref = Fn.linear(Fn.silu(gate) * up, w[F2H:].view(runner.shape_dn))
                seen.append(float((y.float() - ref.float()).abs().max() / ref.float().abs().max()))
            return y
        runner._host.fused = fused

    runner, _ = _run_bf16(reference[0], "fused", check)
    c = runner.counters()
    assert c["decode_cpu_misses"] > 0 and len(seen) >= c["decode_cpu_misses"]
    assert max(seen) <= 2 ** -7
    assert runner.cpu_s > 0
    want = replay_one(P.get("lru"), runner.as_plan(), 2, PROFILE, cap=2, hybrid=True,
                      expert_bytes=runner.expert_bytes).counters
    assert c == want


def test_model_hybrid_bf16_torch_kernel_identical(reference):
    # --cpu-kernel torch runs the eager maths on the host: on a CPU device that is the plain bf16 model's
    # own kernel, so greedy tokens are identical to it
    from tracekit.live.backend import set_impl
    from tracekit.record.models import load_model

    ld = load_model("tiny-mixtral", device="cpu", dtype="bfloat16")
    set_impl(ld.model, "eager")
    ref = _generate(ld.model, reference[0])
    runner, out = _run_bf16(reference[0], "torch")
    assert not runner._host.on and runner.counters()["cpu_misses"] > 0
    assert torch.equal(out, ref)
