"""Checkpoints as one safetensors file, written atomically (temp file, fsync, rename): pure file I/O.

The file holds the model, the best-on-validation model, the optimizer state and a JSON header (epoch, history,
best metric, config). Nothing is ever unpickled on load: safetensors stores raw tensors and strings only, so a
crafted checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import TrainingError

FORMAT = "ccar-checkpoint-1"
FAULT_ENV = "CCAR_FAULT_INJECT"  # "checkpoint-write": SIGKILL this process between writing and renaming


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path``; a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if os.environ.get(FAULT_ENV) == "checkpoint-write":  # fault injection for the kill-and-resume tests
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{idx}.{key}"] = value
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "plain": plain}  # (a CUDA graph's lr is a tensor: stored as a number)


def _restore_optimizer(optimizer, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["plain"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # How this optimizer computes (a CUDA graph's: fused, its lr a device tensor) is this run's choice, not the
    # checkpoint's: kept; the values come from the checkpoint.
    kept = [{k: g[k] for k in ("lr", "fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for p, entries in optimizer.state.items():  # buffers in their parameter's layout (channels-last): the fused
        for name, value in entries.items():  # update needs equal strides; the values are the same either way
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                entries[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    for group, own in zip(optimizer.param_groups, kept):
        lr = own.pop("lr")
        group.update(own)
        if torch.is_tensor(lr):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr


def save_checkpoint(path: Path, model_state: Dict[str, torch.Tensor], optimizer,
                    best_state: Optional[Dict[str, torch.Tensor]], meta: Dict[str, Any],
                    extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The model's state (what the run trains: :func:`ccar.engine.finetune.saved_state`), the best model's, the
    optimizer's, ``meta`` and ``extra`` tensors (a mid-epoch checkpoint's random states), in one safetensors file
    written atomically."""
    tensors = {"model." + k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    if best_state is not None:
        tensors.update({"best." + k: v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    header = {"format": FORMAT, "meta": json.dumps(meta), "optimizer": json.dumps(opt_meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """(tensors, meta, optimizer meta) of a checkpoint; a corrupt or foreign file raises :class:`TrainingError`."""
    path = Path(path)
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise TrainingError(f"{path} is not a ccar checkpoint (format {header.get('format')!r})")
        return tensors, json.loads(header["meta"]), json.loads(header["optimizer"])
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from exc


def split_prefix(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_optimizer(optimizer, tensors: Dict[str, torch.Tensor], opt_meta: Dict[str, Any]) -> None:
    """The optimizer's state as a checkpoint holds it (``tensors`` and the optimizer meta of
    :func:`read_checkpoint`)."""
    _restore_optimizer(optimizer, tensors, opt_meta)


def save_weights(path: Path, state: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(Path(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(f"cannot read weights {path}: {exc}") from exc
