"""bf16 token identity of model-driven hybrid (issue 5): what differs from the resident model, and by how much.

  python3 bench/gpu_hybrid_identity.py --out $OUT [--layers 4] [--tokens 32] [--prompts 2]

On a random-weight, Mixtral-8x7B-shaped bf16 model on the GPU (weights never downloaded):
1. free-running greedy output of the resident model with each of transformers' experts kernels
   (eager, batched_mm, grouped_mm), of transfer-only offloading and of --hybrid (lru, C=2): the first
   generated token that differs from eager's, per prompt.
2. teacher-forced: feeding eager's greedy tokens, the argmax at every step of each variant against
   eager's, and eager's top-1 minus top-2 logit gap (in units of the bf16 spacing at the top logit) at
   each step where they disagree, beside the distribution of that gap over all steps.
3. one expert and one token, host bf16 (the hybrid's CPU path) against the GPU: differing elements.
Writes OUT/hybrid_identity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_live import device_card, log  # noqa: E402  (same folder: the script's own sys.path entry)


def bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def greedy(model, ids, n):
    import torch

    with torch.no_grad():
        o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
    return o[0, ids.shape[1]:].tolist()


def forced(model, ids, ref):
    """Feed ref token by token (KV cache): -> (argmax per step, top-1 - top-2 gap in bf16 ulps per step)."""
    import torch

    am, gaps = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for t in range(len(ref)):
            top = torch.topk(out.logits[0, -1].float(), 2)
            v0, v1 = float(top.values[0]), float(top.values[1])
            am.append(int(top.indices[0]))
            gaps.append((v0 - v1) / bf16_ulp(v0))
            nxt = torch.tensor([[ref[t]]], device=ids.device)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return am, gaps


def restore(model, runner) -> None:
    """Put the experts back on the device from the runner's host store (so the model can run again)."""
    import torch

    from tracekit.live.backend import experts_modules, set_impl

    gu = runner.shape_gu[0] * runner.shape_gu[1]
    dev = runner.slots.device
    for l, m in enumerate(experts_modules(model)):
        w = runner.store.layers[l]
        m.gate_up_proj = torch.nn.Parameter(w[:, :gu].reshape(runner.E, *runner.shape_gu).to(dev), requires_grad=False)
        m.down_proj = torch.nn.Parameter(w[:, gu:].reshape(runner.E, *runner.shape_dn).to(dev), requires_grad=False)
    runner.close()
    runner.slots = runner.gu = runner.dn = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    set_impl(model, "eager")


def one_expert(model) -> dict:
    """Expert 0 of layer 0 on one random token: host bf16 against GPU bf16 (eager math)."""
    import torch
    import torch.nn.functional as Fn

    from tracekit.live.backend import experts_modules

    m = experts_modules(model)[0]
    gu, dn = m.gate_up_proj[0], m.down_proj[0]
    x = torch.randn(1, gu.shape[1], generator=torch.Generator().manual_seed(0)).to(gu.dtype)
    outs = []
    for dev in (gu.device, torch.device("cpu")):
        with torch.no_grad():
            g, u = Fn.linear(x.to(dev), gu.to(dev)).chunk(2, dim=-1)
            outs.append(Fn.linear(m.act_fn(g) * u, dn.to(dev)).float().cpu())
    d = (outs[0] - outs[1]).abs()
    return {"elements": int(d.numel()), "differing": int((d > 0).sum()), "max_abs_diff": float(d.max()),
            "max_abs": float(outs[0].abs().max())}


def main() -> int:
    import numpy as np
    import torch

    from tracekit import policies as P
    from tracekit.live.backend import OffloadRunner, set_impl
    from tracekit.live.compare import load_with_extras
    from tracekit.live.session import first_divergence
    from tracekit.record.models import load_model
    from tracekit.record.prompts import load_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=2)
    ap.add_argument("--profile", default="h100-calibrated")
    ap.add_argument("--model", default="mixtral", help="tiny-mixtral with --device cpu: a smoke test")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    texts = load_prompts(None)[0][: a.prompts]
    ld = load_model(a.model, device=a.device, random_weights=True, num_layers=a.layers)
    model, tok = ld.model, ld.tokenizer
    ids = [torch.tensor([tok.encode(t)], device=a.device) for t in texts]
    res = {"card": device_card() if a.device == "cuda" else "cpu", "layers": a.layers, "tokens": a.tokens, "prompts": len(texts),
           "capacity": a.capacity, "profile": a.profile, "one_expert": one_expert(model), "variants": {}}
    log(f"one expert host vs GPU: {res['one_expert']}")
    set_impl(model, "eager")
    ref = [greedy(model, x, a.tokens) for x in ids]
    ref_forced = [forced(model, x, r) for x, r in zip(ids, ref)]
    gaps = np.concatenate([np.array(g) for _, g in ref_forced])
    res["eager_forced_equals_generate"] = [am == r for (am, _), r in zip(ref_forced, ref)]
    res["eager_gap_ulps_quantiles"] = {q: float(np.quantile(gaps, q)) for q in (0.05, 0.1, 0.25, 0.5)}
    res["eager_steps_gap_le_1ulp"] = int((gaps <= 1.0).sum())
    res["eager_steps"] = int(gaps.size)

    def variant(name):
        out = [greedy(model, x, a.tokens) for x in ids]
        fo = [forced(model, x, r)[0] for x, r in zip(ids, ref)]
        dis = [(p, t) for p, (f, (am, _)) in enumerate(zip(fo, ref_forced)) for t in range(len(f)) if f[t] != am[t]]
        v = {"free_first_divergence": [first_divergence(o, r) for o, r in zip(out, ref)],
             "forced_disagreements": len(dis),
             "forced_gap_ulps_at_disagreements": [ref_forced[p][1][t] for p, t in dis]}
        res["variants"][name] = v
        log(f"{name}: {v}")
        with open(os.path.join(a.out, "hybrid_identity.json"), "w") as f:
            json.dump(res, f, indent=1)

    for impl in ("batched_mm", "grouped_mm"):
        try:
            set_impl(model, impl)
            variant(f"resident {impl}")
        except Exception as exc:        # a kernel this torch/GPU lacks: say so, keep going
            res["variants"][f"resident {impl}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    set_impl(model, "eager")
    prof = load_with_extras(a.profile)[0]
    for name, hy in (("transfer-only lru", None), ("hybrid lru", prof)):
        runner = OffloadRunner(model, P.get("lru"), a.capacity, 2, 16.0, hybrid=hy)
        variant(name)
        res["variants"][name]["counters"] = runner.counters()
        restore(model, runner)
    with open(os.path.join(a.out, "hybrid_identity.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
