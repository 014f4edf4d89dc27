"""Every registered policy, on random traces: numba replay == plain-Python reference, exactly.

One test, parametrized over tracekit.policies.names(). Per hypothesis example it checks:
  - replay_one's counters equal tests/reference.py's (and both agree on NotApplicable);
  - stepping the same compiled serve/after by hand (as the live executor will) never exceeds
    capacity or the in-flight cap, keeps slots consistent, and gives the same counters;
  - hits + misses == requests, transfers == misses + prefetches issued,
    prefetches issued == used + wasted;
  - a demand-only policy never beats Belady (hits, transfers);
  - a second run gives the same result (deterministic).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracekit.policies import NotApplicable, PolicyContext, get, names
from tracekit.replay import controller as ctlmod
from tracekit.replay.cost import load_profile
from tracekit.replay.engine import replay_one
from tracekit.replay.plan import build_plan
from tracekit.trace.core import Trace

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402  (tests/reference.py: the plain-Python reference)

PROFILE = load_profile("h100-pcie5")


# ---- random traces ------------------------------------------------------------------------

def make_trace(L, E, K, steps, seed, hidden, router):
    """steps: list of (decode, ntok). Experts are drawn with skew (so caches hit and chains have
    structure); rarely a (token, layer) has no event (-1) or its last rank is missing."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.5), size=L)                          # [L, E]
    seq, stp, ph, posn = [], [], [], []
    for s, (dec, n) in enumerate(steps):
        for i in range(n):
            seq.append(i if dec else 0)
            stp.append(s)
            ph.append(1 if dec else 0)
            posn.append(s if dec else i)
    T = len(seq)
    ex = np.full((T, L, K), -1, dtype=np.int16)
    for t in range(T):
        for l in range(L):
            p = pop[l] + 1e-3
            ex[t, l] = rng.choice(E, size=K, replace=False, p=p / p.sum())
            u = rng.random()
            if u < 0.03:
                ex[t, l] = -1
            elif u < 0.06 and K > 1:
                ex[t, l, K - 1] = -1
    hid = rout = None
    kind = "none"
    if hidden != "none":
        hid = rng.standard_normal((T, L, 4)).astype(np.float16 if hidden == "full16" else np.float32)
        kind = "proj:4" if hidden == "proj" else "full"
        if router:
            rout = rng.standard_normal((L, E, 4)).astype(np.float32)
    return Trace(path="<random>", format="tracekit", complete=True, num_layers=L, num_experts=E, top_k=K,
                 seq_id=np.array(seq, np.int32), step=np.array(stp, np.int32), phase=np.array(ph, np.int8),
                 position=np.array(posn, np.int32), token_id=np.full(T, -1, np.int32), experts=ex,
                 weights=np.zeros((T, L, K), np.float32), hidden=hid, router=rout, hidden_kind=kind)


@st.composite
def cases(draw):
    L = draw(st.sampled_from([2, 3, 1]))
    E = draw(st.integers(2, 8))
    K = draw(st.integers(1, min(3, E)))
    # (decode?, tokens): mostly decode steps of 1-3 tokens; prefill steps hold 2-4 tokens
    steps = draw(st.lists(st.tuples(st.sampled_from([True, True, True, False]), st.integers(1, 3)),
                          min_size=2, max_size=24))
    steps = [(dec, n if dec else n + 1) for dec, n in steps]
    hidden = draw(st.sampled_from(["full", "full", "full16", "proj", "none"]))
    trace = make_trace(L, E, K, steps, draw(st.integers(0, 2**32 - 1)), hidden,
                       draw(st.sampled_from([True, True, True, False])))
    # 1-3 configurations (capacity, in-flight cap, depth, warm-up) replayed on the same trace
    configs = draw(st.lists(st.tuples(st.integers(1, E), st.integers(1, 3), st.integers(0, min(3, E)),
                                      st.integers(0, 4)), min_size=1, max_size=3))
    return trace, [dict(C=C, cap=cap, depth=d, params={"warmup": w}) for C, cap, d, w in configs]


# ---- numba, stepped by hand with invariant checks ----------------------------------------

def check_ctl(ctl, C, cap):
    resident, slot_of, slot_owner, nres, pf, q = ctl[0], ctl[1], ctl[2], ctl[3], ctl[4], ctl[7]
    assert (nres <= C).all(), "capacity exceeded"
    assert (resident.sum(axis=1) == nres).all()
    for l in range(resident.shape[0]):
        owners = [int(e) for e in slot_owner[l] if e >= 0]
        assert len(owners) == nres[l] and len(set(owners)) == len(owners)
        for s, e in enumerate(slot_owner[l]):
            if e >= 0:
                assert resident[l, e] == 1 and slot_of[l, e] == s
    assert ((pf == 2) <= (resident == 1)).all(), "a prefetch in flight is not resident"
    assert 0 <= q[ctlmod.Q_INFLIGHT] == (pf == 2).sum() <= cap


def step_numba(spec, plan, C, cap, ctx):
    """The engine's loop in Python around the compiled serve/after/finish -> counters."""
    serve, after, finish = ctlmod.build(spec)
    st_ = spec.make_state(ctx)
    ctl = ctlmod.new_controller(plan.L, plan.E, C, cap)
    act = ctlmod.action_rows(ctl)
    for s in range(plan.num_steps):
        t0, t1 = plan.tok_ptr[s], plan.tok_ptr[s + 1]
        dec = bool(plan.decode[s] == 1)
        for l in range(plan.L):
            pos = s * plan.L + l
            a, b = plan.req_ptr[pos], plan.req_ptr[pos + 1]
            serve(ctl, st_, pos, l, plan.req_e[a:b], a, plan.req_next[a:b], dec, act)
            check_ctl(ctl, C, cap)
            after(ctl, st_, pos, l, plan.tok_ex, plan.hid, t0, t1, l, dec, spec.prefetches and dec, act)
            check_ctl(ctl, C, cap)
    finish(ctl)
    assert ctl[7][ctlmod.Q_INFLIGHT] == 0
    return ctlmod.counters_dict(ctl)


def run_numba(spec, plan, trace, cfg):
    return replay_one(spec, plan, cfg["C"], PROFILE, cap=cfg["cap"], depth=cfg["depth"],
                      router=trace.router, hidden_kind=trace.hidden_kind, params=cfg["params"])


def check_config(spec, trace, plan, cfg):
    C, cap = cfg["C"], cfg["cap"]
    try:
        ref = reference.simulate(trace, spec.name, C, cap=cap, depth=cfg["depth"], params=cfg["params"])
    except reference.RefNotApplicable:
        ref = None
    try:
        res = run_numba(spec, plan, trace, cfg)
    except NotApplicable:
        assert ref is None, "numba says not applicable, the reference ran"
        return
    assert ref is not None, "the reference says not applicable, numba ran"
    got = res.counters
    assert got == ref

    # the same compiled controller, driven call by call, with invariants checked after each call
    ctx = PolicyContext(plan.L, plan.E, C, plan.K, plan.hid.shape[2], trace.hidden_kind, trace.router,
                        cfg["depth"] or plan.K, dict(cfg["params"]))
    assert step_numba(spec, plan, C, cap, ctx) == got

    assert got["hits"] + got["demand_transfers"] == got["requests"] == len(plan.req_e)
    assert got["decode_hits"] <= got["decode_requests"]
    assert got["transfers"] == got["demand_transfers"] + got["prefetch_issued"]
    assert got["prefetch_issued"] == got["prefetch_used"] + got["prefetch_wasted"]
    if not spec.prefetches:
        assert got["prefetch_issued"] == got["prefetch_dropped"] == 0
    if spec.kind == "demand":
        opt = replay_one(get("belady"), plan, C, PROFILE).counters
        assert got["hits"] <= opt["hits"] and got["transfers"] >= opt["transfers"]

    again = run_numba(spec, plan, trace, cfg)
    assert again == res, "replay is not deterministic"


@pytest.mark.parametrize("name", names())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_policy_matches_reference(name, case):
    trace, configs = case
    plan = build_plan(trace)
    for cfg in configs:
        check_config(get(name), trace, plan, cfg)


# ---- longer traces: the hypothesis cases above are tiny, and a prediction's scoring can be wrong in
# ways they rarely reach (P's counts stay small); these replay every prefetching policy on a
# 600-token synthetic trace with hidden states and markov on a shared Mixtral trace.

SHARED = Path(os.environ.get("TRACEKIT_TRACES", Path(__file__).parents[2] / "shared" / "traces")) / \
    "mixtral8x7b_humaneval_2probs_decode.parquet"


@pytest.mark.parametrize("name", [n for n in names() if get(n).prefetches])
def test_prefetching_policy_matches_reference_on_a_longer_trace(name):
    from tracekit.trace.synthetic import synthetic_trace

    tr = synthetic_trace(tokens=600, layers=4, experts=8, top_k=2, seed=3, hidden_dim=16, with_router=True)
    plan = build_plan(tr)
    for C, cap in ((1, 1), (2, 2), (4, 2)):
        got = replay_one(get(name), plan, C, PROFILE, cap=cap, router=tr.router, hidden_kind="full").counters
        assert got["prefetch_issued"] > 50
        assert got == reference.simulate(tr, name, C, cap=cap, depth=0, params={})


@pytest.mark.skipif(not SHARED.exists(), reason="shared traces not found")
def test_markov_matches_reference_on_mixtral_trace():
    from tracekit.trace import read_trace

    tr = read_trace(str(SHARED))
    plan = build_plan(tr)
    for C in (2, 4):
        got = replay_one(get("markov"), plan, C, PROFILE).counters
        assert got["prefetch_issued"] > 500
        assert got == reference.simulate(tr, "markov", C, cap=2, depth=0, params={})


@pytest.mark.parametrize("name", [n for n in names() if not get(n).prefetches])
def test_demand_policy_matches_reference_with_many_experts(name):
    # 130 experts: ebco's active-expert bitmasks span three 64-bit words
    from tracekit.trace.synthetic import synthetic_trace

    tr = synthetic_trace(tokens=400, layers=2, experts=130, top_k=8, seed=5, hidden_dim=0)
    plan = build_plan(tr)
    for C in (10, 40):
        got = replay_one(get(name), plan, C, PROFILE).counters
        assert 0 < got["hits"] < got["requests"]
        assert got == reference.simulate(tr, name, C, cap=2, depth=0, params={})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("E", [3, 8, 16])
def test_dot_in_d_order_is_plain_python_bit_for_bit(dtype, E):
    # the hidden-state policies' dot products (8 experts as vector lanes when E % 8 == 0, a scalar
    # loop otherwise) against plain Python sums in d order, on values spanning 6 decades
    from tracekit.policies.base import dot_in_d_order

    rng = np.random.default_rng(7)
    for D in (1, 3, 5, 64, 67):
        M = (rng.standard_normal((D, E)) * 10.0 ** rng.integers(-3, 4, (D, E))).astype(dtype)
        hid = (rng.standard_normal(D) * 10.0 ** rng.integers(-3, 4, D)).astype(np.float32)
        a = np.full(E, np.nan)
        hh = dot_in_d_order(M, hid, a)
        want = [0.0] * E
        for d in range(D):                    # products in numpy's types (float32 x float32 -> float32), sums in float64
            for e in range(E):
                want[e] += float(hid[d] * M[d, e])
        assert hh == sum((float(hid[d] * hid[d]) for d in range(D)), 0.0)
        assert a.tolist() == want


@pytest.mark.parametrize("E", [8, 9])
def test_markov_top2_prediction_with_ties(E):
    # markov's depth-2 prediction (a tournament when E == 8, a loop otherwise) against plain Python:
    # score b by P[a0, b] + P[a1, b], the two best with score > 0, ties to the lower id
    from tracekit.policies import markov

    rng = np.random.default_rng(11)
    st_ = markov.make_state(PolicyContext(1, E, 2, 2, 0, "none", None, 2))
    out = np.full((4, 3), -7, dtype=np.int64)
    ex = np.zeros(2, dtype=np.int16)
    for _ in range(300):
        st_[1][0] = rng.integers(0, 3, (E, E)) * rng.integers(0, 2, (E, E))   # small counts: many ties, some zero
        a0, a1 = rng.choice(E, 2, replace=False)
        ex[:] = a0, a1
        n = markov.predict(st_, 0, ex, np.zeros(0, np.float32), out)
        score = st_[1][0, a0] + st_[1][0, a1]
        want = sorted((b for b in range(E) if score[b] > 0), key=lambda b: (-score[b], b))[:2]
        assert [tuple(r) for r in out[:n].tolist()] == [(1, 0, b) for b in want]
