"""What a run is built from, shared by training, ``ccar eval`` and ``ccar predict``: the dataset and model a config
names, the loaders, the run folder's description of its data (``data.json``), and :func:`assemble`, which puts them
together into a :class:`~ccar.engine.run.Run` (the feature cache, fine-tuning mode, text-initialised head and
retrain surgery happen here, while the model is assembled, never in the training loop)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..config import TrainConfig
from ..data import DeviceLoader, LongTailData, build_dataset, file_loader, normalize
from ..errors import ConfigError, TrainingError
from ..models import HF_PREFIX, TIMM_PREFIX, build_model, timm_preprocessing
from ..models.families import Contrastive, multi_expert
from ..models.heads import NormedLinear, attach_feature_norm, classifier, wrap_lws
from ..models.pretrained import hf_preprocessing
from . import checkpoint as ckpt
from .decoupling import prepare_retrain
from .distributed import DistContext
from .features import cached_features, fit_feature_norm
from .finetune import apply_finetune, load_pretrained, load_trained
from .run import Run
from .runtime import resolve_device, resolve_precision
from .sync_bn import convert_sync_batchnorm

DATA_FILE = "data.json"


def data_description(data: LongTailData) -> Dict[str, object]:
    """What predicting needs of the training data, without the data: classes, shapes, normalisation."""
    return {"name": data.name, "num_classes": data.num_classes, "class_names": data.class_names,
            "class_counts": data.class_counts, "input_shape": list(data.input_shape), "kind": data.kind,
            "mean": list(data.augment.mean), "std": list(data.augment.std), "image_size": data.image_size,
            "crop_padding": data.augment.crop_padding, "flip": data.augment.flip}


def save_data_description(data: LongTailData, path: Path) -> None:
    path.write_text(json.dumps(data_description(data), indent=1))


def backbone_preprocessing(cfg: TrainConfig):
    """The input size, mean and std a pretrained backbone expects (``hf:`` models, ``timm:`` with
    ``model.pretrained``); None for models trained from scratch."""
    if cfg.model.name.startswith(HF_PREFIX):
        return hf_preprocessing(cfg.model.name[len(HF_PREFIX):])
    if cfg.model.name.startswith(TIMM_PREFIX) and cfg.model.pretrained:
        return timm_preprocessing(cfg.model.name[len(TIMM_PREFIX):])
    return None


def dataset_from_config(cfg: TrainConfig) -> LongTailData:
    """The configured dataset (splits, class counts) -- the same for training, evaluation and every rank. With a
    pretrained backbone, images come at its input size (``image_size=auto``), in colour, normalised its way."""
    image_size, channels, pretrained = cfg.image_size_value, None, backbone_preprocessing(cfg)
    if pretrained is not None:
        image_size, channels = pretrained.size if image_size == "auto" else image_size, 3
    data = build_dataset(cfg.dataset, cfg.data_root, cfg.imbalance, cfg.profile, cfg.val_fraction, cfg.seed,
                         n_max=cfg.n_max, label_column=cfg.label_column, csv_impute=cfg.csv_impute,
                         test_fraction=cfg.test_fraction, image_size=image_size, in_memory=cfg.in_memory,
                         progress=cfg.progress, gaussian=cfg.synthetic, channels=channels,
                         classes=cfg.classes, class_names=cfg.class_names)
    if pretrained is not None and data.image_size:  # one-channel sets (resized and repeated by the model): the mean
        grey = data.input_shape[0] == 1
        mean = (sum(pretrained.mean) / 3,) if grey else pretrained.mean
        std = (sum(pretrained.std) / 3,) if grey else pretrained.std
        data.augment = dataclasses.replace(data.augment, mean=mean, std=std)
        data.note += f"; normalised as {cfg.model.name} expects"
    if cfg.augment.flip != "auto" and data.image_size:  # the builder's choice (photos flip, digits do not) unless set
        data.augment = dataclasses.replace(data.augment, flip=cfg.augment.flip == "true")
    return data


def use_channels_last(cfg: TrainConfig, data: LongTailData) -> bool:
    """``channels_last=auto``: the channels-last memory layout for convolutional models on images (CPU and CUDA),
    where it measured 1.3-1.6x faster end to end on this project's CPU (docs/benchmarks.md); never for tables."""
    if cfg.channels_last != "auto":
        return cfg.channels_last == "true"
    return len(data.input_shape) == 3 and cfg.model.name != "mlp"


def auto_model(input_shape) -> Tuple[str, str]:
    """(model name, why) for ``model.name=auto``: tables and features -> the MLP; colour images -> the compact CNN,
    which reached the best balanced accuracy per CPU-minute on every colour folder measured (32-224 px, 1k-21k
    images; docs/benchmarks.md: ResNet-32, with or without its stem, stayed near chance within those budgets; with
    ``image_size=auto`` colour images larger than 32 px train at 32); grey images up to 64 px -> the compact CNN;
    larger grey images -> ResNet-32 with its downsampling stem. The CIFAR-LT recipes name ResNet-32 themselves
    (configs/cifar*-lt.yaml): a 200-epoch budget is not a CPU-minute.

    >>> auto_model((1, 28, 28))[0], auto_model((3, 32, 32))[0], auto_model((3, 96, 96))[0], auto_model((12,))[0]
    ('cnn', 'cnn', 'cnn', 'mlp')
    """
    if len(input_shape) == 1:
        return "mlp", f"{input_shape[0]} features per row"
    channels, side = input_shape[0], min(input_shape[1:])
    if channels == 3:
        return "cnn", (f"{side} px colour images: the compact CNN, the best balanced accuracy per CPU-minute on colour "
                       f"folders of 32-224 px (docs/benchmarks.md)")
    if side <= 64:
        return "cnn", f"{side} px images"
    return "resnet32", (f"{side} px images: ResNet-32 from scratch with a downsampling stem; for photos a pretrained "
                        f"backbone is usually far better")


def feature_norm_mode(cfg: TrainConfig) -> str:
    """``model.feature_norm`` resolved: ``auto`` standardises the classifier's inputs of a frozen backbone
    (``finetune=linear``, its second stages included), except under ``head.init=text``, whose zero-shot classifier
    expects the backbone's own features."""
    if cfg.model.feature_norm == "auto":
        return "standardize" if cfg.finetune == "linear" and cfg.head.init != "text" else "none"
    return cfg.model.feature_norm


def model_from_config(cfg: TrainConfig, data: LongTailData) -> torch.nn.Module:
    """The configured model for ``data``; ``model.head=auto`` gives LDAM its cosine classifier; ``model.feature_norm``
    puts its input conditioning in front of the classifier. Seeds torch's generator with ``cfg.seed`` first."""
    if cfg.model.head not in ("auto", "linear", "cosine"):
        raise ConfigError(f"model.head must be auto, linear or cosine; got {cfg.model.head!r}")
    if cfg.model.name == "auto":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=auto_model(data.input_shape)[0]))
    if len(data.input_shape) == 1 and cfg.model.name != "mlp":
        raise ConfigError(f"model.name={cfg.model.name} is for images; {data.name} has {data.input_shape[0]} features "
                          f"per row: use model.name=mlp (model.hidden=[] is a linear model)")
    cosine = cfg.model.head == "cosine" or (cfg.model.head == "auto" and cfg.loss.uses_ldam)
    # Initialised from the run's seed (as training does): a frozen random backbone, which no weight file holds, is
    # rebuilt identically by `ccar eval`, `ccar predict` and a second stage.
    torch.manual_seed(cfg.seed)
    if cfg.loss.family is not None:  # (trained whole: finetune=full, no feature norm; validation says so)
        return family_model(cfg, data, cosine)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, width=cfg.model.width,
                        depth=cfg.model.depth, hidden=cfg.model.hidden, cosine_head=cosine,
                        pretrained=cfg.model.pretrained, weights=cfg.model.weights)
    if cfg.model.weights and not (cfg.model.pretrained and cfg.model.name.startswith(TIMM_PREFIX)):  # timm's own
        load_pretrained(model, cfg.model.weights)
    norm = feature_norm_mode(cfg)
    if norm != "none":
        head = classifier(model)
        attach_feature_norm(head, head.in_features if isinstance(head, torch.nn.Linear) else head.weight.shape[0], norm)
    if cfg.retrain == "lws":
        model = wrap_lws(model, data.num_classes)
    return apply_finetune(model, cfg.finetune, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)


def family_model(cfg: TrainConfig, data: LongTailData, cosine: bool) -> torch.nn.Module:
    """The model of a multi-expert loss (RIDE, SADE: :func:`~ccar.models.families.multi_expert`) or a contrastive
    one (PaCo, GPaCo, BCL: :class:`~ccar.models.families.Contrastive` over the configured model)."""
    m, method = cfg.model, cfg.loss.method
    if len(data.input_shape) != 3:
        raise ConfigError(f"loss {method} trains on images (two augmented views, or convolutional experts); "
                          f"{data.name} has vectors of {data.input_shape[0]} values")
    if cfg.loss.family == "experts":
        return multi_expert(m.name, data.num_classes, data.input_shape, m.experts or 3, m.expert_width,
                            width=m.width, depth=m.depth, cosine_head=cosine,
                            router_top=m.router_top if cfg.retrain == "router" else 0,
                            router_scale=float(cfg.loss.scale or 30.0) if cosine else 1.0)
    base = build_model(m.name, data.num_classes, data.input_shape, width=m.width, depth=m.depth, cosine_head=cosine,
                       pretrained=m.pretrained, weights=m.weights)
    if not hasattr(base, "embed"):
        raise ConfigError(f"loss {method} needs a ccar model (resnet32 or cnn) under its projection head; got "
                          f"model.name={m.name}")
    return Contrastive(base, m.projection, prototypes=method == "bcl", queue=m.queue if method == "paco" else 0,
                       momentum=m.key_momentum)


@torch.no_grad()
def init_head_from_text(model: torch.nn.Module, cfg: TrainConfig, data: LongTailData) -> None:
    """``head.init=text``: the classifier of a CLIP/SigLIP backbone starts as its zero-shot classifier over the
    class names (a linear head: rows = scaled text embeddings; a cosine head: their directions)."""
    from ..models.pretrained import text_classifier  # (transformers, an optional extra)

    weight, bias = text_classifier(cfg.model.name[len(HF_PREFIX):], data.class_names, cfg.head.prompt)
    head = classifier(model)
    cosine = isinstance(head, NormedLinear)  # (its weight is stored transposed: features x classes)
    target = weight.t() if cosine else weight
    if not isinstance(head, (NormedLinear, torch.nn.Linear)) or head.weight.shape != target.shape:
        raise ConfigError(f"head.init=text: the classifier ({type(head).__name__}, {tuple(head.weight.shape)}) does "
                          f"not take the {weight.shape[1]}-dimensional text embeddings of {cfg.model.name}")
    head.weight.copy_(target)
    if not cosine and head.bias is not None:
        head.bias.copy_(bias)


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
        train = DeviceLoader(*data.train, bs, data.augment, shuffle=True, drop_last=cfg.compile == "true", seed=cfg.seed,
                             device=storage, rank=ctx.rank, world_size=ctx.world_size, sampler=cfg.sampler,
                             sampler_epoch=cfg.sampler_epoch, epochs=cfg.epochs)

        def eval_batches(split):
            return DeviceLoader(*split, max(bs, 512), None, shuffle=False, device=storage,
                                rank=ctx.rank, world_size=ctx.world_size)
    else:
        train = file_loader(data.train, bs, True, cfg.workers, cfg.seed, ctx.rank, ctx.world_size, data.image_size,
                            cfg.sampler, cfg.sampler_epoch, cfg.epochs, data.augment.flip)

        def eval_batches(split):
            return file_loader(split, bs, False, cfg.workers, cfg.seed, ctx.rank, ctx.world_size, data.image_size)
    return train, eval_batches


def build_data(cfg: TrainConfig, dist: DistContext, device: torch.device, log=print) -> LongTailData:
    """The run's data, the same on every rank (checked); ``model.name=auto`` is resolved from it here, once, so that
    ``config.yaml`` (eval, predict, resume) names the model itself."""
    data = dataset_from_config(cfg)
    if dist.enabled:  # every rank must have built the same split; shards differ, the counts may not
        mine = torch.tensor(data.class_counts, dtype=torch.float64, device=device)
        if not torch.equal(dist.all_reduce_sum(mine.clone()), mine * dist.world_size):
            raise TrainingError(f"rank {dist.rank}: class counts differ between processes; check data_root on every node")
    if cfg.model.name == "auto":
        cfg.model.name, why = auto_model(data.input_shape)
        if dist.is_main:
            log(f"model.name=auto: {cfg.model.name} ({why})")
    return data


def _model(cfg: TrainConfig, data: LongTailData, dist: DistContext, device: torch.device, resumed: bool
           ) -> torch.nn.Module:
    """The model as it starts training: built, its head text-initialised (a fresh run: a resumed one's head is in
    its checkpoint), on the device, a second stage's surgery done, SyncBN and the memory layout set."""
    model = model_from_config(cfg, data)
    if cfg.head.init == "text" and not resumed and not cfg.retrain:
        init_head_from_text(model, cfg, data)
    model = model.to(device)
    if cfg.retrain:  # second stage: the parent's best model, all but the classifier frozen
        prepare_retrain(model, cfg.retrain, ckpt.load_weights(Path(cfg.parent) / "best.safetensors"), cfg.finetune)
    if cfg.sync_bn and dist.enabled:
        model = convert_sync_batchnorm(model, device).to(device)
    if use_channels_last(cfg, data):
        model = model.to(memory_format=torch.channels_last)
    return model


def assemble(cfg: TrainConfig, data: LongTailData, dist: DistContext, device: torch.device, log=print,
             resumed: bool = False) -> Tuple[Run, object]:
    """The :class:`Run` of ``cfg`` on ``data`` and its training loader."""
    model = _model(cfg, data, dist, device, resumed)
    train_loader, eval_batches = make_loaders(data, cfg, device, dist)
    prepare = functools.partial(normalize, augment=data.augment, channels_last=use_channels_last(cfg, data))
    run = Run(cfg, data, model, device, resolve_precision(cfg.amp, device), dist, eval_batches, prepare, log)
    return run, train_loader


def with_feature_cache(run: Run) -> Tuple[Run, object]:
    """A frozen backbone's run on its features, computed once (:mod:`ccar.engine.features`), with loaders over
    them: from here on ``run.model(features)`` is its classifier's logits."""
    run = cached_features(run)
    fit_feature_norm(run, run.data.train[0])
    train_loader, eval_batches = make_loaders(run.data, run.cfg, run.device, run.dist)
    return dataclasses.replace(run, eval_batches=eval_batches), train_loader


def load_run(cfg: TrainConfig, weights: Path) -> Run:
    """A finished run's model with its saved ``weights``, on its data, in one process: what ``ccar eval`` scores
    (and ``ccar predict`` when it chooses tau on the validation split)."""
    device, dist = resolve_device(cfg.device), DistContext()
    data = dataset_from_config(cfg)
    model = model_from_config(cfg, data).to(device)
    load_trained(model, ckpt.load_weights(weights), cfg.finetune, str(weights))
    _, eval_batches = make_loaders(data, cfg, device, dist)
    prepare = functools.partial(normalize, augment=data.augment, channels_last=use_channels_last(cfg, data))
    return Run(cfg, data, model, device, resolve_precision(cfg.amp, device), dist, eval_batches, prepare)
