"""Expert FFN math on the live layout, and the non-expert (attention) stand-in.

Live layout of one expert: w [F, 3, H] bf16 with w[f, 0] = gate row f, w[f, 1] = up row f,
w[f, 2] = down column f (down_proj[:, f]). Any row range f0:f1 is one contiguous block of
(f1 - f0) * 3 * H elements, so a chunk of the copy is exactly a chunk of the FFN's intermediate dim:
    y[n, H] += (silu(x @ gate[f0:f1].T) * (x @ up[f0:f1].T)) @ down[:, f0:f1].T
and the full FFN is the sum over chunks (Mixtral's expert: w2(silu(w1 x) * w3 x)).
"""

from __future__ import annotations


def chunk_rows(F: int, H: int, chunk_mb: float, bytes_per: int = 2) -> list[tuple[int, int]]:
    """Row ranges of the intermediate dim, each about chunk_mb MB (chunk_mb <= 0: one chunk)."""
    if chunk_mb <= 0:
        return [(0, F)]
    rows = max(1, int(round(chunk_mb * 1e6 / (3 * H * bytes_per))))
    out = []
    f = 0
    while f < F:
        out.append((f, min(F, f + rows)))
        f += rows
    if len(out) > 1 and out[-1][1] - out[-1][0] < rows // 2:   # fold a small tail into the previous chunk
        out[-2] = (out[-2][0], out[-1][1])
        out.pop()
    return out


def ffn_rows(x, w, out, f0: int, f1: int) -> None:
    """out[n, H] += FFN of rows f0:f1 of expert w [F, 3, H] applied to x [n, H] (all bf16)."""
    import torch
    import torch.nn.functional as Fn

    g = torch.mm(x, w[f0:f1, 0].t())          # [n, fc]
    u = torch.mm(x, w[f0:f1, 1].t())          # [n, fc]
    h = Fn.silu(g).mul_(u)                    # [n, fc]
    out.addmm_(h, w[f0:f1, 2])                # [n, H] += [n, fc] @ [fc, H]


class NonExpert:
    """Per-layer attention stand-in with the model's shapes: QKV and O projections and the router.

    wqkv [L, H, H + 2 * kvdim], wo [L, H, H], wr [L, H, E]; no KV-cache attention (short contexts).
    """

    def __init__(self, L: int, H: int, E: int, kvdim: int, device, seed: int = 1):
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        mk = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)  # noqa: E731
        self.H = H
        self.wqkv = [mk(H, H + 2 * kvdim) for _ in range(L)]
        self.wo = [mk(H, H) for _ in range(L)]
        self.wr = [mk(H, E) for _ in range(L)]

    def __call__(self, l: int, x):
        import torch

        qkv = torch.mm(x, self.wqkv[l])                 # [n, H + 2 kv]
        o = torch.mm(qkv[:, :self.H], self.wo[l])       # [n, H]
        r = torch.mm(o, self.wr[l])                     # [n, E] router logits
        return o, r
