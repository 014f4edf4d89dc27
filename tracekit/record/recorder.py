"""`record()`: load or build a model, generate with routing hooks, stream the trace to Parquet.

The Python API behind `tracekit record` (also used by the demo and the GPU benchmark).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from tracekit.errors import UserError


def versions() -> dict:
    import pyarrow
    import torch
    import transformers

    import tracekit

    return {"tracekit": tracekit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__, "python": platform.python_version()}


def eos_ids_of(loaded) -> set[int]:
    ids = set()
    for v in (getattr(loaded.tokenizer, "eos_token_id", None),
              getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def pad_id_of(loaded, eos: set[int]) -> int:
    pid = getattr(loaded.tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else (min(eos) if eos else 0)


def record(model: str = "tiny-mixtral", out: str | os.PathLike | None = None, *, prompts=None,
           max_new_tokens: int = 32, batch_size: int = 4, dtype: str = "auto", device: str = "cpu",
           device_map: str | None = None, hidden: str = "none", random_weights: bool = False,
           num_layers: int | None = None, force: bool = False, progress: bool = False, seed: int = 1234,
           flush_steps: int = 16, eos_token_id: int | list[int] | None = None, loaded=None,
           hooks: bool = True, threads: int | None = None, background: bool | None = None) -> dict:
    """Record a routing trace to `out`; returns a summary dict.

    prompts: None (built-in set), a txt/jsonl path, or a list of strings.
    loaded: an already loaded `tracekit.record.models.Loaded` (skips model loading).
    hooks=False runs the same generation without hooks or writing (baseline timing); out is ignored.
    threads: CPU threads for torch during generation; None = 1 for tiny models on CPU (their ops are too
    small to split: 1 thread is ~6x faster on 2 cores), else torch's default.
    background: encode Parquet parts on a writer thread. None = only when hidden states are recorded:
    routing-only parts are small, and a writer thread competes with generation for the GIL.
    """
    from tracekit.outfiles import check_not_input
    from tracekit.record.adapters import adapter_for
    from tracekit.record.generate import generate_batch
    from tracekit.record.hooks import RoutingHooks, parse_hidden
    from tracekit.record.models import load_model
    from tracekit.record.prompts import load_prompts
    from tracekit.trace.native import TraceWriter, check_out_path

    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    parse_hidden(hidden)
    if isinstance(prompts, (list, tuple)):
        prompt_list, source = [str(p) for p in prompts], "python list"
    else:
        prompt_list, source = load_prompts(prompts)
    if hooks:
        if out is None:
            raise UserError("no output path given")
        if not isinstance(prompts, (list, tuple)):
            check_not_input(out, "--out", [prompts], "the prompts file")
        out = check_out_path(out, force)       # fail before loading a model
    t_load = time.perf_counter()
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype, random_weights=random_weights,
                            num_layers=num_layers, device_map=device_map, seed=seed)
    load_s = time.perf_counter() - t_load
    m, tok, info = loaded.model, loaded.tokenizer, loaded.info
    adapter = adapter_for(m.config)
    eos = eos_ids_of(loaded) if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    pad = pad_id_of(loaded, eos)
    token_lists = [list(tok(p, verbose=False)["input_ids"]) for p in prompt_list]  # we check length ourselves
    if any(len(t) == 0 for t in token_lists):
        raise UserError("a prompt tokenizes to zero tokens")
    ctx = getattr(m.config, "max_position_embeddings", None)
    for i, t in enumerate(token_lists):
        if ctx and len(t) + max_new_tokens > ctx:
            raise UserError(f"prompt {i + 1} ({source}) has {len(t)} tokens; with --max-new-tokens {max_new_tokens} "
                            f"that exceeds the model's context of {ctx} positions")

    rh = writer = None
    if hooks:
        rh = RoutingHooks(m, adapter, hidden=hidden, proj_seed=seed)
        meta = dict(info)
        meta.update({
            "num_layers": rh.L, "moe_layer_ids": [i for i, _ in rh.layers], "versions": versions(),
            "generation": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "decoding": "greedy",
                           "padding": "left", "eos_token_ids": sorted(eos), "pad_token_id": pad,
                           "prompt_format": "raw (no chat template)"},
            "prompt_source": source, "num_prompts": len(prompt_list), "prompts": prompt_list,
            "steps": "one step per forward pass: a prefill holds all prompt tokens of its batch, a decode "
                     "step one token per live sequence; globally increasing across batches",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        writer = TraceWriter(out, num_layers=rh.L, num_experts=rh.E, top_k=rh.K, meta=meta,
                             router=rh.router_weights(), hidden_kind=rh.hidden_kind, hidden_dim=rh.D,
                             hidden_proj_seed=rh.proj_seed, force=force,
                             background=rh.hidden_kind != "none" if background is None else background)
        rh.attach()

    stats = {"generated": 0, "write_s": 0.0}
    bar = _Bar(progress, total=len(prompt_list) * max_new_tokens)

    def drain():
        if rh is not None and rh.pending_steps:
            arrays = rh.collect()
            t0 = time.perf_counter()
            writer.append(arrays)
            writer.flush()  # one part file per drain: a killed run keeps everything drained so far
            stats["write_s"] += time.perf_counter() - t0

    def on_step(n_new: int):
        stats["generated"] += n_new
        bar.advance(n_new)
        if rh is not None and rh.pending_steps >= flush_steps:
            drain()

    generated: list[list[int]] = []
    steps = rows = 0
    sync = _synchronizer(m)
    old_threads = _set_threads(m, threads)
    t0 = time.perf_counter()
    try:
        with bar:
            for start in range(0, len(token_lists), batch_size):
                batch = token_lists[start:start + batch_size]
                res = generate_batch(m, batch, list(range(start, start + len(batch))), max_new_tokens, eos, pad,
                                     hooks=rh, first_step=steps, on_step=on_step)
                generated.extend(res.generated)
                steps += res.steps
                rows += res.rows
                drain()
        sync()
        gen_s = time.perf_counter() - t0
        if writer is not None:
            t1 = time.perf_counter()
            writer.update_meta(generated_tokens=stats["generated"], total_steps=steps,
                               generated=[tok.decode(g) for g in generated])
            writer.close()
            stats["write_s"] += time.perf_counter() - t1
    except BaseException:
        if writer is not None:
            try:
                drain()
            finally:
                writer.abort()
        raise
    finally:
        if rh is not None:
            rh.detach()
        if old_threads is not None:
            import torch

            torch.set_num_threads(old_threads)
    total_s = time.perf_counter() - t0
    return {
        "out": out if hooks else None, "model": info.get("model"), "rows": rows, "tokens": rows,
        "generated_tokens": stats["generated"], "sequences": len(prompt_list), "steps": steps,
        "layers": rh.L if rh else None, "seconds": total_s, "generate_s": gen_s, "load_s": load_s,
        "tokens_per_s": stats["generated"] / gen_s if gen_s > 0 else 0.0,
        "hook_s": rh.hook_s if rh else 0.0, "write_s": stats["write_s"],
        "file_bytes": os.path.getsize(out) if hooks else 0, "hidden": hidden, "generated": generated,
    }


def _set_threads(model, threads: int | None) -> int | None:
    """Apply the CPU thread count for generation; returns the previous one (None if unchanged)."""
    import torch

    on_cpu = next(model.parameters()).device.type == "cpu"
    if threads is None:
        threads = 1 if on_cpu and int(model.config.hidden_size) <= 512 else None
    if threads is None or threads == torch.get_num_threads():
        return None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    return old


def _synchronizer(model):
    import torch

    devs = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return lambda: [torch.cuda.synchronize(d) for d in devs]


class _Bar:
    """A rich progress bar with tokens/s, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done, self.t0 = enabled, total, 0, time.perf_counter()
        self.progress = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[tps]:>8.1f} tok/s"), TimeElapsedColumn(),
                                     transient=False, console=Console(stderr=True))
            self.progress.__enter__()
            self.task = self.progress.add_task("gen", total=self.total, tps=0.0)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            tps = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=n, tps=tps)

    def __exit__(self, *exc):
        if self.progress is not None:
            if exc[0] is None:                # ended early at EOS: the bar ends full; interrupted: as it stood
                self.progress.update(self.task, total=self.done)
            self.progress.__exit__(*exc)
        return False
