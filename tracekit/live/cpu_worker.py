"""Hybrid miss handling in live: the host-CPU expert worker and replay's clock kept in lockstep.

HybridClock: the cost-model timeline of tracekit.replay.cost (new_timeline, attn_time, layer_time,
enqueue_copies), advanced with the SAME calls, in the SAME order, as replay's `run` loop. Its
engine_free / cpu_free estimates feed the SAME `serve_hybrid` (tracekit.replay.jit) with the SAME
profile, so live sends exactly the misses to the CPU that replay sends: the counters (hits,
transfers, cpu_misses) are equal by construction; only the measured times differ.

CpuWorker: one Python thread that computes CPU misses on the pinned host experts (bf16) with
tracekit.live.host_ffn (the fused numba kernel for a few tokens, torch's matmuls above), its numba
and torch threads set inside it (default: usable cores minus one, the main thread keeps one).
Both release the GIL, so the main thread keeps enqueueing GPU work meanwhile. Per job:
wait on the event of the hidden state's device->host copy (in this thread: the main thread never
synchronizes for it), FFN on the host, signal done. The main thread waits for a job only where the
layer needs the result, then copies it host->device on the compute stream and adds it.
"""

from __future__ import annotations

import os
import queue
import threading
import time


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:          # pragma: no cover - non-Linux
        n = os.cpu_count() or 2
    return max(1, n - 1)


class HybridClock:
    """Replay's timeline for one live run (see module docstring). Use serve() in place of the
    controller's serve and after_copies() after every `after`."""

    def __init__(self, spec, plan, capacity: int, profile, expert_bytes: float, ctl, split: bool = False):
        from tracekit.replay import controller as ctlmod
        from tracekit.replay import cost
        from tracekit.replay.jit import engine_module

        self._cost = cost
        self._serve = engine_module(spec).serve_hybrid
        self.tl = cost.new_timeline(plan.L, plan.E, capacity)
        self.sc, self.ffn_tok, self.ffn_s = profile.vectors(expert_bytes, hybrid=True)
        self.ctl = ctlmod.set_hybrid(ctl, profile, expert_bytes, split)
        self.cpu_tok, self.cpu_s = self.ctl[12], self.ctl[13]
        self.cursor = 0.0

    def serve(self, st, pos, l, req_e, now0, req_next, decode, act, req_ntok, ntok) -> int:
        c = self._cost
        acc = self.tl[2]
        t_route = self.cursor + c.attn_time(self.sc, self.tl, ntok)
        n = self._serve(self.ctl, st, pos, l, req_e, now0, req_next, decode, act, req_ntok, t_route,
                        acc[c.A_ENGINE], acc[c.A_CPU])
        self.cursor = c.layer_time(self.sc, self.ffn_tok, self.ffn_s, self.cpu_tok, self.cpu_s, self.tl, act, n,
                                   req_ntok, t_route)
        return n

    def after_copies(self, act, m: int) -> None:
        if m:
            self._cost.enqueue_copies(self.sc, self.tl, act, m, self.cursor)

    @property
    def predicted_cpu_busy_s(self) -> float:
        return float(self.tl[2][self._cost.A_CPU_BUSY])


def add_host_result(yh, ydev, j: int, out, cuda: bool) -> None:
    """out[:n] += yh (host [n, H]) on the current stream; on CUDA through ydev[j] (device scratch)."""
    n = yh.shape[0]
    if not cuda:
        out[:n].add_(yh)
        return
    yd = ydev[j, :n]
    yd.copy_(yh, non_blocking=True)
    out[:n].add_(yd)


class _Job:
    __slots__ = ("done", "step", "seconds")

    def __init__(self, step: int):
        self.done = threading.Event()
        self.step = step
        self.seconds = 0.0


class CpuWorker:
    """Host FFNs for CPU misses. `xh` [T, H] and `yh` [E, T, H] per layer parity, pinned when on CUDA."""

    def __init__(self, shapes, max_tokens: int, device="cuda", threads: int | None = None,
                 kernel: str = "fused"):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.threads = threads or default_threads()
        self.kernel, self.H = kernel, shapes.H
        T, H, E = max(1, max_tokens), shapes.H, shapes.E
        pin = self.cuda
        self.xh = [torch.empty((T, H), dtype=torch.bfloat16, pin_memory=pin) for _ in range(2)]
        self.yh = [torch.empty((E, T, H), dtype=torch.bfloat16, pin_memory=pin) for _ in range(2)]
        self.ydev = torch.empty((E, T, H), dtype=torch.bfloat16, device=device)
        self.d2h = torch.cuda.Stream() if self.cuda else None
        self.jobs: list = []            # every finished _Job (for timing)
        self.gpu_wait = "host"          # the main thread waits for each job (ring_worker: the GPU does)
        self._err: BaseException | None = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._main, name="tracekit-cpu-ffn", daemon=True)
        self._t.start()
        self._ready.wait()      # the kernel is compiled (or loaded from numba's cache) before any job
        if self._err is not None:
            err = self._err
            self.close()
            raise err

    def _main(self) -> None:
        import torch

        from tracekit.live.host_ffn import HostFFN

        torch.set_num_threads(self.threads)
        try:
            ffn = HostFFN(self.H, self.threads, self.kernel)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by __init__
            self._err, ffn = exc, None
        self._ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            job, ev, x, w, y = item
            try:
                if ev is not None:
                    ev.synchronize()            # the hidden state's D2H (this thread only)
                t0 = time.perf_counter()
                ffn(x, w, y)
                job.seconds = time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by wait()
                self._err = exc
            finally:
                job.done.set()

    def send_hidden(self, xs, n: int, parity: int, after):
        """Copy xs[:n] device->host after event `after` (on the d2h stream). -> (host view, event)."""
        xh = self.xh[parity][:n]
        if not self.cuda:
            xh.copy_(xs[:n])
            return xh, None
        import torch

        self.d2h.wait_event(after)
        with torch.cuda.stream(self.d2h):
            xh.copy_(xs[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.d2h)
        return xh, ev

    def submit(self, ev, x, w, parity: int, j: int, step: int, src=None) -> _Job:
        """Host FFN of expert w (host [F, 3, H]) on x (host [n, H]) into yh[parity][j]. (src: where w
        comes from, for ring_worker.RingWorker's interface; not needed here.)"""
        job = _Job(step)
        self._q.put((job, ev, x, w, self.yh[parity][j][: x.shape[0]]))
        return job

    def collect(self, job: _Job, parity: int, j: int, n: int, out) -> None:
        """Wait for the job (host), then out[:n] += its result, on the current (compute) stream."""
        job.done.wait()
        self.check()
        self.jobs.append(job)
        add_host_result(self.yh[parity][j][:n], self.ydev, j, out, self.cuda)

    def check(self) -> None:
        """Raise a failed job's error here, in the main thread."""
        if self._err is not None:
            err, self._err = self._err, None
            raise err

    def close(self) -> None:
        if self._t.is_alive():
            self._q.put(None)
            self._t.join(timeout=30)
