"""What a run is built from, shared by training, ``ccar eval`` and ``ccar predict``: the device and precision, the
dataset and model a config names, the loaders, and the run folder's description of its data (``data.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from ..data import DeviceLoader, LongTailData, build_dataset, file_loader
from ..errors import ConfigError, TrainingError
from ..models import build_model
from .config import TrainConfig
from .decoupling import wrap_lws
from .distributed import DistContext

DATA_FILE = "data.json"


def data_description(data: LongTailData, image_size: int) -> Dict[str, object]:
    """What predicting needs of the training data, without the data: classes, shapes, normalisation."""
    return {"name": data.name, "num_classes": data.num_classes, "class_names": data.class_names,
            "class_counts": data.class_counts, "input_shape": list(data.input_shape), "kind": data.kind,
            "mean": list(data.augment.mean), "std": list(data.augment.std), "image_size": image_size}


def save_data_description(data: LongTailData, path: Path, image_size: int) -> None:
    path.write_text(json.dumps(data_description(data, image_size), indent=1))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it. Without it PyTorch's bf16
    convolutions fall back to a reference kernel ~12x slower than float32 (docs/benchmarks.md)."""
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


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` (None: float32). ``auto`` is bf16 on CUDA devices that support it and on CPUs
    with native bf16 (:func:`native_bf16_cpu`; the default job's accuracy is unchanged by it within the seed spread,
    docs/benchmarks.md), float32 elsewhere."""
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else None
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mode not in choices:
        raise ConfigError(f"amp must be one of auto, bf16, fp16, off; got {mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=off on the CPU")
    return choices[mode]


def dataset_from_config(cfg: TrainConfig) -> LongTailData:
    """The configured dataset (splits, class counts) -- the same for training, evaluation and every rank."""
    return build_dataset(cfg.dataset, cfg.data_root, cfg.imbalance, cfg.profile, cfg.val_fraction, cfg.seed,
                         n_max=cfg.n_max, label_column=cfg.label_column, csv_impute=cfg.csv_impute,
                         test_fraction=cfg.test_fraction, image_size=cfg.image_size, in_memory=cfg.in_memory,
                         progress=cfg.progress, gaussian=cfg.synthetic)


def use_channels_last(cfg: TrainConfig, data: LongTailData) -> bool:
    """``channels_last=auto``: the channels-last memory layout for convolutional models on images (CPU and CUDA),
    where it measured 1.3-1.6x faster end to end on this project's CPU (docs/benchmarks.md); never for tables."""
    if cfg.channels_last != "auto":
        return cfg.channels_last == "true"
    return len(data.input_shape) == 3 and cfg.model.name != "mlp"


def model_from_config(cfg: TrainConfig, data: LongTailData) -> torch.nn.Module:
    """The configured model for ``data``; ``model.head=auto`` gives LDAM its cosine classifier."""
    if cfg.model.head not in ("auto", "linear", "cosine"):
        raise ConfigError(f"model.head must be auto, linear or cosine; got {cfg.model.head!r}")
    if len(data.input_shape) == 1 and cfg.model.name != "mlp":
        raise ConfigError(f"model.name={cfg.model.name} is for images; {data.name} has {data.input_shape[0]} features "
                          f"per row: use model.name=mlp (model.hidden=[] is a linear model)")
    cosine = cfg.model.head == "cosine" or (cfg.model.head == "auto" and cfg.loss.uses_ldam)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, width=cfg.model.width,
                        depth=cfg.model.depth, hidden=cfg.model.hidden, cosine_head=cosine)
    return wrap_lws(model, data.num_classes) if cfg.retrain == "lws" else model


def make_loaders(data: LongTailData, cfg: TrainConfig, device: torch.device, ctx: DistContext):
    """(train loader, eval loader factory). Small sets: device-resident tensors; file sets: DataLoader workers."""
    bs = cfg.optim.batch_size
    if data.in_memory:
        storage = device if cfg.resident else torch.device("cpu")
        if storage.type == "cuda":
            needed = sum(t.numel() * t.element_size() for split in (data.train, data.val, data.test) for t in split)
            free, _ = torch.cuda.mem_get_info(storage)
            if needed > 0.5 * free:
                raise TrainingError(
                    f"{data.name}: keeping the data on {storage} needs {needed / 2**30:.2f} GiB but only "
                    f"{free / 2**30:.2f} GiB are free; set resident=false to stream batches from host memory"
                )
        # torch.compile wants static shapes: drop the last partial batch instead of recompiling for it.
        train = DeviceLoader(*data.train, bs, data.augment, shuffle=True, drop_last=cfg.compile, seed=cfg.seed,
                             device=storage, rank=ctx.rank, world_size=ctx.world_size, sampler=cfg.sampler,
                             sampler_epoch=cfg.sampler_epoch, epochs=cfg.epochs)

        def eval_batches(split):
            return DeviceLoader(*split, max(bs, 512), None, shuffle=False, device=storage,
                                rank=ctx.rank, world_size=ctx.world_size)
    else:
        train = file_loader(data.train, bs, True, cfg.workers, cfg.seed, ctx.rank, ctx.world_size, cfg.image_size,
                            cfg.sampler, cfg.sampler_epoch, cfg.epochs)

        def eval_batches(split):
            return file_loader(split, bs, False, cfg.workers, cfg.seed, ctx.rank, ctx.world_size, cfg.image_size)
    return train, eval_batches
