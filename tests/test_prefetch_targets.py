"""Prediction paths that no registered policy takes, checked on all three controllers.

markov predicts the same layer one step ahead; trajectory and gate-lookahead the next layer of the same
step. So none of them ever predicts one expert for two targets (a queued prediction re-queued under the
later target), a target two layers ahead, or a row the controller must skip (a target not after the
current position, a layer out of range). The test-only prefetching policy below emits all of these.
It is registered only while these tests run. Its plain-Python twin runs on tests/reference.py's
controller, and the controller loop (`run`, which live drives) and the fused prefetch loop
(`run_prefetch`) must both equal it exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

from tracekit import policies
from tracekit.policies.base import PolicySpec, lru_access, lru_insert, lru_victim, noop_evict, noop_observe
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402
import reference_policies  # noqa: E402
from test_policies import PROFILE, make_trace  # noqa: E402
from test_replay_engines import RANDOM_TRACE, assert_identical  # noqa: E402

NAME = "test-multitarget"


@njit(cache=True)
def _rows(l, e, E):
    # (dstep, layer, expert) rows for a token whose first expert is e at layer l
    e2 = (e + 1) % E
    return ((0, l + 1, e), (1, l + 1, e), (1, l, e2), (0, l + 2, e2), (0, l, e), (1, l + 9, e), (0, -1, e))


def make_state(ctx):
    return (np.zeros((ctx.num_layers, ctx.num_experts), dtype=np.int64),)   # last use [L, E]


@njit(cache=True)
def predict(st, l, ex, hid, out):
    rows = _rows(l, np.int64(ex[0]), st[0].shape[1])
    for r in range(len(rows)):
        out[r, 0], out[r, 1], out[r, 2] = rows[r]
    return len(rows)


class MultiTarget(reference_policies.Policy):
    kind = "prefetch"

    def predict(self, l, ex, hid):
        return [tuple(int(x) for x in r) for r in _rows.py_func(l, ex[0], self.ctx["E"])]


@pytest.fixture(scope="module")
def spec():
    policies.names()                                  # load the real registry first
    s = policies.register(PolicySpec(NAME, "prefetch", "test only: several targets per expert", make_state,
                                     lru_access, lru_insert, noop_evict, lru_victim, noop_observe, predict))
    reference_policies.POLICIES[NAME] = MultiTarget
    yield s
    del policies.REGISTRY[NAME]
    del reference_policies.POLICIES[NAME]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**{**RANDOM_TRACE, "L": st.integers(1, 4)}, C=st.integers(1, 6), cap=st.integers(1, 4))
def test_several_targets_per_expert_agree_on_every_controller(spec, L, E, K, seed, steps, C, cap, prof):
    K, C = min(K, E), min(C, E)
    tr = make_trace(L, E, K, steps, seed, "none", False)
    plan = build_plan(tr)
    ref = reference.simulate(tr, NAME, C, cap=cap)
    run = replay_one(spec, plan, C, prof, cap=cap, engine="controller")
    assert run.counters == ref
    assert_identical(replay_one(spec, plan, C, prof, cap=cap, engine="prefetch"), run)


def test_the_policy_reaches_the_re_queue_path(spec):
    # not vacuous: on this trace a queued prediction is re-queued under a later target (the reference
    # controller's queue then holds one expert twice) and prefetches are issued, used and wasted
    tr = make_trace(3, 6, 2, [(True, 2)] * 30, 1, "none", False)
    seen = []

    def check(ctl):
        seen.append(len(ctl.queue) - len(set((l, e) for l, e, _ in ctl.queue)))

    got = reference.simulate(tr, NAME, 2, cap=1, check=check)
    assert max(seen) > 0
    assert got["prefetch_issued"] > 0 and got["prefetch_used"] > 0 and got["prefetch_wasted"] > 0
    assert replay_one(spec, build_plan(tr), 2, PROFILE, cap=1, engine="prefetch").counters == got
