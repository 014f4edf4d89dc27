"""`tracekit inspect TRACE`: sizes, completeness, hidden states, expert popularity and repeat rate."""

from __future__ import annotations

import typer

from tracekit.cli.app import app


def expert_popularity(experts, num_experts: int):
    """experts [T,L,K] (-1 = missing) -> share of selections per expert [L,E] (rows sum to 1)."""
    import numpy as np

    T, L, K = experts.shape
    counts = np.zeros((L, num_experts), dtype=np.int64)
    for l in range(L):
        e = experts[:, l, :].reshape(-1)
        counts[l] = np.bincount(e[e >= 0].astype(np.int64), minlength=num_experts)[:num_experts]
    tot = counts.sum(1, keepdims=True)
    return counts / np.maximum(tot, 1)


def repeat_rate(seq_id, phase, position, experts, overlap: bool = False):
    """Share of tokens whose top-k set at a layer equals the previous token's (same sequence).

    -> (per layer [L], overall). Tokens without a previous token or with missing events are skipped.
    overlap=True instead gives the mean share of the top-k that the previous token also selected.
    """
    import numpy as np

    T, L, K = experts.shape
    if T < 2:
        return np.full(L, np.nan), float("nan")
    order = np.lexsort((position, phase, seq_id))
    sets = np.sort(experts[order].astype(np.int32), axis=-1)          # [T, L, K]
    s = seq_id[order]
    same = (s[1:] == s[:-1])[:, None]                                  # [T-1, 1]
    valid = (sets[1:] >= 0).all(-1) & (sets[:-1] >= 0).all(-1) & same  # [T-1, L]
    if overlap:  # |A & B| / K, sets have distinct members
        eq = (sets[1:, :, :, None] == sets[:-1, :, None, :]).any(-1).sum(-1) / K * valid
    else:
        eq = (sets[1:] == sets[:-1]).all(-1) & valid
    n = valid.sum(0)
    per_layer = np.where(n > 0, eq.sum(0) / np.maximum(n, 1), np.nan)
    overall = float(eq.sum() / valid.sum()) if valid.sum() else float("nan")
    return per_layer, overall


@app.command()
def inspect(trace: str = typer.Argument(..., help="a tracekit trace, a partial recording (X.tmp), "
                                        "or a long-format Parquet file")) -> None:
    """Summarise a routing trace: tokens, steps, layers, experts, popularity and temporal repeat rate."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from tracekit.trace.core import PHASE_DECODE, PHASE_PREFILL
    from tracekit.trace.reader import read_trace

    t = read_trace(trace, load_hidden=False)
    con = Console(soft_wrap=True)
    L, E, K = t.num_layers, t.num_experts, t.top_k
    status = "complete" if t.complete else "[bold red]INCOMPLETE[/bold red] (recording did not finish; flushed rows only)"
    con.print(f"[bold]{t.path}[/bold]  format {t.format}  {status}")
    con.print(f"model {t.meta.get('model', 'unknown')}")
    n_pre = int((t.phase == PHASE_PREFILL).sum())
    n_dec = int((t.phase == PHASE_DECODE).sum())
    con.print(f"tokens {t.num_tokens} (prefill {n_pre}, decode {n_dec})  steps {t.num_steps}  "
              f"sequences {len(np.unique(t.seq_id))}  layers {L}  experts {E}  top-k {K}")
    hidden = t.hidden_kind if t.hidden_kind != "none" else "no"
    con.print(f"hidden states: {hidden}  router logits: {'yes' if t.logits is not None else 'no'}  "
              f"router weights: {'yes' if t.router is not None else 'no'}")
    eb = t.expert_bytes
    con.print(f"expert size: {eb / 1e6:.4g} MB (recorded)" if eb else
              "expert size: not recorded (replay prices experts at the profile's size unless --expert-mb)")
    if t.num_tokens == 0:
        con.print("no token rows yet")
        return
    missing = int((t.experts < 0).all(-1).sum())
    if missing:
        con.print(f"missing token-layer events: {missing}")
    pop = expert_popularity(t.experts, E)
    rep, overall = repeat_rate(t.seq_id, t.phase, t.position, t.experts)
    ovl, ovl_all = repeat_rate(t.seq_id, t.phase, t.position, t.experts, overlap=True)
    con.print(f"temporal repeat rate (top-k set equals the previous token's): {_pct(overall)} "
              f"(uniform-random baseline {_pct(_random_repeat(E, K))}); mean top-k overlap with the previous "
              f"token {_pct(ovl_all)} (random {_pct(K / E)})")
    tab = Table(title="expert popularity per layer (% of selections)", show_edge=False, pad_edge=False)
    tab.add_column("layer", justify="right")
    if E <= 16:
        for e in range(E):
            tab.add_column(str(e), justify="right")
    else:
        tab.add_column("top experts (id:%)")
        tab.add_column("min %", justify="right")
    tab.add_column("max/mean", justify="right")
    tab.add_column("repeat", justify="right")
    tab.add_column("overlap", justify="right")
    for l in range(L):
        p = pop[l]
        if E <= 16:
            cells = [f"{100 * v:.0f}" for v in p]
        else:
            top = np.argsort(-p, kind="stable")[:4]
            cells = [" ".join(f"{e}:{100 * p[e]:.0f}" for e in top), f"{100 * p.min():.1f}"]
        tab.add_row(str(l), *cells, f"{p.max() * E:.2f}", _pct(rep[l]), _pct(ovl[l]))
    con.print(tab)


def _random_repeat(E: int, K: int) -> float:
    from math import comb

    return 1.0 / comb(E, K) if 0 < K <= E else float("nan")


def _pct(x: float) -> str:
    import numpy as np

    if x is None or np.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}%" if x == 0 or x >= 1e-3 else f"{100 * x:.2g}%"
