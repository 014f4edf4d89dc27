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

import ctypes


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
        evs = self.chunk_ev[l][s]

        def issue(st):
            for j in range(len(bounds) - 1):
                a, b = bounds[j], bounds[j + 1]
                dst[a:b].copy_(src[a:b], non_blocking=True)
                evs[j].record(st)
            return (bounds[-1] - bounds[0]) * dst.element_size()
        self._issue(l, s, after, step, issue)

    def copy_views(self, l: int, s: int, pairs, after, step: int = -1) -> None:
        """Copy (dst, src) view pairs into slot (l, s) as one copy with one event (chunk 0): dst a
        contiguous device view, src a contiguous host view or a 2-D one with unit inner stride (its
        rows copied with cuMemcpy2DAsync, pitch = its row stride). For partial experts (split misses)."""
        self.pending[l][s] = True
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return

        def issue(st):
            nbytes = 0
            for dst, src in pairs:
                if src.is_contiguous():
                    dst.copy_(src.reshape(dst.shape), non_blocking=True)
                else:
                    memcpy2d_h2d(dst, src, st)
                nbytes += src.numel() * src.element_size()
            self.chunk_ev[l][s][0].record(st)
            return nbytes
        self._issue(l, s, after, step, issue)

    def _issue(self, l: int, s: int, after, step: int, issue) -> None:
        # on the copy stream, after `after` and the slot's last reader: issue(stream) -> bytes copied
        st = self.stream
        if after is not None:
            st.wait_event(after)
        st.wait_event(self.slot_free[l][s])
        t0 = t1 = None
        if self.timing:
            t0, t1 = self._tev(), self._tev()
            t0.record(st)
        with self._stream_ctx(st):
            nbytes = issue(st)
        if self.timing:
            t1.record(st)
            self.copies.append((step, t0, t1, nbytes))

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

    def wait_pending(self, l: int, s: int, j: int) -> None:
        """Compute waits for chunk j of the copy into (l, s), if one is pending (its first use), once."""
        if self.pending[l][s]:
            self.wait_chunk(l, s, j)
            self.pending[l][s] = False

    def release(self, l: int, s: int) -> None:
        """The compute that reads slot (l, s) has been enqueued: later copies into it wait for it."""
        if self.cuda:
            self.slot_free[l][s].record(self.compute)


# ---- 2-D host -> device copies (CUDA driver API) --------------------------------------------------

class _Memcpy2D(ctypes.Structure):
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_CU_MEMORYTYPE_HOST, _CU_MEMORYTYPE_DEVICE = 1, 2
_cu2d = []


def memcpy2d_h2d(dst, src, stream) -> None:
    """dst (contiguous device [h, w]) <- src (host [h, w], row stride >= w, unit inner stride), async on
    `stream`: one cuMemcpy2DAsync, h rows of w elements (src should be pinned for the copy to be async)."""
    if not _cu2d:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemcpy2DAsync_v2
        fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _cu2d.append(fn)
    h, w = src.shape
    if src.stride(1) != 1 or tuple(dst.shape) != (h, w) or not dst.is_contiguous():
        raise ValueError(f"memcpy2d_h2d: src {tuple(src.shape)} stride {src.stride()} -> dst {tuple(dst.shape)}")
    es = src.element_size()
    m = _Memcpy2D(srcMemoryType=_CU_MEMORYTYPE_HOST, srcHost=src.data_ptr(), srcPitch=src.stride(0) * es,
                  dstMemoryType=_CU_MEMORYTYPE_DEVICE, dstDevice=dst.data_ptr(), dstPitch=w * es,
                  WidthInBytes=w * es, Height=h)
    r = _cu2d[0](ctypes.byref(m), ctypes.c_void_p(stream.cuda_stream))
    if r != 0:
        raise RuntimeError(f"cuMemcpy2DAsync failed with CUDA error {r}")
