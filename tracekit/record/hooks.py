"""Routing hooks: a forward hook on every `mlp.gate` and a forward pre-hook on every `mlp`.

Hooks only keep references to device tensors (no sync, no copy). `end_step` selects the rows to keep
on the device; `collect` moves everything pending to the CPU in one go per array.
"""

from __future__ import annotations

import time

import numpy as np


def parse_hidden(spec: str) -> tuple[str, int | None]:
    """'none' | 'full' | 'proj:N' -> (kind, N)."""
    from tracekit.errors import UserError

    if spec in ("none", "full"):
        return spec, None
    if spec.startswith("proj:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = 0
        if n > 0:
            return spec, n
    raise UserError(f"--hidden {spec!r}: expected none, full or proj:N (N > 0)")


def projection_matrix(hidden_size: int, n: int, seed: int):
    """The `proj:N` matrix P [H, N] float32 (torch, CPU): randn(H, N, seed) / sqrt(N); hidden_proj = h @ P."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, n, generator=g) / float(np.sqrt(n))


class RoutingHooks:
    """Capture per layer: router logits [R,E], top-k weights [R,K], top-k ids [R,K], hidden [R,D]."""

    def __init__(self, model, adapter, hidden: str = "none", proj_seed: int = 0, with_logits: bool = True):
        self.adapter = adapter
        self.layers = adapter.moe_layers(model)           # [(model layer id, mlp)]
        self.L = len(self.layers)
        cfg = model.config
        self.E, self.K, self.H = adapter.num_experts(cfg), adapter.top_k(cfg), int(cfg.hidden_size)
        self.renorm = adapter.renormalize(cfg)
        self.hidden_kind, proj_dim = parse_hidden(hidden)
        if proj_dim and proj_dim >= self.H:
            from tracekit.errors import UserError

            raise UserError(f"--hidden proj:{proj_dim} is not smaller than the model's hidden size {self.H}; "
                            "use --hidden full")
        self.D = self.H if self.hidden_kind == "full" else proj_dim
        self.proj_seed = proj_seed if proj_dim else None
        self.proj = None
        if proj_dim:  # [H, N] float32, seeded, scaled so that norms are roughly preserved
            self.proj = projection_matrix(self.H, proj_dim, proj_seed)
        self.with_logits = with_logits
        self.hook_s = 0.0          # time inside hook callbacks + end_step + collect
        self._handles = []
        self._cur: dict[str, list] = {}
        self._pending: list[dict] = []
        self._reset_cur()

    # ---- registration -------------------------------------------------------------------------
    def attach(self) -> "RoutingHooks":
        for li, (_, mlp) in enumerate(self.layers):
            self._handles.append(mlp.gate.register_forward_hook(self._gate_hook(li)))
            if self.hidden_kind != "none":
                self._handles.append(mlp.register_forward_pre_hook(self._pre_hook(li), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def router_weights(self) -> np.ndarray:
        """[L, E, H] float32."""
        return np.stack([mlp.gate.weight.detach().float().cpu().numpy() for _, mlp in self.layers])

    def _reset_cur(self) -> None:
        self._cur = {"logits": [None] * self.L, "weights": [None] * self.L, "experts": [None] * self.L,
                     "hidden": [None] * self.L}

    def _gate_hook(self, li: int):
        def hook(module, args, out):
            t0 = time.perf_counter()
            if isinstance(out, tuple) and len(out) >= 3:
                logits, w, idx = out[0], out[1], out[2]
            else:  # older layouts: the gate returns logits only
                logits = out
                probs = logits.float().softmax(-1)
                w, idx = probs.topk(self.K, dim=-1)
                if self.renorm:
                    w = w / w.sum(-1, keepdim=True)
            c = self._cur
            c["logits"][li], c["weights"][li], c["experts"][li] = logits.detach(), w.detach(), idx.detach()
            self.hook_s += time.perf_counter() - t0
        return hook

    def _pre_hook(self, li: int):
        def hook(module, args, kwargs):
            t0 = time.perf_counter()
            hs = args[0] if args else kwargs["hidden_states"]
            hs = hs.detach().reshape(-1, self.H)           # [R, H]
            if self.proj is not None:
                if self.proj.device != hs.device:
                    self.proj = self.proj.to(hs.device)
                hs = hs.float() @ self.proj               # [R, N]
            self._cur["hidden"][li] = hs
            self.hook_s += time.perf_counter() - t0
        return hook

    # ---- per step -----------------------------------------------------------------------------
    def end_step(self, keep: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """keep: [R'] row ids (into the flattened batch) to keep; rows: base columns [R'] on CPU.

        No GPU work here: the step's per-layer tensors are only referenced; collect() gathers many
        steps at once (one concatenation per layer, one device-to-host copy per column).
        """
        t0 = time.perf_counter()
        c = self._cur
        if any(x is None for x in c["experts"]):
            raise RuntimeError("a MoE layer did not run its router in this step")
        names = ["experts", "weights"] + (["logits"] if self.with_logits else [])
        names += ["hidden"] if self.hidden_kind != "none" else []
        self._pending.append({"rows": rows, "keep": np.asarray(keep, dtype=np.int64),
                              "R": int(c["experts"][0].shape[0]), "dev": {n: c[n] for n in names}})
        self._reset_cur()
        self.hook_s += time.perf_counter() - t0

    def collect(self) -> dict[str, np.ndarray] | None:
        """Everything pending -> numpy: base [T]; experts/weights [T,L,K]; logits [T,L,E]; hidden [T,L,D]."""
        import torch

        if not self._pending:
            return None
        t0 = time.perf_counter()
        pend = self._pending
        out = {k: np.concatenate([p["rows"][k] for p in pend]) for k in pend[0]["rows"]}
        offsets = np.cumsum([0] + [p["R"] for p in pend[:-1]])
        keep = np.concatenate([p["keep"] + off for p, off in zip(pend, offsets)])    # [T] into all rows
        every_row = keep.size == offsets[-1] + pend[-1]["R"] and bool((keep == np.arange(keep.size)).all())
        dtypes = {"experts": torch.int16, "weights": torch.float32, "logits": torch.float32,
                  "hidden": torch.float16}
        for n in pend[0]["dev"]:
            per_layer = [torch.cat([p["dev"][n][li] for p in pend]) for li in range(self.L)]   # L x [R, *]
            dev_rows = torch.stack(per_layer, dim=1).to(dtypes[n])                           # [R, L, *]
            host = dev_rows.cpu().numpy()
            out[n] = host if every_row else host[keep]                                     # no copy in decode
        self._pending = []
        self.hook_s += time.perf_counter() - t0
        return out

    @property
    def pending_steps(self) -> int:
        return len(self._pending)
