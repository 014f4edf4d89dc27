"""Output files every command writes (traces, replay rows and plots, hardware profiles): checked
before any work starts, and written whole or not at all."""

from __future__ import annotations

import os
from typing import Callable

from tracekit.errors import UserError


def check_new_file(path: str | os.PathLike, force: bool) -> str:
    """path as str, once it names a file that may be (over)written: not a folder (nor a name ending in
    a separator), in an existing, writable folder, and new unless force."""
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.basename(path):
        raise UserError(f"{path}: names a folder; choose a file name")
    if os.path.exists(path) and not force:
        raise UserError(f"{path}: already exists (pass --force to overwrite it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: output folder is not writable")
    return path


def check_new_files(paths: dict[str, str | None], inputs: list[str], force: bool) -> None:
    """check_new_file for each named output ({"--out": path, ...}; None: not asked for), and that no two
    name one file and none names an input (which --force must not overwrite either)."""
    seen: dict[str, str] = {}
    for flag, path in paths.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{path}: {seen[real]} and {flag} name the same file; give each its own")
        check_not_input(path, flag, inputs)
        seen[real] = flag
        check_new_file(path, force)


def check_not_input(path: str | os.PathLike, flag: str, inputs: list, what: str = "one of the input files") -> None:
    """Refuse an output path that is one of the command's inputs: --force must not overwrite those either."""
    if os.path.realpath(path) in {os.path.realpath(p) for p in inputs if p is not None and os.path.exists(p)}:
        raise UserError(f"{os.fspath(path)}: {flag} names {what}; refusing to overwrite it")


def write_atomically(path: str, tmp: str, write: Callable[[str], object]) -> None:
    """write(tmp), then rename it onto path. A failure (unwritable place, full disk) is one error line
    and leaves neither a half-written file nor the old one damaged."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"{path}: cannot write it ({getattr(exc, 'strerror', None) or exc})") from None
