"""`tracekit record`: generate with routing hooks and stream a native trace (torch loads inside)."""

from __future__ import annotations

import os
import time
from typing import Optional

import typer

from tracekit.cli.app import app


def default_out(model: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in os.path.basename(model.rstrip("/")))
    return os.path.join("traces", f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}.parquet")


@app.command()
def record(
    model: str = typer.Option("tiny-mixtral", "--model", help="mixtral | tiny-mixtral | tiny-qwen3-moe | "
                              "tiny-olmoe | a local path | a cached Hugging Face id (never downloads)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="random weights at the model's shape, "
                                        "built on the meta device and materialised on --device"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="txt (one prompt a line) or jsonl "
                                          "(\"prompt\" key); default: built-in prose/code/math/Chinese set"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="greedy new tokens per prompt"),
    batch_size: int = typer.Option(4, "--batch-size", help="prompts per generate call (left-padded)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="'auto' spreads the model over GPUs"),
    hidden: str = typer.Option("none", "--hidden", help="none | full | proj:N (seeded random projection)"),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="keep only the model's first N layers (tiny models: build N layers, default 4)"),
    out: Optional[str] = typer.Option(None, "--out", help="output .parquet (default traces/<model>-<time>.parquet)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Record a routing trace: top-k experts, weights, router logits (and hidden states) per token."""
    from rich.console import Console

    from tracekit.errors import UserError
    from tracekit.record.recorder import record as do_record

    if device_map is not None:                # accelerate's strategies, or one device
        from tracekit.record.models import check_device_name

        check_device_name(device_map, "--device-map", ("auto", "balanced", "balanced_low_0", "sequential"))
    if num_layers is not None and num_layers < 1:
        raise UserError(f"--num-layers must be >= 1, got {num_layers}")
    if out is None:                           # the default folder is made; a named one must exist
        out = default_out(model)
        os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    try:
        s = do_record(model=model, out=out, prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      dtype=dtype, device=device, device_map=device_map, hidden=hidden,
                      random_weights=random_weights, num_layers=num_layers, force=force, progress=progress)
    except KeyboardInterrupt:
        msg = f"interrupted; the partial trace is kept in {tmp} (tracekit inspect {tmp})" \
            if os.path.isdir(tmp) else "interrupted"
        err = UserError(msg)
        err.exit_code = 130                   # as anywhere else a run is interrupted
        raise err from None
    con = Console(soft_wrap=True)
    gen = s["generate_s"]
    con.print(f"[bold]recorded[/bold] {s['out']}")
    con.print(f"  model {s['model']}  sequences {s['sequences']}  generated tokens {s['generated_tokens']}  "
              f"trace rows {s['tokens']}  steps {s['steps']}  layers {s['layers']}")
    con.print(f"  file {_size(s['file_bytes'])}  generation {gen:.2f} s ({s['tokens_per_s']:.1f} tok/s)  "
              f"time in hooks {s['hook_s']:.3f} s ({100 * s['hook_s'] / max(gen, 1e-9):.1f}%)  "
              f"writing {s['write_s']:.3f} s  load {s['load_s']:.1f} s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
