"""The compiled CPU kernel of CCAR, built on first use and cached.

On small batches a loss is dominated by fixed per-call costs, not arithmetic: every PyTorch op dispatched from
Python and every autograd node with a Python backward costs microseconds. ``csrc/ccar_cpu.cpp`` is the whole CCAR
loss (any base) as one autograd node with a C++ forward and backward, so on CPU it costs about what
``F.cross_entropy`` costs. It is compiled once per machine with ``torch.utils.cpp_extension`` (needs a C++
compiler; ``ninja`` comes with ccar) and cached under ``~/.cache/ccar/kernels`` (``$CCAR_CACHE``). Without a
compiler, ccar says so once and uses the pure-PyTorch path, which gives the same values and gradients up to float
rounding.

``CCAR_NATIVE`` chooses: ``auto`` (default: use the kernel when it builds), ``on`` (fail loudly if it does not),
``off`` (never build or use it). ``ccar kernel`` builds it ahead of time and reports which path is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

from ..errors import LossError

ENV = "CCAR_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "ccar_cpu.cpp"
_MODES = {"auto": "auto", "": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off", "false": "off"}
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (a build takes under 2 minutes)
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded kernel or None; "reason": why there is none


def mode() -> str:
    """The ``CCAR_NATIVE`` setting: ``auto``, ``on`` or ``off``."""
    raw = os.environ.get(ENV, "auto")
    try:
        return _MODES[raw.strip().lower()]
    except KeyError:
        raise LossError(f"{ENV}={raw!r} is not a valid setting; use auto, on or off") from None


def build_name() -> str:
    """Extension name: changes with the source and with the torch build and Python it is compiled against (two
    environments sharing one cache never rebuild, or load, each other's kernel)."""
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    tag = f"{torch.__version__}|{torch_dir}|{sys.version_info[0]}.{sys.version_info[1]}|".encode() + SOURCE.read_bytes()
    return f"ccar_cpu_{hashlib.sha256(tag).hexdigest()[:12]}"


def build_dir() -> Path:
    from ..data.downloads import cache_dir

    return cache_dir() / "kernels" / build_name()


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> ModuleType:
    """Load the cached kernel, or compile it first; raises whatever the toolchain raises.

    A finished build is imported directly (no lock, no ninja run), so a process killed at any point never leaves
    the others waiting; ``ok`` is written only after a build loaded successfully.
    """
    from torch.utils import cpp_extension

    directory = build_dir()
    library = directory / f"{directory.name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    if (directory / "ok").exists():
        try:
            return _import(library)
        except (ImportError, OSError):
            pass  # damaged: build it again below
    try:  # the ninja wheel's binary, for environments where ninja is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    print(f"ccar: compiling the CCAR CPU kernel once (about 20-60 s) into {directory}; "
          f"{ENV}=off skips it", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # left by a build that was killed; torch would wait on it forever
    # Compile a copy kept in the build folder: the build's inputs then do not depend on where this checkout lives.
    source = directory / SOURCE.name
    code = SOURCE.read_bytes()
    if not source.exists() or source.read_bytes() != code:
        tmp = directory / f".{SOURCE.name}.{os.getpid()}.tmp"
        tmp.write_bytes(code)
        os.replace(tmp, source)
    module = cpp_extension.load(
        name=directory.name, sources=[str(source)], extra_cflags=["-O3"], build_directory=str(directory),
        with_cuda=False, verbose=verbose,
    )
    (directory / "ok").touch()
    return module


def _load() -> Optional[ModuleType]:
    setting = mode()
    if setting == "off":
        _state["reason"] = f"{ENV}=off"
        return None
    try:
        return build()
    except Exception as exc:  # compiler missing, build error, broken cache: the PyTorch path still works
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[-1] if lines else exc!r}"
        _state["reason"] = reason
        if setting == "on":
            raise LossError(f"{ENV}=on but the compiled CCAR kernel could not be built ({reason})") from exc
        warnings.warn(
            f"ccar: compiled CPU kernel unavailable ({reason}); using the pure-PyTorch CCAR path (the same math, "
            f"more per-call overhead on small batches). Set {ENV}=off to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def kernel() -> Optional[ModuleType]:
    """The loaded kernel (building it on the first call), or None when it is off or unavailable."""
    try:
        return _state["module"]
    except KeyError:
        with _lock:
            if "module" not in _state:
                _state["module"] = _load()
        return _state["module"]


def status() -> str:
    """One line: which CCAR implementation CPU tensors get in this process."""
    module = kernel()
    if module is not None:
        return f"compiled kernel ({module.__file__})"
    return f"pure-PyTorch path ({_state.get('reason', 'unavailable')})"


def reset() -> None:
    """Forget the loaded state so that the next call reads ``CCAR_NATIVE`` again (tests)."""
    with _lock:
        _state.clear()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the pure-PyTorch path inside the block (tests and benchmarks compare the two)."""
    with _lock:
        saved = dict(_state)
        _state["module"] = None
        _state["reason"] = "disabled in this block"
    try:
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)

