"""Render sweep rows: rich table, JSON lines, CSV, Parquet, and the capacity plot."""

from __future__ import annotations

import json
import sys

from tracekit.errors import UserError
from tracekit.outfiles import check_new_file, write_atomically
from tracekit.replay.metrics import COLUMNS, INT_COLUMNS, TEXT_COLUMNS

JSON_KEYS = ("trace", "policy", "capacity", "applicable", "reason", "requests", "hit_rate",
             "decode_hit_rate", "transfers_per_token", "bytes_per_token", "transfers_above_belady",
             "stall_ms_per_token", "time_ms_per_token", "sim_tokens_per_s", "prefetch_issued",
             "prefetch_used", "prefetch_wasted", "cpu_miss_share")


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _ms(v):
    # milliseconds: one decimal for Mixtral-size times, three digits below 10 ms (tiny models' 0.0384)
    return _f(v, ".1f" if v is None or abs(v) >= 10 else ".3g")


def wide_console():
    """A rich console that does not squeeze wide tables into 80 columns when piped."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=200)


def render_table(rows: list[dict], profile_name: str, console=None) -> None:
    """One table per trace. A policy that cannot run on the trace gets one row (its capacities, "n/a")
    and its reason once, under the table, instead of a reason per capacity stretching a column."""
    from rich.table import Table

    console = console or wide_console()
    for trace in dict.fromkeys(r["trace"] for r in rows):
        unit, div, bfmt = _bytes_unit([r["bytes_per_token"] for r in rows if r["trace"] == trace])
        t = Table(title=f"{trace}  (profile {profile_name})", title_justify="left", caption_justify="left")
        for col in ("policy", "C", "decode hit", "all hit", "xfer/tok", f"{unit}/tok", "above MIN",
                    "stall ms/tok", "ms/tok", "sim tok/s", "pf used/issued", "CPU misses"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        na: dict[str, list[dict]] = {}        # policy -> its not-applicable rows, in order
        for r in rows:
            if r["trace"] != trace:
                continue
            name = r["policy"] + (" (oracle)" if r["kind"] == "oracle" else "")
            if not r["applicable"]:
                na.setdefault(name, []).append(r)
                continue
            pf = f"{r['prefetch_used']}/{r['prefetch_issued']}" if r["prefetch_issued"] else "-"
            t.add_row(name, str(r["capacity"]), _f(r["decode_hit_rate"], ".4f"), _f(r["hit_rate"], ".4f"),
                      _f(r["transfers_per_token"], ".2f"), _f(r["bytes_per_token"] and r["bytes_per_token"] / div, bfmt),
                      _f(r["transfers_above_belady"], "+.2f"), _ms(r["stall_ms_per_token"]),
                      _ms(r["time_ms_per_token"]), _f(r["sim_tokens_per_s"], ".2f"), pf,
                      _cpu_cell(r))
        for name, rs in na.items():
            t.add_row(f"[dim]{name}[/dim]", ",".join(str(r["capacity"]) for r in rs), "[dim]n/a[/dim]", *[""] * 9)
        notes = [f"{name}: not applicable: " + "; ".join(dict.fromkeys(r["reason"] for r in rs))
                 for name, rs in na.items()]
        best = best_online(r for r in rows if r["trace"] == trace)
        if best:
            notes.insert(0, "most simulated tokens/s without an oracle: " + "; ".join(
                f"C={C} {r['policy']} {r['sim_tokens_per_s']:.2f}"
                + (f" (belady {b['sim_tokens_per_s']:.2f})" if b else "") for C, (r, b) in best.items()))
        t.caption = "\n".join(notes) or None
        console.print(t)


def _bytes_unit(values) -> tuple[str, float, str]:
    # (label, divisor, format) for a table's bytes per token: GB for Mixtral-size experts, smaller
    # units for small models (a tiny model's 0.0003 GB/tok would print as 0.000)
    top = max((v for v in values if v), default=0.0)
    for unit, div in (("GB", 1e9), ("MB", 1e6)):
        if top >= 0.1 * div:
            return unit, div, ".3f" if unit == "GB" else ".2f"
    return "KB", 1e3, ".2f"


def best_online(rows) -> dict:
    """C -> (the non-oracle row with the most simulated tokens/s, belady's row at that C or None; a
    prefetching policy may beat belady's tokens/s: MIN bounds demand transfers, not time).
    Ties go to the earlier row (registry order); rows without a decode figure are left out."""
    best: dict = {}
    bound: dict = {}
    for r in rows:
        if not r["applicable"] or r["sim_tokens_per_s"] is None:
            continue
        if r["kind"] == "oracle":
            if r["policy"] == "belady":
                bound[r["capacity"]] = r
        elif r["capacity"] not in best or r["sim_tokens_per_s"] > best[r["capacity"]]["sim_tokens_per_s"]:
            best[r["capacity"]] = r
    return {C: (r, bound.get(C)) for C, r in sorted(best.items())}


def traces_without_decode(rows: list[dict]) -> list[str]:
    """Traces on which a policy ran but no decode token was replayed (their decode metrics are None)."""
    ran = [r for r in rows if r["applicable"]]
    return [t for t in dict.fromkeys(r["trace"] for r in ran)
            if all(r["decode_tokens"] == 0 for r in ran if r["trace"] == t)]


def _cpu_cell(r: dict) -> str:
    # share of misses on the host CPU (whole), and split between a partial copy and the CPU
    if not r["cpu_misses"] and not r.get("split_misses"):
        return "-"
    cell = f"{r['cpu_miss_share']:.0%}"
    return cell + (f" + {r['split_miss_share']:.0%} split" if r.get("split_misses") else "")


def print_json(rows: list[dict], out=sys.stdout) -> None:
    for r in rows:
        out.write(json.dumps({k: r.get(k) for k in JSON_KEYS} | {k: r[k] for k in COLUMNS if k not in JSON_KEYS})
                  + "\n")


def print_csv(rows: list[dict], out=sys.stdout) -> None:
    import csv

    w = csv.DictWriter(out, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in COLUMNS})


def write_parquet(rows: list[dict], path: str, force: bool) -> None:
    import polars as pl

    check_new_file(path, force)
    schema = {k: pl.Utf8 if k in TEXT_COLUMNS else pl.Int64 if k in INT_COLUMNS else
              pl.Boolean if k == "applicable" else pl.Float64 for k in COLUMNS}
    df = pl.DataFrame([{k: r.get(k) for k in COLUMNS} for r in rows], schema=schema)
    write_atomically(path, path + ".partial", df.write_parquet)


def write_plot(rows: list[dict], path: str, force: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'tracekit[plot]'") from None
    check_new_file(path, force)
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 4 * len(traces)), squeeze=False)
    for i, trace in enumerate(traces):
        sub = [r for r in rows if r["trace"] == trace and r["applicable"]]
        for j, (key, label) in enumerate((("decode_hit_rate", "decode hit rate"),
                                           ("sim_tokens_per_s", "simulated tokens/s"))):
            ax = axes[i][j]
            for pol in dict.fromkeys(r["policy"] for r in sub):
                pts = sorted((r["capacity"], r[key]) for r in sub if r["policy"] == pol and r[key] is not None)
                if not pts:
                    continue
                oracle = pol == "belady"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if oracle else "-", color="black" if oracle else None,
                        linewidth=2.5 if oracle else 1.5, label="belady (MIN bound)" if oracle else pol)
            if not ax.lines:                  # say why the panel is empty, rather than leave bare axes
                why = "no decode steps: undefined (see the table's note)" if sub else "no policy could run"
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("expert slots per layer (C)")
            ax.set_ylabel(label)
            ax.set_title(f"{trace}: {label}")
            ax.grid(alpha=0.3)
        if axes[i][0].lines:
            axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, path + ".partial.png", lambda tmp: fig.savefig(tmp, dpi=110))
