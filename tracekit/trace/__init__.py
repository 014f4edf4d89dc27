"""Trace schema, reader and writer: the only contract between record, replay and live."""

from tracekit.trace.core import PHASE_DECODE, PHASE_PREFILL, SCHEMA_VERSION, Trace
from tracekit.trace.reader import read_trace

__all__ = ["Trace", "read_trace", "SCHEMA_VERSION", "PHASE_PREFILL", "PHASE_DECODE"]
