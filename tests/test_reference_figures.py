"""The issue's reference figures (decode hit rate, 4 decimals) on the shared Mixtral traces,
and "not applicable" (not a crash) for policies that need hidden states those traces lack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracekit.policies import NotApplicable, get
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan
from tracekit.trace import read_trace

TRACES = Path(__file__).parent.parent.parent / "shared" / "traces"
TWO = "mixtral8x7b_humaneval_2probs_decode"
ONE = "mixtral8x7b_humaneval0_prefill_decode"
# (trace, policy, capacity) -> decode hit rate, from the table
FIGURES = {
    (TWO, "lru", 2): 0.3431, (TWO, "lru", 4): 0.6033, (TWO, "fifo", 2): 0.3245,
    (TWO, "lfu", 2): 0.2424, (TWO, "belady", 2): 0.4775, (TWO, "belady", 4): 0.7628,
    (ONE, "lru", 2): 0.3015, (ONE, "lru", 4): 0.5795, (ONE, "fifo", 2): 0.2885,
    (ONE, "lfu", 2): 0.2464, (ONE, "belady", 2): 0.4533, (ONE, "belady", 4): 0.7613,
}
_plans: dict = {}


def plan_of(name):
    path = TRACES / f"{name}.parquet"
    if not path.exists():
        pytest.skip(f"shared trace {path} is absent (the reference figures need ../shared/traces)")
    if name not in _plans:
        _plans[name] = build_plan(read_trace(path))
    return _plans[name]


@pytest.mark.parametrize("trace,policy,capacity", list(FIGURES))
def test_reference_figure(trace, policy, capacity):
    c = replay_one(get(policy), plan_of(trace), capacity, load_profile("h100-pcie5")).counters
    rate = c["decode_hits"] / c["decode_requests"]
    assert round(rate, 4) == FIGURES[trace, policy, capacity]


@pytest.mark.parametrize("policy", ["trajectory", "gate-lookahead"])
@pytest.mark.parametrize("trace", [ONE, TWO])
def test_hidden_state_policies_not_applicable(trace, policy):
    plan = plan_of(trace)
    assert plan.hid.shape[2] == 0
    with pytest.raises(NotApplicable, match="hidden states"):
        replay_one(get(policy), plan, 2, load_profile("h100-pcie5"))
