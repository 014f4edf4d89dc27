"""The hybrid's host-CPU worker, GIL-free: the GPU waits for CPU results, the main thread never does.

cpu_worker.CpuWorker makes the MAIN THREAD wait for each CPU job before it enqueues the result's
copy, the add and the next layer, so the main thread's wake-up and launches sit between the end of
every CPU job and the next GPU work. Here the compute stream itself waits for the job's result flag
(tracekit.live.stream_wait), so the main thread runs ahead. That is only safe if finishing a job
never needs the GIL: the main thread may block inside a CUDA call (e.g. on a full launch queue)
while holding it, and then the GPU, waiting for the job, would never release it (we saw this
deadlock with a Python worker thread; docs/results_live.md, call 10). So the whole worker loop is
one numba nogil call:

  poll the job ring (filled by the main thread: numpy stores, the tail written last)
  -> poll the hidden state's flag (written by the d2h stream after the device->host copy)
  -> the fused FFN (host_ffn.ffn_fused) on the pinned expert -> result bits into yh[parity, j]
  -> the job's time, the result flag (the compute stream waits on it), the ring's head.

Jobs of more than FUSED_MAX_TOKENS tokens (prefill) are not for this kernel: the main thread waits
until the ring is empty and runs them itself with torch (`_run_here`), then sets their flags.
Without CUDA the same loop runs, the main thread sets the hidden-state flags itself and polls the
result flags (the tests on a CPU "device" use it).
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
from numba import njit

from tracekit.live import host_ffn
from tracekit.live.cpu_worker import add_host_result, default_threads
from tracekit.live.host_ffn import FUSED_MAX_TOKENS, ffn_fused

_libc = ctypes.CDLL(None)
_yield = _libc.sched_yield
_yield.argtypes = []
_yield.restype = ctypes.c_int
_clock_gettime = _libc.clock_gettime
_clock_gettime.argtypes = [ctypes.c_int, ctypes.c_uint64]       # (CLOCK_MONOTONIC, timespec address)
_clock_gettime.restype = ctypes.c_int

RING = 1024
R_LAYER, R_EXPERT, R_ROW0, R_N, R_PAR, R_SLOT, R_HID_I, R_HID_V, R_RES_I, R_RES_V = range(10)
K_HEAD, K_TAIL, K_STOP = range(3)


@njit(nogil=True)
def _now(ts):
    _clock_gettime(1, ts.ctypes.data)
    return ts[0] + ts[1] * 1e-9


@njit(nogil=True)
def _serve_ring(ring, ctl, flags, xh, yh, W, part, xf, secs, ts, F, H, threads):
    # ring int64 [RING, 10]; ctl int64 [3]; flags int32 [*]; xh uint16 [2, T, H]; yh uint16 [2, E, T, H];
    # W: tuple of L uint16 [E, F * 3 * H]; part float32 [threads * FUSED_MAX_TOKENS * H];
    # xf float32 [FUSED_MAX_TOKENS, H];
    # secs float64 [RING] (each job's FFN seconds, by ring slot). Returns when ctl[K_STOP] is set and
    # the ring is empty. The external calls in the polling loops make the compiler reload memory.
    R = ring.shape[0]
    while True:
        head = ctl[K_HEAD]
        while ctl[K_TAIL] == head:
            if ctl[K_STOP] != 0:
                return
            _yield()
        r = head % R
        while flags[ring[r, R_HID_I]] < ring[r, R_HID_V]:
            _yield()
        t0 = _now(ts)
        n, p = ring[r, R_N], ring[r, R_PAR]
        for i in range(n):
            for h in range(H):
                xf[i, h] = np.float32(host_ffn._bits_to_f32(xh[p, i, h]))
        w = W[ring[r, R_LAYER]][ring[r, R_EXPERT]].reshape((F, 3, H))[ring[r, R_ROW0]:]
        ffn_fused(xf[:n], w, part[: threads * n * H].reshape((threads, n, H)), yh[p, ring[r, R_SLOT], :n])
        secs[r] = _now(ts) - t0
        flags[ring[r, R_RES_I]] = ring[r, R_RES_V]
        ctl[K_HEAD] = head + 1


class _Job:
    __slots__ = ("step", "seconds", "seq", "flag")

    def __init__(self, step: int, seq: int, flag: tuple):
        self.step, self.seq, self.flag = step, seq, flag
        self.seconds = float("nan")


class RingWorker:
    """Same interface as cpu_worker.CpuWorker (send_hidden, submit, collect, check, close, jobs),
    plus `src=(layer, expert, first row)` in submit: the worker reads the expert from `store`."""

    def __init__(self, shapes, max_tokens: int, store, device="cuda", threads: int | None = None):
        import numba
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.threads = max(1, min(threads or default_threads(), numba.config.NUMBA_NUM_THREADS))
        self.kernel, self.gpu_wait = "fused", "stream" if self.cuda else "host"
        T, H, E, F = max(1, max_tokens), shapes.H, shapes.E, shapes.F
        self.E, self.F, self.H = E, F, H
        pin = self.cuda
        self._xh = torch.empty((2, T, H), dtype=torch.bfloat16, pin_memory=pin)
        self._yh = torch.empty((2, E, T, H), dtype=torch.bfloat16, pin_memory=pin)
        self.ydev = torch.empty((E, T, H), dtype=torch.bfloat16, device=device)
        self.nflags = 2 + 2 * E            # 0, 1: hidden state of parity p; 2 + p * E + j: result (p, j)
        if self.cuda:
            from tracekit.live.stream_wait import StreamFlags

            self.sf = StreamFlags.open(self.nflags)
            if self.sf is None:
                raise RuntimeError("this GPU or driver cannot wait on host flags (cuStreamWaitValue32)")
            self.flags = self.sf.np
            self.d2h = torch.cuda.Stream()
        else:
            self.sf, self.d2h = None, None
            self.flags = np.zeros(self.nflags, dtype=np.int32)
        self._seq = [0] * self.nflags
        self.ring = np.zeros((RING, 10), dtype=np.int64)
        self.ctl = np.zeros(3, dtype=np.int64)
        self.secs = np.zeros(RING)
        self._W = tuple(t.view(torch.int16).numpy().view(np.uint16) for t in store.layers)
        self._part = np.zeros(self.threads * FUSED_MAX_TOKENS * H, dtype=np.float32)
        self._xf = np.zeros((FUSED_MAX_TOKENS, H), dtype=np.float32)
        self._ts = np.zeros(2, dtype=np.int64)
        self._u16 = (self._xh.view(torch.int16).numpy().view(np.uint16),
                     self._yh.view(torch.int16).numpy().view(np.uint16))
        self.jobs: list = []               # every collected job (seconds filled once it is done)
        self._open: list = []              # submitted jobs whose seconds are not read yet
        self._err: BaseException | None = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._main, name="tracekit-cpu-ring", daemon=True)
        self._t.start()
        self._ready.wait()
        self.check()

    def _main(self) -> None:
        import numba

        try:
            numba.set_num_threads(self.threads)
            xh, yh = self._u16
            args = (self.flags, xh, yh, self._W, self._part, self._xf, self.secs, self._ts, self.F, self.H,
                    self.threads)
            _serve_ring(self.ring, np.array([0, 0, 1], dtype=np.int64), *args)   # compile now (stops at once)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by __init__
            self._err = exc
            self._ready.set()
            return
        self._ready.set()                 # running: a job the GPU waits for will be done
        _serve_ring(self.ring, self.ctl, *args)

    # ---- main thread -------------------------------------------------------------------------
    def _next(self, i: int) -> int:
        self._seq[i] += 1
        return self._seq[i]

    def send_hidden(self, xs, n: int, parity: int, after):
        """xs[:n] device->host into xh[parity] after event `after`; -> (host view, hidden-state token)."""
        xh = self._xh[parity][:n]
        v = self._next(parity)
        if not self.cuda:
            xh.copy_(xs[:n])
            self.flags[parity] = v
            return xh, (parity, v)
        import torch

        self.d2h.wait_event(after)
        with torch.cuda.stream(self.d2h):
            xh.copy_(xs[:n], non_blocking=True)
        self.sf.write(self.d2h, parity, v)
        return xh, (parity, v)

    def submit(self, ev, x, w, parity: int, j: int, step: int, src=None):
        """Queue the FFN of expert src = (layer, expert, first row) on the hidden state of token ev;
        its result goes to yh[parity, j]."""
        n = x.shape[0]
        ri = 2 + parity * self.E + j
        job = _Job(step, -1, (ri, self._next(ri)))
        if n > FUSED_MAX_TOKENS:
            self._run_here(job, ev, x, w, self._yh[parity][j][:n])
            return job
        while self.ctl[K_TAIL] - self.ctl[K_HEAD] >= RING:   # full: let the worker catch up
            self.check()
            time.sleep(0.0001)
        t = int(self.ctl[K_TAIL])
        job.seq = t
        self.ring[t % RING] = (src[0], src[1], src[2], n, parity, j, ev[0], ev[1], job.flag[0], job.flag[1])
        self.ctl[K_TAIL] = t + 1                             # published last
        self._open.append(job)
        return job

    def _run_here(self, job, ev, x, w, y) -> None:
        # a job too large for the fused kernel: empty the ring, then torch's matmuls in this thread
        self.drain()
        if self.cuda:
            while self.flags[ev[0]] < ev[1]:
                time.sleep(0.00005)
        t0 = time.perf_counter()
        host_ffn.torch_ffn(x, w, y)
        job.seconds = time.perf_counter() - t0
        self.flags[job.flag[0]] = job.flag[1]

    def drain(self) -> None:
        """Wait (host) until the worker has finished every queued job."""
        while self.ctl[K_HEAD] < self.ctl[K_TAIL]:
            self.check()
            time.sleep(0.00005)
        self._reap()

    def _reap(self) -> None:
        head = int(self.ctl[K_HEAD])
        while self._open and self._open[0].seq < head:
            job = self._open.pop(0)
            job.seconds = float(self.secs[job.seq % RING])

    def collect(self, job, parity: int, j: int, n: int, out) -> None:
        """out[:n] += the job's result on the current (compute) stream, which waits for the job's flag;
        without CUDA the host waits for it."""
        import torch

        if self.cuda:
            self.sf.wait(torch.cuda.current_stream(), *job.flag)
        else:
            while self.flags[job.flag[0]] < job.flag[1]:
                self.check()
                time.sleep(0.00005)
        self.check()
        self.jobs.append(job)
        add_host_result(self._yh[parity][j][:n], self.ydev, j, out, self.cuda)

    def check(self) -> None:
        """Raise the worker's error here, in the main thread; read the times of finished jobs."""
        if self._err is not None:
            err, self._err = self._err, None
            raise err
        self._reap()

    def close(self) -> None:
        if self._t.is_alive():
            self.ctl[K_STOP] = 1
            self._t.join(timeout=30)
