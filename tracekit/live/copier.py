"""Copies host -> GPU slots on one dedicated copy stream, with a CUDA event per chunk.

Ordering rules (all on the GPU, no host synchronization):
  - a copy into slot (l, s) first waits on `after` (the compute event that made the copy's
    decision possible: routing for demand, layer end for prefetch) and on slot_free[l][s], the
    event of the last compute that read the slot;
  - compute on an expert waits only on the chunk events of that expert's copy (wait_chunk).
Events are preallocated per (layer, slot, chunk) and re-recorded: a stream wait captures the
event's latest record at the time of the call, so reuse is safe.
On a CPU "device" copies are synchronous and every wait is a no-op (for bookkeeping tests).
"""

from __future__ import annotations


class Copier:
    def __init__(self, device, L: int, C: int, n_chunks: int, timing: bool):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.timing = timing and self.cuda
        self.pending = [[False] * C for _ in range(L)]    # a copy into (l, s) not yet waited on by compute
        self.stalls: list = []      # (step, pre_event, post_event) around compute waits
        self.copies: list = []      # (step, start_event, end_event, bytes)
        if not self.cuda:
            return
        self.stream = torch.cuda.Stream()
        self.compute = torch.cuda.current_stream()
        E = torch.cuda.Event
        self.chunk_ev = [[[E() for _ in range(n_chunks)] for _ in range(C)] for _ in range(L)]
        self.slot_free = [[E() for _ in range(C)] for _ in range(L)]
        self._tpool: list = []
        self._marks: dict = {}

    def _tev(self):
        import torch

        return self._tpool.pop() if self._tpool else torch.cuda.Event(enable_timing=True)

    def mark(self, key: str):
        """Record the (reused) event `key` now on the compute stream, to order later copies after it."""
        import torch

        if not self.cuda:
            return None
        ev = self._marks.get(key)
        if ev is None:
            ev = self._marks[key] = torch.cuda.Event()
        ev.record(self.compute)
        return ev

    def copy(self, l: int, s: int, dst, src, bounds, after, step: int = -1) -> None:
        """dst, src: flat [numel] tensors; bounds: element offsets [0, b1, ..., numel] of the chunks."""
        self.pending[l][s] = True
        if not self.cuda:
            dst.copy_(src)
            return
        st = self.stream
        if after is not None:
            st.wait_event(after)
        st.wait_event(self.slot_free[l][s])
        t0 = t1 = None
        if self.timing:
            t0, t1 = self._tev(), self._tev()
            t0.record(st)
        evs = self.chunk_ev[l][s]
        with self._stream_ctx(st):
            for j in range(len(bounds) - 1):
                a, b = bounds[j], bounds[j + 1]
                dst[a:b].copy_(src[a:b], non_blocking=True)
                evs[j].record(st)
        if self.timing:
            t1.record(st)
            self.copies.append((step, t0, t1, (bounds[-1] - bounds[0]) * dst.element_size()))

    def _stream_ctx(self, st):
        import torch

        return torch.cuda.stream(st)

    def wait_chunk(self, l: int, s: int, j: int, step: int = -1) -> None:
        if not self.cuda:
            return
        if self.timing:
            pre, post = self._tev(), self._tev()
            pre.record(self.compute)
            self.compute.wait_event(self.chunk_ev[l][s][j])
            post.record(self.compute)
            self.stalls.append((step, pre, post))
        else:
            self.compute.wait_event(self.chunk_ev[l][s][j])

    def release(self, l: int, s: int) -> None:
        """The compute that reads slot (l, s) has been enqueued: later copies into it wait for it."""
        if self.cuda:
            self.slot_free[l][s].record(self.compute)
