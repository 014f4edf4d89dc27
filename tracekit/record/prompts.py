"""Prompt sources: the built-in mixed set (prose, code, math, Chinese) or a user file (txt / jsonl)."""

from __future__ import annotations

import json
import os
from importlib import resources

from tracekit.errors import UserError

BUILTIN = "builtin:tracekit/record/prompts.jsonl"


def builtin_prompts() -> list[str]:
    text = resources.files("tracekit.record").joinpath("prompts.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, BUILTIN)


def load_prompts(path: str | os.PathLike | None) -> tuple[list[str], str]:
    """-> (prompts, source). txt: one prompt per non-empty line; jsonl: objects with a "prompt" key."""
    if path is None:
        return builtin_prompts(), BUILTIN
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: {'a folder, not a prompts file' if os.path.isdir(path) else 'no such prompts file'}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read prompts ({exc})") from None
    if path.endswith(".jsonl") or path.endswith(".json"):
        prompts = _parse_jsonl(text, path)
    else:
        prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts found")
    return prompts, os.path.abspath(path)


def _parse_jsonl(text: str, where: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            p = obj["prompt"] if isinstance(obj, dict) else None
        except (json.JSONDecodeError, KeyError):
            p = None
        if not isinstance(p, str) or not p:
            raise UserError(f"{where}:{n}: expected a JSON object with a non-empty \"prompt\" string")
        out.append(p)
    return out
