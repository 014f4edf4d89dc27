"""tracekit replay: score policies offline against traces. Never imports torch."""

from __future__ import annotations

from typing import List

import typer

from tracekit.cli.app import app


def _ints(text: str, what: str) -> list[int]:
    from tracekit.errors import UserError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} wants a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UserError(f"--{what} values must be >= 1, got {text!r}")
    return list(dict.fromkeys(vals))          # each once, in the order given


@app.command("replay")
def replay(
    traces: List[str] = typer.Argument(..., help="trace files (tracekit or long-format Parquet), partial recordings (OUT.tmp), or synthetic:tokens=N,layers=L,..."),
    policy: str = typer.Option("all", "--policy", "-p", help="'all' or a comma list of policy names"),
    capacity: str = typer.Option("1,2,4", "--capacity", "-c", help="expert slots per layer, comma list"),
    profile: str = typer.Option("h100-pcie5", help="hardware profile: preset name or JSON file"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | csv"),
    out: str = typer.Option(None, "--out", help="also write every row to this Parquet file"),
    plot: str = typer.Option(None, "--plot", help="write a PNG of hit rate and tokens/s against capacity"),
    cap: int = typer.Option(2, "--cap", help="prefetches in flight (the study's throttle)"),
    depth: int = typer.Option(0, "--depth", help="prefetch depth per token and layer (0: top_k)"),
    steps: str = typer.Option("passes", "--steps", help="passes (recorded forward passes) | tokens"),
    expert_mb: float = typer.Option(None, "--expert-mb", help="MB (1e6 bytes) per expert, overriding the trace's and the profile's size"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="parallel processes (0: all cores)"),
    hybrid: bool = typer.Option(False, "--hybrid", help="each miss is copied or computed on the host CPU, "
                                "whichever the cost model says finishes first"),
    split: bool = typer.Option(False, "--split", help="with --hybrid: a layer's only miss may be split between a "
                               "partial copy and the host CPU, so that both finish together (not cached)"),
    force: bool = typer.Option(False, "--force", help="overwrite --out / --plot files"),
) -> None:
    """Score every policy offline: hit rate, transfers, bytes, stall and simulated tokens/s."""
    import math
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracekit import policies
    from tracekit.errors import UserError
    from tracekit.outfiles import check_new_files
    from tracekit.replay import report
    from tracekit.replay.cost import hybrid_profile, load_profile
    from tracekit.replay.sweep import SweepConfig, load_plans, run_sweep
    from tracekit.trace.core import INCOMPLETE

    if fmt not in ("table", "json", "csv"):
        raise UserError(f"--format must be table, json or csv, not {fmt!r}")
    if steps not in ("passes", "tokens"):
        raise UserError(f"--steps must be passes or tokens, not {steps!r}")
    if cap < 1:
        raise UserError("--cap must be >= 1")
    if depth < 0 or jobs < 0:
        raise UserError(f"--depth and --jobs must be >= 0 (0: the default), got {depth} and {jobs}")
    if expert_mb is not None and not (expert_mb > 0 and math.isfinite(expert_mb)):
        raise UserError(f"--expert-mb must be a finite number > 0, got {expert_mb:g}")
    if split and not hybrid:
        raise UserError("--split is a kind of --hybrid: pass both")
    check_new_files({"--out": out, "--plot": plot}, traces, force)
    cfg = SweepConfig(policies=policies.parse(policy), capacities=_ints(capacity, "capacity"),
                      profile=hybrid_profile(profile) if hybrid else load_profile(profile), cap=cap, depth=depth, token_steps=steps == "tokens",
                      expert_bytes=expert_mb * 1e6 if expert_mb else None, jobs=jobs, hybrid=hybrid,
                      split=split)
    err = Console(stderr=True)
    plans = load_plans(traces, cfg.token_steps)
    for name, (_plan, t) in plans.items():
        if not t.complete:
            print(f"note: {name} is {INCOMPLETE}", file=sys.stderr)
        if cfg.expert_bytes is None and not t.expert_bytes and t.format != "synthetic":    # no model behind it
            print(f"note: {name} records no expert size; bytes and copy times use profile {cfg.profile.name}'s "
                  f"{cfg.profile.expert_MB:g} MB per expert (--expert-mb sets it)", file=sys.stderr)
    total = len(plans) * len(cfg.policies) * len(cfg.capacities)
    with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("replay", total=total)
        rows = run_sweep(plans, cfg, on_done=lambda _r: bar.advance(task))
    for trace in report.traces_without_decode(rows):
        hint = ("" if cfg.token_steps else
                "; --steps tokens counts every token as a decode step (teacher-forced traces)")
        print(f"note: {trace} has no decode steps, so its decode metrics are undefined (- / null){hint}",
              file=sys.stderr)
    if fmt == "table":
        report.render_table(rows, cfg.profile.name)
    elif fmt == "json":
        report.print_json(rows, sys.stdout)
    else:
        report.print_csv(rows, sys.stdout)
    if out:
        report.write_parquet(rows, out, force)
    if plot:
        report.write_plot(rows, plot, force)
