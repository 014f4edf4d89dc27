"""The tracekit command line (installed as tracekit.cli). Thin: each command lives in its own module."""
