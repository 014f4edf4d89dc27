"""Cut a Trace down to its first N layers and to the steps that hold the first M decode tokens.

Both replay and live then walk the SAME cut plan, so their counters can be compared exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tracekit.errors import UserError
from tracekit.trace.core import Trace

_PER_TOKEN = ("seq_id", "step", "phase", "position", "token_id", "experts", "weights", "logits", "hidden")


def check_shape(trace: Trace, L: int, E: int, what: str) -> None:
    """Refuse a trace whose experts do not match the model, or that has fewer layers than asked."""
    model = trace.meta.get("model", "") if trace.format == "tracekit" else ""    # recorded with --model MODEL
    hint = f"; pass --model {model} for its shapes" if model and model not in what else ""
    if trace.num_experts != E:
        raise UserError(f"{trace.path}: trace has {trace.num_experts} experts per layer but {what} has {E}{hint}")
    if trace.num_layers != L:
        raise UserError(f"{trace.path}: trace has {trace.num_layers} layers but {what} has {L}{hint}")


def cut(trace: Trace, layers: int | None = None, max_decode_tokens: int | None = None) -> Trace:
    """First `layers` layers; steps in order until `max_decode_tokens` decode tokens are included."""
    t = trace
    if max_decode_tokens is not None and max_decode_tokens > 0:
        steps = np.unique(t.step)
        keep_steps = []
        n_dec = 0
        for s in steps:                                   # steps are few (hundreds): a Python loop is fine
            if n_dec >= max_decode_tokens:
                break
            m = t.step == s
            keep_steps.append(s)
            n_dec += int((t.phase[m] == 1).sum())
        mask = np.isin(t.step, np.array(keep_steps, dtype=t.step.dtype))
        t = _select(t, mask)
    if layers is not None and layers < t.num_layers:
        if layers <= 0:
            raise UserError(f"--layers must be positive (got {layers})")
        repl = {"num_layers": layers, "experts": t.experts[:, :layers], "weights": t.weights[:, :layers]}
        if t.logits is not None:
            repl["logits"] = t.logits[:, :layers]
        if t.hidden is not None:
            repl["hidden"] = t.hidden[:, :layers]
        if t.router is not None:
            repl["router"] = t.router[:layers]
        t = dataclasses.replace(t, **repl)
    elif layers is not None and layers > t.num_layers:
        raise UserError(f"--layers {layers}: the trace has only {t.num_layers} layers")
    return t


def _select(t: Trace, mask: np.ndarray) -> Trace:
    repl = {}
    for k in _PER_TOKEN:
        v = getattr(t, k)
        if v is not None:
            repl[k] = v[mask]
    return dataclasses.replace(t, **repl)
