"""`tracekit` entry point. Heavy libraries (torch, transformers, numba) load inside commands only."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Record MoE routing traces, replay caching/prefetch policies offline, and "
                       "measure them live on a GPU.")


@app.command()
def version() -> None:
    """Print the tracekit version."""
    from tracekit import __version__

    print(__version__)


def _version_flag(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", callback=_version_flag, is_eager=True,
                                            help="Print the tracekit version and exit.")) -> None:
    pass


def _register() -> None:
    # Each module adds its command to `app`; none of them imports torch at module level.
    from tracekit.cli import inspect_cmd, live, record, replay  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    from tracekit.errors import UserError

    _register()
    try:
        # typer (standalone_mode=False) turns Ctrl-C into Exit(130) and *returns* an Exit's code
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            if rc == 130:
                print("error: interrupted", file=sys.stderr)
            sys.exit(rc)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:                       # numpy's too-large allocations too (a MemoryError subclass)
        print("error: out of memory: this input needs more memory than this machine can give", file=sys.stderr)
        sys.exit(1)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        usage, abort = _click_errors()
        if isinstance(exc, usage):
            print(f"error: {_usage_line(exc)}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(130)
        raise


def _usage_line(exc) -> str:
    # click's message and where to look, on one line (click's own show() prints four)
    msg = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"{msg} (see: {ctx.command_path if ctx is not None else 'tracekit'} --help)"


def _click_errors() -> tuple[tuple, tuple]:
    # (ClickException classes, Abort classes). typer >= 0.20 raises its own (typer._click.exceptions,
    # typer.exceptions), which are not click's; older typers raise click's.
    import importlib

    usage, abort = [], []
    for mod, u, a in (("typer._click.exceptions", "ClickException", None), ("typer.exceptions", None, "Abort"),
                      ("click.exceptions", "ClickException", "Abort")):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        usage += [getattr(m, u)] if u and hasattr(m, u) else []
        abort += [getattr(m, a)] if a and hasattr(m, a) else []
    return tuple(usage), tuple(abort)


if __name__ == "__main__":
    main()
