"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input or environment (not a bug in tracekit)."""

    exit_code = 2
