"""CUDA streams and host threads signalling each other through int32 flags in pinned memory.

The hybrid executor's compute stream needs each CPU miss's result. Waiting for it on the host (the
main thread blocks until the worker is done, then enqueues the result's copy, the add and the next
layer) puts the main thread's wake-up and kernel launches on the critical path, between the end
of every CPU job and the next GPU work. With `cuStreamWaitValue32` (CUDA driver API, stream memory
operations) the main thread enqueues the wait and goes on; the GPU itself waits until the worker
writes the job's sequence number into a pinned int32 flag. The other way round, a stream writes a
flag when its earlier work is done (`cuStreamWriteValue32`), for a host thread to poll.

Flags: int32 [n] in pinned host memory, one per job slot, each only ever increased (a wait is for
flag >= value). `StreamFlags.open(n)` returns None where the driver, the device or the memory
cannot do this (the executor then waits on the host, as before).
"""

from __future__ import annotations

import ctypes

CU_STREAM_WAIT_VALUE_GEQ = 0x0
CU_STREAM_WRITE_VALUE_DEFAULT = 0x0     # with a memory barrier: the stream's earlier writes are visible first


def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fn = getattr(lib, "cuStreamWaitValue32_v2", None) or getattr(lib, "cuStreamWaitValue32", None)
    wr = getattr(lib, "cuStreamWriteValue32_v2", None) or getattr(lib, "cuStreamWriteValue32", None)
    dp = getattr(lib, "cuMemHostGetDevicePointer_v2", None)
    if fn is None or wr is None or dp is None:
        return None
    for f in (fn, wr):
        f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        f.restype = ctypes.c_int
    dp.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    dp.restype = ctypes.c_int
    return fn, wr, dp


class StreamFlags:
    """n pinned int32 flags that host threads set and CUDA streams wait on."""

    def __init__(self, flags, dev_ptr: int, wait_fn, write_fn):
        self.flags = flags                    # torch int32 [n], pinned
        self.np = flags.numpy()               # host view: host threads read and write here
        self._dev = dev_ptr
        self._wait = wait_fn
        self._write = write_fn

    @classmethod
    def open(cls, n: int):
        import torch

        drv = _driver()
        if drv is None:
            return None
        wait_fn, write_fn, dev_ptr_fn = drv
        flags = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        ptr = ctypes.c_uint64(0)
        if dev_ptr_fn(ctypes.byref(ptr), ctypes.c_void_p(flags.data_ptr()), 0) != 0:
            return None
        sf = cls(flags, ptr.value, wait_fn, write_fn)
        # self-test on a side stream: the flag is already 1, so the wait passes at once; then the
        # stream writes 2
        sf.set(0, 1)
        s = torch.cuda.Stream()
        try:
            sf.wait(s, 0, 1)
            sf.write(s, 0, 2)
        except RuntimeError:
            return None
        s.synchronize()
        if int(sf.np[0]) != 2:
            return None
        sf.set(0, 0)
        return sf

    def set(self, i: int, value: int) -> None:
        """Host: flag i = value (after everything this thread wrote before, on x86's store order)."""
        self.np[i] = value

    def wait(self, stream, i: int, value: int) -> None:
        """Enqueue on `stream` (torch.cuda.Stream): wait until flag i >= value."""
        r = self._wait(ctypes.c_void_p(stream.cuda_stream), self._dev + 4 * i, value, CU_STREAM_WAIT_VALUE_GEQ)
        if r != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {r}")

    def write(self, stream, i: int, value: int) -> None:
        """Enqueue on `stream`: flag i = value, once the stream's earlier work is done."""
        r = self._write(ctypes.c_void_p(stream.cuda_stream), self._dev + 4 * i, value,
                        CU_STREAM_WRITE_VALUE_DEFAULT)
        if r != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {r}")
