"""Calibration of the hybrid path: host-CPU expert FFN time, activation round trip, and contention.

  cpu_ffn_ms        one expert's FFN on the host (bf16, live layout, pinned store weights, the CPU
                    worker's kernel (tracekit.live.host_ffn) with `threads` threads, in a worker
                    thread as live uses them) for 1..B tokens; cpu_kernel, cpu_threads: which
  act_copy_us       half of a hidden-state round trip (1 token): compute-stream event -> D2H on its
                    own stream -> host waits -> H2D on the compute stream -> done, while a large
                    expert copy is in flight (as in live), host clock
  contention_copy   expert-copy time while the CPU computes experts / alone (>= 1)
  contention_cpu    CPU FFN time (1 token) while expert copies run / alone (>= 1)
"""

from __future__ import annotations

import os
import statistics
import threading
import time


def calibrate_cpu(shapes, batch=(1, 2, 4, 8, 16, 32, 64, 128), threads: int | None = None, reps: int = 5,
                  log=print, max_ms: float = 400.0, kernel: str = "fused") -> dict:
    import torch

    from tracekit.live.cpu_worker import default_threads
    from tracekit.live.host_ffn import HostFFN
    from tracekit.live.store import ExpertStore

    threads = threads or default_threads()
    dev = torch.device("cuda")
    E3 = (shapes.F, 3, shapes.H)
    store = ExpertStore(1, 6, shapes.numel, pin=True)     # 0,1: copy sources; 2..5: CPU experts
    out: dict = {}
    try:
        src = store.layers[0]
        W = [src[e].view(E3) for e in range(2, 6)]
        x = torch.randn(max(batch), shapes.H).to(torch.bfloat16)
        y = torch.empty(max(batch), shapes.H, dtype=torch.bfloat16)
        k = [0]
        ffn = HostFFN(shapes.H, threads, kernel)

        def cpu_once(n=1):
            t0 = time.perf_counter()
            ffn(x[:n], W[k[0] % 4], y[:n])
            k[0] += 1
            return (time.perf_counter() - t0) * 1e3

        # CPU FFN table, in a worker thread with `threads` torch threads (as live runs it)
        res: dict = {}

        def table():
            torch.set_num_threads(threads)
            for _ in range(3):
                cpu_once(1)
            for n in batch:
                ts = [cpu_once(n) for _ in range(reps)]
                res[str(n)] = round(statistics.median(ts), 3)
                if res[str(n)] > max_ms:
                    break
            res["_alone"] = statistics.median([cpu_once(1) for _ in range(2 * reps)])

        th = threading.Thread(target=table)
        th.start()
        th.join()
        alone_cpu = res.pop("_alone")
        log(f"CPU FFN ms per expert ({threads} threads, {kernel} kernel): " +
            ", ".join(f"{n}: {v}" for n, v in res.items()))
        out["cpu_ffn_ms"] = res
        out["cpu_threads"] = threads
        out["cpu_kernel"] = kernel
        out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")

        dst = torch.empty(shapes.numel, dtype=torch.bfloat16, device=dev)
        cs = torch.cuda.Stream()

        def copies(m):
            evs = []
            with torch.cuda.stream(cs):
                for i in range(m):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(cs)
                    dst.copy_(src[i % 2], non_blocking=True)
                    b.record(cs)
                    evs.append((a, b))
            return evs

        def med_copy(evs):
            cs.synchronize()
            return statistics.median(a.elapsed_time(b) for a, b in evs)

        med_copy(copies(2))
        copy_alone = med_copy(copies(reps))
        # copies while the CPU computes experts (a thread loops FFNs until the copies are done)
        stop = threading.Event()

        def spin():
            torch.set_num_threads(threads)
            while not stop.is_set():
                cpu_once(1)

        th = threading.Thread(target=spin)
        th.start()
        time.sleep(0.05)
        copy_busy = med_copy(copies(reps))
        stop.set()
        th.join()
        # CPU FFN while copies run (enqueue more copies than the FFNs take)
        cpu_busy: list = []

        def under_copies():
            torch.set_num_threads(threads)
            evs = copies(max(8, int(reps * alone_cpu * 1.5 / copy_alone) + 4))
            time.sleep(0.003)
            for _ in range(reps):
                cpu_busy.append(cpu_once(1))
            med_copy(evs)

        th = threading.Thread(target=under_copies)
        th.start()
        th.join()
        cpu_cont = statistics.median(cpu_busy)
        out["contention_copy"] = round(max(1.0, copy_busy / copy_alone), 3)
        out["contention_cpu"] = round(max(1.0, cpu_cont / alone_cpu), 3)
        out["contention_raw"] = {"copy_ms_alone": round(copy_alone, 3), "copy_ms_cpu_busy": round(copy_busy, 3),
                                 "cpu_ffn_ms_alone": round(alone_cpu, 3), "cpu_ffn_ms_copies_busy": round(cpu_cont, 3)}
        log(f"contention: copy {copy_alone:.2f} -> {copy_busy:.2f} ms while CPU computes; CPU FFN "
            f"{alone_cpu:.2f} -> {cpu_cont:.2f} ms while copies run")

        # activation round trip, 1 token, with an expert copy in flight
        xd = torch.randn(1, shapes.H, device=dev).to(torch.bfloat16)
        xh = torch.empty(1, shapes.H, dtype=torch.bfloat16, pin_memory=True)
        yd = torch.empty_like(xd)
        d2h = torch.cuda.Stream()
        comp = torch.cuda.current_stream()

        def round_trip():
            t0 = time.perf_counter()
            ev = torch.cuda.Event()
            ev.record(comp)
            d2h.wait_event(ev)
            with torch.cuda.stream(d2h):
                xh.copy_(xd, non_blocking=True)
                ex = torch.cuda.Event()
                ex.record(d2h)
            ex.synchronize()
            yd.copy_(xh, non_blocking=True)
            comp.synchronize()
            return (time.perf_counter() - t0) * 1e6

        for _ in range(5):
            round_trip()
        idle = statistics.median(round_trip() for _ in range(20))
        evs = copies(4)
        busy = statistics.median(round_trip() for _ in range(20))
        med_copy(evs)
        out["act_copy_us"] = round(busy / 2, 2)
        out["act_round_trip_us"] = {"idle": round(idle, 2), "expert_copy_in_flight": round(busy, 2)}
        log(f"activation round trip (1 token): {idle:.1f} us idle, {busy:.1f} us with a copy in flight")
        dst = None
    finally:
        store.free()
    torch.cuda.empty_cache()
    return out
