"""The demand-only loop (run_demand), the transition-table loop (run_table) and the fused prefetching
loop (run_prefetch) equal the full controller loop (run) exactly.

replay_one picks run_demand for every policy that never prefetches (demand and oracle kinds) when
--hybrid is off; the live executor always drives the controller. Both must give the same counters
and the same cost-model times, on random traces (prefill and decode steps, missing ranks, several
FFN table points, chunked copies) and on a shared Mixtral trace.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracekit import policies
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan
from tracekit.trace import read_trace

sys.path.insert(0, str(Path(__file__).parent))
from test_policies import make_trace  # noqa: E402

DEMAND = [n for n in policies.names() if not policies.get(n).prefetches]
BASE = load_profile("h100-pcie5")
PROFILES = [BASE, dataclasses.replace(BASE, chunks=4, ffn_ms={"1": 0.14, "4": 0.2, "64": 1.5},
                                      attn_ms_per_token=0.01)]
TRACE = Path(os.environ.get("TRACEKIT_TRACES", Path(__file__).parents[2] / "shared" / "traces")) / \
    "mixtral8x7b_humaneval0_prefill_decode.parquet"


def both(spec, plan, C, prof):
    a = replay_one(spec, plan, C, prof, engine="controller")
    b = replay_one(spec, plan, C, prof, engine="demand")
    return a, b


def assert_same(a, b):
    assert a.counters == b.counters
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float):
            assert y == pytest.approx(x, rel=1e-12, abs=1e-15), f.name
        else:
            assert x == y, f.name


def test_demand_engine_is_used_only_where_it_applies():
    assert {"lru", "fifo", "lfu", "belady", "ebco"} <= set(DEMAND)
    assert "markov" not in DEMAND
    tr = make_trace(2, 4, 2, [(False, 3), (True, 2)], 0, "none", False)
    with pytest.raises(ValueError):
        replay_one(policies.get("markov"), build_plan(tr), 2, BASE, engine="demand")


# random traces for the engine-equality tests: L layers, E experts, top-K, steps (decode?, tokens)
RANDOM_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RANDOM_TRACE = dict(
    L=st.integers(1, 3), E=st.integers(2, 8), K=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.tuples(st.sampled_from([True, True, False]), st.integers(1, 4)), min_size=1, max_size=20),
    prof=st.sampled_from(PROFILES))


@pytest.mark.parametrize("name", DEMAND)
@RANDOM_SETTINGS
@given(**RANDOM_TRACE, C=st.integers(1, 8))
def test_demand_engine_equals_controller(name, L, E, K, seed, steps, C, prof):
    K, C = min(K, E), min(C, E)
    plan = build_plan(make_trace(L, E, K, steps, seed, "none", False))
    assert_same(*both(policies.get(name), plan, C, prof))


@pytest.mark.skipif(not TRACE.exists(), reason="shared traces not found")
@pytest.mark.parametrize("name", DEMAND)
def test_demand_engine_equals_controller_on_mixtral_trace(name):
    plan = build_plan(read_trace(str(TRACE)))
    for C in (1, 2, 4):
        a, b = both(policies.get(name), plan, C, BASE)
        assert a.counters["transfers"] > 0
        assert_same(a, b)


# ---- the transition-table loop (run_table) for order-state policies --------------------------

TABLE = [n for n in policies.names() if policies.get(n).order_state]


def assert_identical(a, b):
    # bit-identical: every counter and every float
    assert dataclasses.asdict(a) == dataclasses.asdict(b)


def test_table_engine_is_used_only_where_it_applies():
    from tracekit.replay.table import MAX_STATES, n_states

    assert {"lru", "fifo"} <= set(TABLE)
    assert not {"lfu", "belady", "ebco", "markov"} & set(TABLE)
    plan = build_plan(make_trace(2, 8, 2, [(False, 3), (True, 2)], 0, "none", False))
    with pytest.raises(ValueError):
        replay_one(policies.get("lfu"), plan, 2, BASE, engine="table")
    assert n_states(8, 4) <= MAX_STATES < n_states(8, 6)
    with pytest.raises(ValueError):                      # too many states: the demand loop runs instead
        replay_one(policies.get("lru"), plan, 6, BASE, engine="table")
    assert_identical(replay_one(policies.get("lru"), plan, 6, BASE),
                     replay_one(policies.get("lru"), plan, 6, BASE, engine="demand"))


def test_lru_table_states_are_the_ordered_resident_sets():
    from tracekit.replay.table import build_table, n_states

    T, H, full, residents = build_table(policies.get("lru"), 4, 2)
    assert T.shape == (n_states(4, 2), 4) and residents[0] == []
    assert H[0].tolist() == [0, 0, 0, 0]                  # empty cache: every request misses
    s = T[T[0, 1], 3]                                     # requests 1 then 3: residents {1, 3}
    assert H[s].tolist() == [0, 1, 0, 1] and full[s] == 1
    after = T[s, 0]                                       # 0 misses and evicts 1, the least recent
    assert sorted(residents[after]) == [0, 3] and H[T[s, 1], 3] == 1


@pytest.mark.parametrize("name", TABLE)
@RANDOM_SETTINGS
@given(**RANDOM_TRACE, C=st.integers(1, 4))
def test_table_engine_equals_demand_and_controller(name, L, E, K, seed, steps, C, prof):
    K, C = min(K, E), min(C, E)
    plan = build_plan(make_trace(L, E, K, steps, seed, "none", False))
    spec = policies.get(name)
    t = replay_one(spec, plan, C, prof, engine="table")
    assert_identical(t, replay_one(spec, plan, C, prof, engine="demand"))
    assert_same(replay_one(spec, plan, C, prof, engine="controller"), t)


@pytest.mark.skipif(not TRACE.exists(), reason="shared traces not found")
@pytest.mark.parametrize("name", TABLE)
def test_table_engine_equals_demand_on_mixtral_trace(name):
    plan = build_plan(read_trace(str(TRACE)))
    for C in (1, 2, 3, 4):
        t = replay_one(policies.get(name), plan, C, BASE, engine="table")
        assert t.counters["transfers"] > 0
        assert_identical(t, replay_one(policies.get(name), plan, C, BASE, engine="demand"))


# ---- the fused prefetching loop (run_prefetch) ---------------------------------------------

PREFETCH = [n for n in policies.names() if policies.get(n).prefetches]


def test_prefetch_engine_is_used_only_where_it_applies():
    assert {"markov", "trajectory", "gate-lookahead"} <= set(PREFETCH)
    plan = build_plan(make_trace(2, 8, 2, [(False, 3), (True, 2)], 0, "none", False))
    with pytest.raises(ValueError):
        replay_one(policies.get("lru"), plan, 2, BASE, engine="prefetch")
    hy = dataclasses.replace(BASE, cpu_ffn_ms={"1": 6.6})
    with pytest.raises(ValueError):
        replay_one(policies.get("markov"), plan, 2, hy, hybrid=True, engine="prefetch")
    wide = build_plan(make_trace(2, 70, 2, [(True, 1)] * 30, 0, "none", False))   # E > 64: no bitmask
    with pytest.raises(ValueError):
        replay_one(policies.get("markov"), wide, 2, BASE, engine="prefetch")
    assert_identical(replay_one(policies.get("markov"), wide, 2, BASE),
                     replay_one(policies.get("markov"), wide, 2, BASE, engine="controller"))


@pytest.mark.parametrize("name", PREFETCH)
@RANDOM_SETTINGS
@given(**RANDOM_TRACE, C=st.integers(1, 8), cap=st.integers(1, 4), depth=st.integers(0, 3))
def test_prefetch_engine_equals_controller(name, L, E, K, seed, steps, C, prof, cap, depth):
    K, C = min(K, E), min(C, E)
    tr = make_trace(L, E, K, steps, seed, "full", True)
    plan = build_plan(tr)
    kw = dict(cap=cap, depth=depth, router=tr.router, hidden_kind="full", params={"warmup": 2})
    c = replay_one(policies.get(name), plan, C, prof, engine="controller", **kw)
    assert_identical(replay_one(policies.get(name), plan, C, prof, engine="prefetch", **kw), c)


@pytest.mark.skipif(not TRACE.exists(), reason="shared traces not found")
def test_prefetch_engine_equals_controller_on_mixtral_trace():
    plan = build_plan(read_trace(str(TRACE)))
    for C in (1, 2, 4):
        for cap in (1, 2, 4):
            c = replay_one(policies.get("markov"), plan, C, BASE, cap=cap, engine="controller")
            assert c.counters["prefetch_issued"] > 0 and c.counters["prefetch_wasted"] > 0
            assert_identical(replay_one(policies.get("markov"), plan, C, BASE, cap=cap, engine="prefetch"), c)
