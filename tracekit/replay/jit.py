"""Per-policy compiled engines, cached on disk.

numba cannot cache closures, so for each policy we write a copy of engine_template.py (plus
demand_template.py, the demand-only loop, and prefetch_template.py, the fused prefetching loop) with the
policy's functions bound to module globals into a cache folder, import it, and let numba's
`cache=True` keep the machine code. The file name carries a hash of every source it depends on,
so editing a policy or the controller recompiles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from functools import lru_cache
from pathlib import Path

from tracekit.policies import PolicySpec

_HERE = Path(__file__).parent
_TEMPLATES = ("engine_template.py", "demand_template.py", "prefetch_template.py")
_DEPS = _TEMPLATES + ("controller.py", "cost.py", "../policies/bits.py", "../policies/base.py",
                       "../policies/simd.py")


@lru_cache(maxsize=None)
def cache_dir() -> Path:
    d = os.environ.get("TRACEKIT_JIT_DIR")
    if not d:
        base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "tracekit-jit")
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise PermissionError(13, "not writable")
        return Path(d)
    except OSError as exc:                    # e.g. a read-only home: compile into a temporary folder
        import tempfile

        from tracekit.errors import UserError

        alt = os.path.join(tempfile.gettempdir(), f"tracekit-jit-{os.getuid() if hasattr(os, 'getuid') else 0}")
        try:
            Path(alt).mkdir(parents=True, exist_ok=True)
        except OSError:
            raise UserError(f"no writable folder for compiled replay engines ({d}: {exc.strerror or exc}; "
                            f"{alt} neither); set TRACEKIT_JIT_DIR") from None
        print(f"warning: {d}: {exc.strerror or exc}; compiled replay engines go to {alt} "
              "(set TRACEKIT_JIT_DIR to choose)", file=sys.stderr)
        return Path(alt)


def _binding_source(spec: PolicySpec) -> str:
    names = ("on_access", "on_insert", "on_evict", "victim", "observe", "predict")
    lines = ["from tracekit.policies import get as _get", f"_spec = _get({spec.name!r})"]
    # re-jitted without reference counting and inlined into the controller (numba's NRT
    # increfs/decrefs of array views otherwise dominate the per-request cost)
    lines += [f"{n} = njit(_nrt=False, inline='always')(_spec.{n}.py_func)" for n in names]
    return "\n".join(lines)


def _policy_files(spec: PolicySpec) -> list[Path]:
    files = {Path(inspect.getfile(spec.make_state))}
    for fn in (spec.on_access, spec.on_insert, spec.on_evict, spec.victim, spec.observe, spec.predict):
        py = getattr(fn, "py_func", fn)
        files.add(Path(inspect.getfile(py)))
    return sorted(files)


@lru_cache(maxsize=None)
def engine_module(spec: PolicySpec):
    template = "\n\n".join((_HERE / f).read_text() for f in _TEMPLATES)
    src = template.replace("# {POLICY_BINDINGS}", _binding_source(spec))
    h = hashlib.sha1(src.encode())
    for f in [_HERE / d for d in _DEPS] + _policy_files(spec):
        h.update(f.read_bytes())
    tag = f"{spec.name.replace('-', '_')}_{h.hexdigest()[:12]}"
    path = cache_dir() / f"tk_engine_{tag}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(src)
        os.replace(tmp, path)
    name = f"tracekit_jit_{tag}"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[name] = mod
    mspec.loader.exec_module(mod)
    return mod
