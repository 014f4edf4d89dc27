"""The GIL-free CPU worker (tracekit/live/ring_worker.py) on a CPU "device": its job ring, hidden-state
and result flags and numba loop compute exactly what the thread worker computes, and its ring wraps.
A full hybrid --split run with it: tests/test_hybrid.py. On CUDA the compute stream waits on the same
flags: tests/test_live_gpu.py."""

import numpy as np
import pytest

from tracekit.live.cpu_worker import CpuWorker
from tracekit.live.executor import Shapes, TraceExecutor
from tracekit.live.ring_worker import RING, RingWorker
from tracekit.live.store import ExpertStore

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("n", [1, 2, 3])                  # 3 > FUSED_MAX_TOKENS: run by the main thread
def test_ring_worker_layers_equal_thread_worker(n):
    from tracekit.live.copier import Copier
    from tracekit.replay.controller import CPU, SPLIT

    sh = Shapes(2, 4, 32, 128, 8)
    store = ExpertStore(2, 4, sh.numel, pin=False, seed=3)
    g = torch.Generator().manual_seed(1)
    for e in range(4):
        store.layers[1][e].copy_((torch.randn(sh.numel, generator=g) * 0.1).to(torch.bfloat16))
    ex = TraceExecutor(sh, 2, "cpu", store, rows=[(0, 48), (48, 96), (96, 128)], timing=False, max_tokens=4)
    outs = {}
    try:
        for kind in ("thread", "ring"):
            ex.worker = CpuWorker(sh, 4, "cpu", threads=1) if kind == "thread" else RingWorker(sh, 4, store, "cpu", 1)
            for name, row in (("cpu", [CPU, 1, 2, -1, 0]), ("split", [SPLIT, 1, 2, 21, 0]),
                              ("two", [CPU, 1, 3, -1, 0])):
                rows = [row] if name != "two" else [[CPU, 1, 0, -1, 0], row]   # two jobs in one layer
                cp = Copier("cpu", 2, 3, 3, False)
                _, y = ex._layer(cp, rows, 1, 0, ex.x[:n], np.array([n]), None)
                outs[kind, name] = y.clone()
            assert len(ex.worker.jobs) == 4 and all(j.seconds > 0 for j in ex.worker.jobs)
            ex.worker.close()
            ex.worker = None
        for name in ("cpu", "split", "two"):
            assert torch.equal(outs["ring", name], outs["thread", name]), name
        assert not torch.equal(outs["ring", "cpu"], outs["ring", "split"])
    finally:
        ex.close()
        store.free()


def test_ring_worker_wraps_its_ring_and_stops():
    # more jobs than ring slots, collected one by one; then close() ends the worker thread
    sh = Shapes(1, 2, 16, 32, 8)
    store = ExpertStore(1, 2, sh.numel, pin=False, seed=1)
    wk = RingWorker(sh, 2, store, "cpu", 1)
    try:
        x = torch.randn(1, sh.H).to(torch.bfloat16)
        ref = None
        for i in range(RING + 5):
            xh, tok = wk.send_hidden(x, 1, i % 2, None)
            job = wk.submit(tok, xh, None, i % 2, 0, 0, src=(0, 1, 0))
            out = torch.zeros(1, sh.H, dtype=torch.bfloat16)
            wk.collect(job, i % 2, 0, 1, out)
            ref = out if ref is None else ref
            assert torch.equal(out, ref)
        assert wk.ctl[0] == RING + 5
    finally:
        wk.close()
    assert not wk._t.is_alive()
