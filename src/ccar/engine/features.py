"""The frozen-backbone fast path: when only the classifier trains (``finetune=linear``, or ``cache_features=true``
for a classifier re-training), the backbone runs once over train / val / test and every epoch, every evaluation
and every post-hoc method (tau-norm, post-hoc LA) then works on the cached features -- the classifier's inputs.

``cache_features``: ``auto`` (on for ``finetune=linear``), ``true`` (any frozen backbone: ``finetune=linear`` or a
``ccar retrain`` stage), ``false``. Features come from un-augmented images: training-time augmentation does not apply
to cached features (``cache_features=false`` keeps it, at the price of a backbone pass per step).

``feature_cache=DIR`` keeps the features in ``DIR/<key>.safetensors``, the key a hash of what decides them (data,
split seed, model, its weight files, precision); a sweep sets it to its own ``features/`` folder, so that the
methods sharing one frozen backbone compute its features once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import TrainConfig, to_dict
from ..data import Augment, LongTailData
from ..models.heads import classifier, classifier_inputs, feature_norm_of
from .checkpoint import atomic_write
from .distributed import gather_in_order
from .inference import predict
from .run import Run, split_size
from .runtime import progress

# The config keys that decide the features (everything else -- loss, optimiser, epochs, sampler -- only the head).
FEATURE_KEYS = ("dataset", "data_root", "imbalance", "n_max", "profile", "classes", "val_fraction", "seed", "image_size",
                "test_fraction", "label_column", "csv_impute", "synthetic", "amp", "model", "finetune", "lora")


def uses_cache(cfg: TrainConfig) -> bool:
    """Whether this run trains its classifier on cached features (see the module docstring)."""
    if cfg.retrain == "las":  # its BatchNorm statistics follow the re-sampled images: the backbone must run
        return False
    if cfg.cache_features == "auto":
        return cfg.finetune == "linear"
    return cfg.cache_features == "true"  # validate() refused it for a backbone that trains


def _fingerprint(path: Optional[str]) -> Optional[list]:
    if not path:
        return None
    p = Path(path)
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(cfg: TrainConfig) -> str:
    """Hash of what decides the features: the data and its split, the model and the files its weights come from."""
    from .. import __version__

    resolved = to_dict(cfg)
    ident: Dict[str, object] = {k: resolved[k] for k in FEATURE_KEYS}
    # the head is what trains; its input statistics are fitted on the raw features the cache keeps
    ident["model"] = {k: v for k, v in resolved["model"].items() if k not in ("head", "feature_norm")}
    ident["weights"] = _fingerprint(cfg.model.weights)
    if cfg.parent and cfg.finetune != "linear":  # a re-trained run's backbone is its parent's (a linear parent
        ident["parent"] = _fingerprint(str(Path(cfg.parent) / "best.safetensors"))  # saved only its classifier)
    ident["version"] = __version__
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def extract(run: Run, batches, bar=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(classifier inputs as float32, targets) of a whole split, in the split's order; under data parallelism each
    rank runs its shard and the shards are gathered."""
    captured: list = []
    hook = classifier_inputs(run.model, captured, to_float=True)
    try:
        _, targets = predict(run, batches, bar)
    finally:
        hook.remove()
    return gather_in_order(run.dist, torch.cat(captured), targets.to(run.device), batches)


def _read(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError):  # absent, or cut short by a crash: computed again
        return None


def _matches(tensors: Dict[str, torch.Tensor], data: LongTailData, splits) -> bool:
    """Whether cached features belong to ``data``: the same labels, split by split, in the same order."""
    for s in splits:
        split = getattr(data, s)
        labels = torch.as_tensor(split[1] if isinstance(split, tuple) else split.targets).long().cpu()
        cached = tensors.get(f"{s}_y", torch.zeros(0, dtype=torch.long)).cpu()
        if not torch.equal(cached, labels):
            return False
    return True


def _write(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """Atomic (a concurrent reader sees all or nothing; a crash leaves no half file under the cache's name)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def cached_features(run: Run) -> Run:
    """``run`` with every split of its data replaced by the frozen backbone's features (computed, or read from
    ``feature_cache``), and its model's ``forward`` its classifier (:func:`head_only`)."""
    cfg, data, splits = run.cfg, run.data, ("train", "val", "test")
    path = Path(cfg.feature_cache) / f"{cache_key(cfg)}.safetensors" if cfg.feature_cache else None
    tensors = _read(path) if path is not None else None
    if tensors is not None and not _matches(tensors, data, splits):  # the files changed under the same settings
        tensors = None
    if not run.dist.broadcast_object(tensors is not None):  # every rank computes (the ranks gather) or every rank reads
        tensors = None
    t0 = time.perf_counter()
    if tensors is None:
        bar = progress(sum(split_size(getattr(data, s)) for s in splits), cfg.progress and run.dist.is_main,
                       "backbone features", unit="img")
        tensors = {}
        for s in splits:
            if split_size(getattr(data, s)):
                tensors[f"{s}_x"], tensors[f"{s}_y"] = extract(run, run.eval_batches(getattr(data, s)), bar)
        bar.close()
        if path is not None and run.dist.is_main:
            _write(path, {k: v.cpu() for k, v in tensors.items()})
        how = f"{time.perf_counter() - t0:.1f} s" + (f", cached in {path}" if path is not None else "")
    else:
        how = f"read from {path}"
    width = tensors["train_x"].shape[1]
    empty = (torch.zeros(0, width), torch.zeros(0, dtype=torch.long))
    parts = {s: (tensors[f"{s}_x"].cpu(), tensors[f"{s}_y"].cpu()) if f"{s}_x" in tensors else empty for s in splits}
    if run.dist.is_main:
        run.log(f"features: the frozen backbone ran once over train/val/test ({width} features per image; {how}); "
                f"the classifier trains on them, without training-time augmentation (cache_features=false keeps it)")
    features = dataclasses.replace(data, **parts, augment=Augment(mean=(0.0,), std=(1.0,)), input_shape=(width,),
                                   kind="features", note=data.note + "; classifier trained on cached backbone features")
    return dataclasses.replace(run, data=features, model=head_only(run.model), prepare=lambda x: x)


def head_only(model: nn.Module) -> nn.Module:
    """Make ``model(x)`` its classifier applied to features ``x``: the run then trains, evaluates and
    tau-normalises the same modules, and saves the same state-dict keys, as without the cache."""
    head = classifier(model)
    model.forward = lambda x: head(x)  # the module's call, not its forward: hooks on the head still run (tau-norm)
    return model


def fit_feature_norm(run: Run, train_features: Optional[torch.Tensor] = None) -> None:
    """``model.feature_norm=standardize``: the classifier's input statistics from the training split's features
    (the cached ones, else one un-augmented pass of the frozen backbone); a no-op for other modes."""
    norm = feature_norm_of(run.model)
    if norm is None or norm.mode != "standardize":
        return
    if train_features is None:
        train_features, _ = extract(run, run.eval_batches(run.data.train))
    norm.fit(train_features)
    if run.dist.is_main:
        run.log(f"model.feature_norm: the classifier's inputs standardised with the training split's statistics (std "
                f"{float(norm.std.min()):.3g}..{float(norm.std.max()):.3g}), kept with the weights")
