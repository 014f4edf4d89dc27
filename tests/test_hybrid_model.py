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


def _run(ids, policy, C, prof=PROFILE, patch=None):
    from tracekit.live.backend import OffloadRunner
    from tracekit.record.models import load_model

    ld = load_model("tiny-mixtral", device="cpu")
    runner = OffloadRunner(ld.model, P.get(policy), C, 2, chunk_mb=0.01, hybrid=prof)
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
