"""Where and how a run computes: the device, the precision (and the one autocast helper), CPU threads, progress.

The precision a run trains in is decided once (:func:`resolve_precision`), printed in the run's summary and
recorded in ``metrics.json``, with the reason (``amp=auto``'s choice depends on the machine).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it. Without it PyTorch's bf16
    convolutions fall back to a reference kernel and a training step is 10-13x slower than in float32
    (docs/benchmarks.md). ``CCAR_NATIVE_BF16=0`` or ``1`` overrides the detection (the tests pin 0, so that the same
    commit computes the same numbers on every CPU)."""
    override = os.environ.get("CCAR_NATIVE_BF16")
    if override in ("0", "1"):
        return override == "1"
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN or without the query
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu")
    return device


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: float32 throughout) and why it was chosen. Loss math is float32 always."""

    dtype: Optional[torch.dtype]
    why: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "float32")

    def describe(self) -> str:
        """``bf16 autocast (native bf16 CPU)``, ``float32 (amp=off)``, ..."""
        return f"{self.name}{' autocast' if self.dtype is not None else ''} ({self.why})"

    def autocast(self, device: torch.device, cache: bool = True):
        """The context every forward pass of the run runs in (training, evaluation, features). ``cache=False`` for
        CUDA graph capture, which autocast's cache of cast weights would break."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """``amp``'s precision on ``device``. ``auto`` is bf16 on CUDA devices that support it and on CPUs with native
    bf16 (:func:`native_bf16_cpu`; the default job's accuracy is unchanged by it within the seed spread,
    docs/benchmarks.md), float32 elsewhere."""
    if mode == "auto":
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
            return Precision(torch.bfloat16 if ok else None, "amp=auto: " + ("CUDA with bf16" if ok else
                                                                             "this CUDA device has no bf16"))
        if device.type == "cpu" and native_bf16_cpu():
            return Precision(torch.bfloat16, "amp=auto: native bf16 CPU")
        return Precision(None, "amp=auto: no native bf16 on this CPU" if device.type == "cpu" else
                         f"amp=auto on {device.type}")
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mode not in choices:
        raise ConfigError(f"amp must be one of auto, bf16, fp16, off; got {mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=off on the CPU")
    return Precision(choices[mode], f"amp={mode}")


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` (None: float32); see :func:`resolve_precision`."""
    return resolve_precision(mode, device).dtype


def progress(total: int, enabled: bool, description: str = "", unit: str = "step"):
    """A tqdm bar on stderr (disabled: a bar that draws nothing, so callers never branch on it)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not enabled or None, dynamic_ncols=True, leave=False, unit=unit, file=sys.stderr)
    if description:
        bar.set_description(description)
    return bar


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
