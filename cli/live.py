"""tracekit live: run a policy on a real GPU (trace-driven or model-driven), or calibrate the GPU."""

from __future__ import annotations

import json
from typing import Optional

import typer

from tracekit.cli.app import app
from tracekit.errors import UserError


@app.command("live")
def live(
    policy: str = typer.Option("lru", help="policy name (tracekit.policies)"),
    trace: Optional[str] = typer.Option(None, help="trace file: trace-driven mode"),
    capacity: int = typer.Option(2, help="GPU expert slots per layer (C)"),
    cap: int = typer.Option(2, help="prefetches in flight (throttle)"),
    chunk_mb: float = typer.Option(16.0, "--chunk-mb", help="copy/FFN chunk in MB (0: whole experts; else >= 4)"),
    layers: Optional[int] = typer.Option(None, help="use the first N layers (default: all that fit in host RAM)"),
    max_tokens: int = typer.Option(100, help="decode tokens per run (trace-driven) / new tokens (model-driven)"),
    profile: str = typer.Option("h100-pcie5", help="hardware profile for replay's prediction"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
    model: Optional[str] = typer.Option(None, help="tiny-mixtral | PATH | mixtral: model-driven mode"),
    random_weights: bool = typer.Option(False, help="random weights for --model"),
    prompts: Optional[str] = typer.Option(None, help="prompts file (text lines or jsonl) for --model"),
    calibrate: bool = typer.Option(False, help="measure this GPU and write a hardware profile (--out)"),
    out: Optional[str] = typer.Option(None, help="profile path for --calibrate"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out profile"),
    device: str = typer.Option("cuda", help="cuda (cpu only for tests: meaningless timings)"),
    dry_run: bool = typer.Option(False, help="with --trace: bookkeeping only (no GPU): counters as live/replay count them"),
    hybrid: bool = typer.Option(False, help="each miss is copied or computed on the host CPU, as replay's cost "
                                "model (--profile, which needs cpu_ffn_ms) decides"),
    split: bool = typer.Option(False, help="with --hybrid: a layer's only miss is split between a "
                               "partial copy and the host CPU (replay --split)"),
    cpu_threads: Optional[int] = typer.Option(None, help="threads of the host kernel for CPU misses (default: cores - 1)"),
    cpu_kernel: str = typer.Option("fused", help="CPU-miss kernel: fused (one pass over the weights, numba; "
                                   "torch's matmuls above 2 tokens) | torch"),
) -> None:
    """Execute a policy's decisions with pinned experts, real copies and real FFNs; compare with replay."""
    from tracekit.live.host_ffn import KERNELS  # first: sets OMP_WAIT_POLICY before torch loads libgomp

    if cpu_kernel not in KERNELS:
        raise UserError(f"--cpu-kernel {cpu_kernel!r}: expected one of {', '.join(KERNELS)}")
    if fmt not in ("table", "json"):
        raise UserError(f"--format {fmt!r}: expected table or json")
    for flag, v in (("--capacity", capacity), ("--cap", cap), ("--max-tokens", max_tokens), ("--layers", layers),
                    ("--cpu-threads", cpu_threads)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    from tracekit.record.models import check_device_name

    check_device_name(device)
    if chunk_mb != 0 and chunk_mb < 4:
        raise UserError(f"--chunk-mb {chunk_mb:g}: chunks under 4 MB lose bandwidth; use 0 (off) or >= 4")
    from tracekit import policies as P

    P.get(policy)
    if calibrate:
        return _calibrate(out, force, cpu_threads, cpu_kernel)
    for flag, given, why in (("--out", out, "is used only with --calibrate"),
                             ("--prompts", prompts and trace, "is for model-driven mode (--model without --trace)"),
                             ("--random-weights", random_weights and not model, "needs --model")):
        if given:                             # an option that would be ignored silently
            raise UserError(f"{flag} {why}")
    if not trace and not model:
        raise UserError("give --trace T (trace-driven), --model M (model-driven) or --calibrate --out FILE")
    if split and not hybrid:
        raise UserError("--split is a kind of --hybrid: pass both")
    if hybrid:
        from tracekit.replay.cost import hybrid_profile

        hybrid_profile(profile)               # before pinning anything
    if trace and not dry_run and device == "cpu":
        raise UserError("trace-driven live times copies with CUDA events: --device cpu needs --dry-run (or --model "
                        "alone, model-driven)")
    if dry_run and not trace:
        raise UserError("--dry-run replays a trace's bookkeeping: it needs --trace T (model-driven mode runs the model)")
    if not dry_run and device.startswith("cuda"):
        from tracekit.live.session import need_cuda

        need_cuda()
    from tracekit.live import session

    if model and not trace:
        session.check_capacity(capacity, _config(model).num_local_experts)
    if trace:
        shapes = session.MIXTRAL
        if model:
            shapes = session.shapes_from_config(_config(model))
        rows = _interruptible(lambda: session.trace_sweep(
            trace, [policy], [capacity], cap, (chunk_mb,), layers, max_tokens, profile, device, dry_run,
            shapes, log=_log, hybrids=("split" if split else hybrid,), cpu_threads=cpu_threads,
            cpu_kernel=cpu_kernel))
        return _print_rows(rows, fmt)
    res = _interruptible(lambda: session.model_run(model, policy, capacity, cap, chunk_mb, random_weights,
                                                   prompts, layers, max_tokens, device, log=_log,
                                                   hybrid=hybrid, profile=profile, cpu_threads=cpu_threads,
                                                   cpu_kernel=cpu_kernel, split=split))
    print(_json(res) if fmt == "json" else
          f"identical={res['identical']}  resident {res['resident_tok_s']:.2f} tok/s  offloaded "
          f"{res['offloaded_tok_s']:.2f} tok/s  hit {res['hit_rate']:.3f}"
          + (f"  cpu share {res['cpu_share']:.2f}  {res['cpu_ms_per_job']:.2f} ms per CPU expert "
             f"({res['cpu_kernel']} kernel)" if hybrid else "")
          + (f"  split share {res['split_share']:.2f}" if split else ""))
    if not res["identical"]:
        raise UserError("offloaded greedy output differs from the resident model")


def _config(model: str):
    from transformers import AutoConfig

    from tracekit.record.models import TINY_ALIASES, mixtral_8x7b_config, resolve, tiny_config

    kind, path = resolve(model, True)
    if kind == "tiny":
        return tiny_config(TINY_ALIASES[model])
    return mixtral_8x7b_config() if kind == "builtin-mixtral" else AutoConfig.from_pretrained(path, local_files_only=True)


def _interruptible(fn):
    # every store is freed by its owner's finally; Ctrl-C surfaces as KeyboardInterrupt -> exit 130
    try:
        return fn()
    except KeyboardInterrupt:
        err = UserError("interrupted; pinned memory freed")
        err.exit_code = 130
        raise err from None


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def _calibrate(out: Optional[str], force: bool = False, cpu_threads: Optional[int] = None,
               cpu_kernel: str = "fused") -> None:
    if not out:
        raise UserError("--calibrate needs --out profile.json")
    import os

    from tracekit.outfiles import check_new_file

    check_new_file(out, force)                # before any measuring
    from tracekit.live.calibrate import calibrate, write
    from tracekit.live.session import need_cuda

    need_cuda()
    prof = _interruptible(lambda: calibrate(name=os.path.splitext(os.path.basename(out))[0], log=_log,
                                            cpu_threads=cpu_threads, cpu_kernel=cpu_kernel))
    write(prof, out)
    print(f"wrote {out}: {prof['h2d_GBps']} GB/s H2D, {prof['copy_overhead_us']} us per copy, "
          f"FFN 1 token {prof['ffn_ms']['1']} ms, attention {prof['attn_ms']} ms/layer on {prof['card']}")


def _json(obj) -> str:
    # strict JSON: a figure a run has no value for (nan) is null
    from tracekit.live.compare import is_nan

    def clean(v):
        if is_nan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _mb(v: float) -> str:
    # MB/tok: whole MB for Mixtral-size experts, three digits for tiny models' kilobytes
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _print_rows(rows: list, fmt: str) -> None:
    if fmt == "json":
        print(_json(rows))
        return
    from rich.table import Table

    from tracekit.live.compare import cell
    from tracekit.replay.report import wide_console

    t = Table()
    cols = [("policy", "policy", "{}"), ("C", "capacity", "{}"), ("chunks", "chunks", "{}"),
            ("live tok/s", "live_tok_s", "{:.2f}"), ("pred tok/s", "pred_tok_s", "{:.2f}"),
            ("pred/live", "ratio_pred_live", "{:.2f}"), ("decode hit", "decode_hit_rate", "{:.3f}"),
            ("MB/tok", "bytes_per_token_MB", _mb), ("GB/s", "achieved_GBps", "{:.1f}"),
            ("stall ms/tok", "stall_ms_per_token", "{:.2f}"), ("compute ms/tok", "compute_ms_per_token", "{:.2f}"),
            ("policy ms/tok", "policy_ms_per_token", "{:.3f}"), ("eff", "efficiency", "{:.2f}"),
            ("= replay", "bookkeeping_equal", "{}")]
    if any(r.get("hybrid") for r in rows):
        cols[-1:-1] = [("cpu share", "cpu_share", "{:.2f}"), ("split share", "split_share", "{:.2f}"),
                       ("cpu wait ms/tok", "cpu_wait_ms_per_token", "{:.2f}"), ("cpu ms/job", "cpu_ms_per_job", "{:.2f}"),
                       ("cpu result waited by", "cpu_result_wait", "{}")]     # stream (GPU) or host
    for h, _, _ in cols:
        t.add_column(h)
    for r in rows:
        t.add_row(*[cell(r[k], f) for _, k, f in cols])
    wide_console().print(t)
