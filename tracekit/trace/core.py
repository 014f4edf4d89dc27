"""The in-memory trace: the one contract between record, replay and live.

Every reader (native tracekit Parquet, long interchange Parquet) returns a `Trace`.
Arrays are token-major: one row per (step, token) position, sorted by (step, seq_id, position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
MAX_EXPERTS = int(np.iinfo(np.int16).max)    # expert ids are kept as int16
MAX_ENTRIES = 2**31                          # most entries of a dense [tokens, layers, top_k] array
INCOMPLETE = "an incomplete recording (killed mid-way): its flushed rows only"   # replay's and live's note
PHASE_PREFILL = 0
PHASE_DECODE = 1


@dataclass
class Trace:
    path: str
    format: str                      # "tracekit" | "long"
    complete: bool                   # False for a recording that was killed mid-way
    num_layers: int                  # L
    num_experts: int                 # E
    top_k: int                       # K
    seq_id: np.ndarray               # [T] int32
    step: np.ndarray                 # [T] int32, forward-pass index, non-decreasing
    phase: np.ndarray                # [T] int8, 0 prefill / 1 decode
    position: np.ndarray             # [T] int32
    token_id: np.ndarray             # [T] int32 (-1 when unknown)
    experts: np.ndarray              # [T, L, K] int16, ordered by rank; -1 where the event is missing
    weights: np.ndarray              # [T, L, K] float32
    logits: np.ndarray | None = None         # [T, L, E] float32 (tracekit traces only)
    hidden: np.ndarray | None = None         # [T, L, D] float16/float32 hidden state entering each MoE block
    router: np.ndarray | None = None         # [L, E, H] float32 router weights
    hidden_kind: str = "none"                # none | full | proj:N
    hidden_proj_seed: int | None = None      # seed of the random projection (proj:N)
    meta: dict = field(default_factory=dict)  # model facts, versions, generation settings, source

    @property
    def num_tokens(self) -> int:
        return int(self.seq_id.shape[0])

    @property
    def num_steps(self) -> int:
        return int(np.unique(self.step).shape[0])

    @property
    def expert_bytes(self) -> int | None:
        v = self.meta.get("bytes_per_expert")
        if not v:
            return None
        try:
            b = int(float(v))
        except (TypeError, ValueError):
            b = 0
        if b <= 0:
            from tracekit.errors import UserError

            raise UserError(f"{self.path}: metadata bytes_per_expert {v!r} is not a positive number; "
                            "pass --expert-mb")
        return b

    def with_token_steps(self) -> "Trace":
        """`--steps tokens`: every token becomes its own decode-like step, in (seq_id, position)
        order. For teacher-forced traces, which have no decode phase, so that per-token metrics,
        tokens/s and predictions (made on decode steps) apply to every token."""
        import dataclasses

        order = np.lexsort((self.position, self.seq_id, self.step))
        step = np.empty(self.num_tokens, dtype=np.int32)
        step[order] = np.arange(self.num_tokens, dtype=np.int32)
        return dataclasses.replace(self, step=step, phase=np.full(self.num_tokens, 1, dtype=np.int8))
