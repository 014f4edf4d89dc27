"""The cost model (the only one): a timeline with one FIFO copy engine and one GPU stream.

Per (step, layer):
  attention      t_route = cursor + attn_ms + attn_ms_per_token * tokens
  copies         every MISS / PREFETCH of the layer is enqueued at t_route (demand first, as the
                 controller emits them); a copy starts at max(t_issue, engine free, slot free),
                 lasts copy_overhead + bytes / bandwidth, and the engine is FIFO
  experts        in request order, expert e computes ffn(ntok_e); with `chunks` > 1 the FFN is
                 split along the intermediate dim and can start on chunks that have landed:
                     end = max(t + ffn, ready_e + ffn / chunks)
                 stall += end - (t + ffn)
  prefetches     issued after the layer (controller `after`) are enqueued at the layer's end
A slot is free for a new copy once the last expert computed from it has finished.
Hybrid (`--hybrid`): a miss the controller sends to the CPU (kind CPU) is a second server: the
activation goes to the host (act_copy_us), the expert runs there for cpu_ffn(ntok) x contention_cpu,
the result comes back (act_copy_us); the GPU waits for it at that expert's turn. Copies take
x contention_copy while hybrid is on (CPU compute and copies both read host memory).
Split (`--hybrid --split`, kind SPLIT, k of SPLIT_GRID): rows [0, k/GRID) of the expert are one copy
(overhead + k/GRID bytes / bandwidth, to a staging buffer, not a slot) and run on the GPU for
k/GRID of the FFN time once landed; the host computes the rest for (1 - k/GRID) of its CPU time; the
expert's turn ends when both parts are done.
The result is a breakdown (stall, compute, copy busy, bytes), not one number.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field
from importlib import resources

import numpy as np
from numba import njit

from tracekit.errors import UserError
from tracekit.replay.controller import CPU, MISS, PREFETCH, SPLIT, SPLIT_GRID

# scalar slots of the numba profile vector
P_BW, P_OVH, P_BYTES, P_ATTN, P_ATTN_TOK, P_CHUNKS, P_ACT, P_CONT_COPY, P_CONT_CPU = range(9)
# accumulator slots of the timeline (A_CPU_BUSY: all steps; A_DEC_CPU_BUSY: decode steps, kept by `run`)
A_ENGINE, A_STALL, A_COMPUTE, A_COPY, A_BYTES, A_CPU, A_CPU_BUSY, A_DEC_CPU_BUSY = range(8)


@dataclass
class Profile:
    name: str
    h2d_GBps: float
    copy_overhead_us: float
    expert_MB: float
    attn_ms: float
    attn_ms_per_token: float = 0.0
    chunks: int = 1
    ffn_ms: dict = field(default_factory=lambda: {"1": 0.14})
    cpu_ffn_ms: dict = field(default_factory=dict)
    act_copy_us: float = 20.0
    contention_copy: float = 1.0
    contention_cpu: float = 1.0
    card: str = ""
    source: str = ""

    @property
    def expert_bytes(self) -> float:
        return self.expert_MB * 1e6

    def vectors(self, expert_bytes: float | None = None, chunks: int | None = None, hybrid: bool = False):
        """(scalars float64[9], ffn_tok, ffn_s) for numba."""
        sc = np.zeros(9)
        sc[P_BW] = self.h2d_GBps * 1e9
        sc[P_OVH] = self.copy_overhead_us * 1e-6
        sc[P_BYTES] = expert_bytes if expert_bytes else self.expert_bytes
        sc[P_ATTN] = self.attn_ms * 1e-3
        sc[P_ATTN_TOK] = self.attn_ms_per_token * 1e-3
        sc[P_CHUNKS] = max(1, chunks if chunks else self.chunks)
        sc[P_ACT] = self.act_copy_us * 1e-6
        sc[P_CONT_COPY] = self.contention_copy if hybrid else 1.0
        sc[P_CONT_CPU] = self.contention_cpu if hybrid else 1.0
        tok, sec = _table(self.ffn_ms)
        return sc, tok, sec

    def cpu_table(self):
        """(tokens, seconds) of host-CPU expert FFN time; a dummy row when the profile has none."""
        return _table(self.cpu_ffn_ms) if self.cpu_ffn_ms else (np.ones(1), np.full(1, 1e9))

    def copy_seconds(self, expert_bytes: float | None = None) -> float:
        b = expert_bytes if expert_bytes else self.expert_bytes
        return self.copy_overhead_us * 1e-6 + b / (self.h2d_GBps * 1e9)


def _table(d: dict):
    items = sorted((float(k), float(v) * 1e-3) for k, v in d.items())
    if not items:
        raise UserError("hardware profile has an empty FFN table")
    return np.array([a for a, _ in items]), np.array([b for _, b in items])


def preset_names() -> list[str]:
    root = resources.files("tracekit.replay") / "profiles"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str) -> Profile:
    if os.path.exists(name_or_path):
        try:
            with open(name_or_path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:      # a directory, a binary file, unreadable
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise UserError(f"{name_or_path}: cannot read a hardware profile from it ({why})") from None
    else:
        root = resources.files("tracekit.replay") / "profiles"
        f = root / f"{name_or_path}.json"
        if not f.is_file():
            raise UserError(f"unknown hardware profile {name_or_path!r}: not a file, and presets are "
                            f"{', '.join(preset_names())}")
        text = f.read_text()
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{name_or_path}: not a valid hardware profile ({exc})") from None
    if not isinstance(d, dict):
        raise UserError(f"{name_or_path}: not a valid hardware profile (a JSON object expected)")
    d.setdefault("name", os.path.splitext(os.path.basename(name_or_path))[0])
    fields = Profile.__dataclass_fields__
    missing = [k for k, f in fields.items() if k not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{name_or_path}: not a valid hardware profile (missing {', '.join(missing)})")
    p = Profile(**{k: v for k, v in d.items() if k in fields})
    _check_profile(name_or_path, p)
    return p


def hybrid_profile(given: str) -> Profile:
    """--profile GIVEN for --hybrid: loaded, and refused (naming GIVEN, not the name inside the file)
    when it has no cpu_ffn_ms table, before any work starts."""
    p = load_profile(given)
    if not p.cpu_ffn_ms:
        raise UserError(f"--profile {given}: no cpu_ffn_ms table, which --hybrid needs (tracekit live --calibrate "
                        f"--out FILE measures one)")
    return p


def _check_profile(where: str, p: Profile) -> None:
    # every figure a number in range, and the FFN tables {tokens: ms} with positive entries
    def bad(why: str):
        return UserError(f"{where}: not a valid hardware profile ({why})")

    for key, lo, strict in (("h2d_GBps", 0, True), ("expert_MB", 0, True), ("copy_overhead_us", 0, False),
                            ("attn_ms", 0, False), ("attn_ms_per_token", 0, False), ("chunks", 1, False),
                            ("act_copy_us", 0, False), ("contention_copy", 0, True), ("contention_cpu", 0, True)):
        v = getattr(p, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or \
                (strict and v == lo) or (key == "chunks" and v != int(v)):
            kind = "a whole number" if key == "chunks" else "a finite number"
            raise bad(f"{key} must be {kind} {'>' if strict else '>='} {lo}, got {v!r}")
    for key in ("ffn_ms", "cpu_ffn_ms"):
        table = getattr(p, key)
        try:
            ok = isinstance(table, dict) and all(math.isfinite(float(k)) and math.isfinite(float(v)) and
                                                 float(k) >= 1 and float(v) > 0 for k, v in table.items())
        except (TypeError, ValueError):
            ok = False
        if not ok or (key == "ffn_ms" and not table):
            raise bad(f"{key} must map token counts (>= 1) to milliseconds (> 0), got {table!r}")


@njit(cache=True, inline="always")
def interp(tok, sec, n):
    # piecewise-linear time for n tokens; beyond the table, grows linearly from the last point
    if n <= tok[0]:
        return sec[0]
    for i in range(1, tok.shape[0]):
        if n <= tok[i]:
            w = (n - tok[i - 1]) / (tok[i] - tok[i - 1])
            return sec[i - 1] + w * (sec[i] - sec[i - 1])
    return sec[-1] * n / tok[-1]


@njit(cache=True, inline="always")
def copy_duration(sc):
    # one expert's host-to-device copy: per-copy overhead + bytes / bandwidth, x contention
    return (sc[P_OVH] + sc[P_BYTES] / sc[P_BW]) * sc[P_CONT_COPY]


@njit(cache=True, inline="always")
def attn_seconds(sc, ntok):
    # attention and the rest of the non-expert layer work, for a step of ntok tokens
    return sc[P_ATTN] + sc[P_ATTN_TOK] * ntok


@njit(cache=True, inline="always")
def expert_end(t, f, ready, ch):
    # an expert of FFN time f, its turn at t, its copy landed at `ready`: with `ch` chunks it can
    # start on the chunks that have landed
    return max(t + f, ready + f / ch)


@njit(cache=True, inline="always")
def demand_acc(tl):
    # the accumulators the fused demand loops keep in registers: (stall, compute, copy, bytes, engine)
    acc = tl[2]
    return acc[A_STALL], acc[A_COMPUTE], acc[A_COPY], acc[A_BYTES], acc[A_ENGINE]


@njit(cache=True, inline="always")
def store_demand_acc(tl, stall, compute, copy, nbytes, engine):
    acc = tl[2]
    acc[A_STALL], acc[A_COMPUTE], acc[A_COPY], acc[A_BYTES], acc[A_ENGINE] = stall, compute, copy, nbytes, engine


def new_timeline(L: int, E: int, C: int):
    # ready[L, E]: when each expert's copy lands; slot_free[L, C]; accumulators (A_*)
    return (np.zeros((L, E)), np.zeros((L, C)), np.zeros(8))


@njit(cache=True, inline="always")
def enqueue_copies(sc, tl, act, n, t_issue):
    # every MISS/PREFETCH row of act[:n] becomes one FIFO copy issued at t_issue; a SPLIT row
    # copies its first k / SPLIT_GRID of the expert (to the staging buffer: no slot to wait for)
    ready, slot_free, acc = tl
    dur = copy_duration(sc)
    for r in range(n):
        k = act[r, 0]
        if k != MISS and k != PREFETCH and k != SPLIT:
            continue
        l, e, s = act[r, 1], act[r, 2], act[r, 3]
        if k == SPLIT:
            f = s / SPLIT_GRID
            d = (sc[P_OVH] + f * sc[P_BYTES] / sc[P_BW]) * sc[P_CONT_COPY]
            start = max(t_issue, acc[A_ENGINE])
            nb = f * sc[P_BYTES]
        else:
            d = dur
            start = max(t_issue, acc[A_ENGINE], slot_free[l, s])
            nb = sc[P_BYTES]
        acc[A_ENGINE] = start + d
        acc[A_COPY] += d
        acc[A_BYTES] += nb
        ready[l, e] = start + d


@njit(cache=True, inline="always")
def attn_time(sc, tl, ntok):
    # attn_seconds, also added to the timeline's compute
    attn = attn_seconds(sc, ntok)
    tl[2][A_COMPUTE] += attn
    return attn


@njit(cache=True, inline="always")
def layer_time(sc, ffn_tok, ffn_s, cpu_tok, cpu_s, tl, act, n, req_ntok, t_route):
    # One layer of one step after routing at t_route. act[:n] from controller.serve;
    # req_ntok: this layer's request sizes. Returns the time the layer's last expert finishes.
    ready, slot_free, acc = tl
    enqueue_copies(sc, tl, act, n, t_route)
    ch = sc[P_CHUNKS]
    t = t_route
    for r in range(n):
        k = act[r, 0]
        if k == PREFETCH:
            continue
        l, e, s, i = act[r, 1], act[r, 2], act[r, 3], act[r, 4]
        gpu = 1.0                       # the share of the expert's rows the GPU computes
        back = 0.0
        if k == CPU or k == SPLIT:      # hybrid: the expert (CPU) or its rows [s/GRID, 1) (SPLIT) on the host
            gpu = 0.0 if k == CPU else s / SPLIT_GRID
            start = max(t_route + sc[P_ACT], acc[A_CPU])
            c = interp(cpu_tok, cpu_s, req_ntok[i]) * sc[P_CONT_CPU] * (1.0 - gpu)
            acc[A_CPU] = start + c
            acc[A_CPU_BUSY] += c
            back = start + c + sc[P_ACT]
            if k == CPU:
                if back > t:
                    acc[A_STALL] += back - t
                    t = back
                continue
        f = interp(ffn_tok, ffn_s, req_ntok[i]) * gpu
        end = expert_end(t, f, ready[l, e], ch)
        acc[A_STALL] += end - (t + f)
        acc[A_COMPUTE] += f
        t = end
        if k == SPLIT:                  # split: the host's part is added when it is back
            if back > t:
                acc[A_STALL] += back - t
                t = back
        else:
            slot_free[l, s] = t
    return t
