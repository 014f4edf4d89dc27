"""Pinned host store of expert weights: one flat bf16 tensor per layer, [E, numel] (numel per expert).

Allocate with plain malloc (torch.empty), fill cheaply (one random expert replicated by memcpy),
then pin the whole range with cudaHostRegister (much faster than pinning by allocation).
A request larger than the host's available RAM is refused before anything is allocated.
"""

from __future__ import annotations

import os

from tracekit.errors import UserError

GB = 1e9


def host_ram_available() -> int:
    """Bytes of MemAvailable from /proc/meminfo (os.sysconf fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def layers_that_fit(layer_bytes: int, want: int, headroom: float = 0.85, avail: int | None = None) -> int:
    avail = host_ram_available() if avail is None else avail
    return max(0, min(want, int(avail * headroom // max(1, layer_bytes))))


def check_fits(nbytes: int, what: str, headroom: float = 0.85, avail: int | None = None) -> None:
    avail = host_ram_available() if avail is None else avail
    if nbytes > avail * headroom:
        raise UserError(f"{what} needs {nbytes / GB:.1f} GB of pinned host memory but only "
                        f"{avail / GB:.1f} GB is available ({headroom:.0%} usable = {avail * headroom / GB:.1f} GB); "
                        f"use fewer layers (--layers)")


class ExpertStore:
    """layers[l]: [E, numel] (bf16 unless `dtype`) on the host, pinned (cudaHostRegister) when `pin`.

    fill: "random" (one random expert replicated) or "none" (the caller copies real weights in).
    """

    def __init__(self, L: int, E: int, numel: int, *, pin: bool, fill: str = "random", seed: int = 0,
                 check: bool = True, dtype=None):
        import torch

        dtype = dtype or torch.bfloat16
        esize = torch.empty((), dtype=dtype).element_size()
        self.L, self.E, self.numel = L, E, numel
        self.nbytes = L * E * numel * esize
        if check:
            check_fits(self.nbytes, f"the expert store ({L} layers x {E} experts x {numel * esize / 1e6:.0f} MB)")
        self.layers: list = []
        self._registered: list = []
        self.pinned = False
        try:
            src = None
            if fill == "random":
                g = torch.Generator().manual_seed(seed)
                # one expert of random values (std 0.02), replicated by memcpy: values do not change timings
                src = (torch.randn(numel, generator=g, dtype=torch.float32) * 0.02).to(dtype)
            for _ in range(L):
                t = torch.empty((E, numel), dtype=dtype)
                if src is not None:
                    for e in range(E):
                        t[e].copy_(src)
                self.layers.append(t)
            if pin:
                self._pin_all()
        except BaseException:
            self.free()
            raise

    def _pin_all(self) -> None:
        import torch

        cudart = torch.cuda.cudart()
        for t in self.layers:
            err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
            code = int(err.value) if hasattr(err, "value") else int(err)
            if code != 0:
                raise UserError(f"cudaHostRegister failed (error {code}) for {t.numel() * 2 / GB:.1f} GB")
            self._registered.append(t)
        self.pinned = True

    def free(self) -> None:
        """Unregister and drop every layer (safe to call twice, and on Ctrl-C)."""
        if self._registered:
            import torch

            cudart = torch.cuda.cudart()
            for t in self._registered:
                try:
                    cudart.cudaHostUnregister(t.data_ptr())
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        self._registered = []
        self.layers = []
        self.pinned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
