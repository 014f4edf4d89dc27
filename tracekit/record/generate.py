"""Batched greedy generation with left padding, step by step, so each forward pass is one trace step.

Step s = one forward pass. Prefill: every non-pad prompt token of the batch (phase 0).
Decode: one token per live sequence (phase 1); a sequence is dead once it has emitted EOS, and
rows of dead sequences and of left padding are dropped. `output_router_logits` is never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchResult:
    generated: list[list[int]]                 # per sequence: new token ids (EOS included if emitted)
    steps: int = 0                             # forward passes run
    rows: int = 0                              # token rows kept for the trace
    step_rows: list[int] = field(default_factory=list)


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids [B, S] int64, attention_mask [B, S] int64 (left padding)."""
    S = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), S), dtype=np.int64)
    for b, t in enumerate(token_lists):
        ids[b, S - len(t):] = t
        mask[b, S - len(t):] = 1
    return ids, mask


def cache_arg(model) -> str:
    """transformers >= 5.2x calls the KV-cache argument `cache`; earlier 5.x `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def input_device(model):
    return model.get_input_embeddings().weight.device


def generate_batch(model, token_lists: list[list[int]], seq_ids: list[int], max_new_tokens: int,
                   eos_ids: set[int], pad_id: int, hooks=None, first_step: int = 0,
                   on_step=None) -> BatchResult:
    """Greedy decode. With `hooks`, calls hooks.end_step(keep, rows) after every forward pass.

    on_step(new_tokens: int) is called each time new tokens are appended (progress bars).
    """
    import torch

    dev = input_device(model)
    B = len(token_lists)
    ids_np, mask_np = left_pad(token_lists, pad_id)
    S = ids_np.shape[1]
    pos_np = np.clip(np.cumsum(mask_np, axis=1) - 1, 0, None)          # [B, S]
    res = BatchResult(generated=[[] for _ in range(B)])
    alive = np.ones(B, dtype=bool)
    seq_arr = np.asarray(seq_ids, dtype=np.int32)
    ckw = cache_arg(model)
    with torch.inference_mode():
        attn = torch.as_tensor(mask_np, device=dev)
        # ---- prefill: keep the non-pad rows b*S + s
        keep = np.flatnonzero(mask_np.reshape(-1))
        rows = {"seq_id": np.repeat(seq_arr, S)[keep], "step": np.full(keep.size, first_step, np.int32),
                "phase": np.zeros(keep.size, np.int8), "position": pos_np.reshape(-1)[keep].astype(np.int32),
                "token_id": ids_np.reshape(-1)[keep].astype(np.int32)}
        out = model(input_ids=torch.as_tensor(ids_np, device=dev), attention_mask=attn,
                    position_ids=torch.as_tensor(pos_np, device=dev), use_cache=True, logits_to_keep=1)
        cache = out_cache(out)
        nxt = out.logits[:, -1, :].argmax(-1)
        _finish_step(res, hooks, keep, rows)
        last_pos = pos_np[:, -1].copy()
        for t in range(1, max_new_tokens + 1):
            toks = nxt.cpu().numpy()                                    # the one sync per step
            live = np.flatnonzero(alive)
            for b in live:
                res.generated[b].append(int(toks[b]))
                if int(toks[b]) in eos_ids:
                    alive[b] = False
            if on_step is not None:
                on_step(int(live.size))                                 # new tokens this step
            if t == max_new_tokens or not alive.any():
                break
            # ---- decode: feed the token just generated; dead rows get pad and are dropped
            feed = np.where(alive, toks, pad_id).astype(np.int64)
            last_pos = last_pos + 1
            keep = np.flatnonzero(alive)
            rows = {"seq_id": seq_arr[keep], "step": np.full(keep.size, first_step + res.steps, np.int32),
                    "phase": np.ones(keep.size, np.int8), "position": last_pos[keep].astype(np.int32),
                    "token_id": feed[keep].astype(np.int32)}
            attn = torch.cat([attn, attn.new_ones((B, 1))], dim=1)
            out = model(input_ids=torch.as_tensor(feed[:, None], device=dev), attention_mask=attn,
                        position_ids=torch.as_tensor(last_pos[:, None], device=dev), **{ckw: cache},
                        use_cache=True, logits_to_keep=1)
            cache = out_cache(out)
            nxt = out.logits[:, -1, :].argmax(-1)
            _finish_step(res, hooks, keep, rows)
    return res


def _finish_step(res: BatchResult, hooks, keep, rows) -> None:
    if hooks is not None:
        hooks.end_step(keep, rows)
    res.steps += 1
    res.rows += int(keep.size)
    res.step_rows.append(int(keep.size))
