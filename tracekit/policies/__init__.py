"""The policy registry: one file per policy registers it by name (Gymnasium style)."""

from __future__ import annotations

from tracekit.errors import UserError
from tracekit.policies.base import NotApplicable, PolicyContext, PolicySpec

REGISTRY: dict[str, PolicySpec] = {}


def register(spec: PolicySpec) -> PolicySpec:
    if spec.name in REGISTRY:
        raise ValueError(f"policy {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> PolicySpec:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    _load_all()
    return list(REGISTRY)


def parse(spec: str) -> list[str]:
    """'all' or a comma list (which may include 'all') -> validated policy names, each once, in order."""
    out: list[str] = []
    for n in (s.strip() for s in spec.split(",")):
        if n:
            out += names() if n == "all" else [get(n).name]
    if not out:
        raise UserError(f"--policy {spec!r} names no policy; give 'all' or names from: {', '.join(names())}")
    return list(dict.fromkeys(out))


def _load_all() -> None:
    if REGISTRY:
        return
    import importlib

    for mod in ("lru", "fifo", "lfu", "belady", "ebco", "markov", "trajectory", "gate_lookahead"):
        try:
            importlib.import_module(f"tracekit.policies.{mod}")
        except ModuleNotFoundError as exc:  # a policy file not written yet
            if exc.name != f"tracekit.policies.{mod}":
                raise


__all__ = ["REGISTRY", "register", "get", "names", "parse", "PolicySpec", "PolicyContext", "NotApplicable"]
