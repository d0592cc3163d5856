"""The compiled CPU kernel of CCAR, built on first use and cached.

On small batches a loss is dominated by fixed per-call costs, not arithmetic: every PyTorch op dispatched from
Python and every autograd node with a Python backward costs microseconds. ``csrc/ccar_cpu.cpp`` is the whole CCAR
loss (any base) as one autograd node with a C++ forward and backward, so on CPU it costs about what
``F.cross_entropy`` costs. It is compiled once per machine with ``torch.utils.cpp_extension`` (needs a C++
compiler; ``ninja`` comes with ccar) and cached under ``~/.cache/ccar/kernels`` (``$CCAR_CACHE``). Without a
compiler, ccar says so once and uses the pure-PyTorch path, which gives the same values and gradients.

``CCAR_NATIVE`` chooses: ``auto`` (default: use the kernel when it builds), ``on`` (fail loudly if it does not),
``off`` (never build or use it). ``ccar kernel`` builds it ahead of time and reports which path is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

from ..errors import LossError

ENV = "CCAR_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "ccar_cpu.cpp"
_MODES = {"auto": "auto", "": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off", "false": "off"}
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
    """Extension name: changes with the source, torch and Python, so a stale build is never loaded."""
    tag = f"{torch.__version__}|{sys.version_info[0]}.{sys.version_info[1]}|".encode() + SOURCE.read_bytes()
    return f"ccar_cpu_{hashlib.sha256(tag).hexdigest()[:12]}"


def build_dir() -> Path:
    from ..data.downloads import cache_dir

    return cache_dir() / "kernels" / build_name()


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernel; raises whatever the toolchain raises."""
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, for environments where ninja is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = build_dir()
    if not any(directory.glob(f"{directory.name}*.so")) and not any(directory.glob(f"{directory.name}*.pyd")):
        print(f"ccar: compiling the CCAR CPU kernel once (about 20-60 s) into {directory}; "
              f"{ENV}=off skips it", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=directory.name, sources=[str(SOURCE)], extra_cflags=["-O3"], build_directory=str(directory),
        with_cuda=False, verbose=verbose,
    )


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
            f"ccar: compiled CPU kernel unavailable ({reason}); using the pure-PyTorch CCAR path (same results, "
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
    kernel()
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

