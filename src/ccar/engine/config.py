"""Typed run configuration: dataclasses, YAML files and ``key=value`` overrides with dotted keys.

Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key and listing the valid ones.
The defaults are the built-in default job: CCAR over logit adjustment on Fashion-MNIST-LT, imbalance 100.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..data.synthetic import GaussianShape
from ..errors import ConfigError


@dataclass
class LossConfig:
    """``name`` in ce, focal, cb, cb-focal, ldam, la, bs, ccar; unset (null) options take the loss's defaults."""

    name: str = "ccar"
    base: Optional[str] = "la"  # ccar only
    omega: Optional[float] = None
    power_base: Optional[float] = None
    detach_weight: Optional[bool] = None
    normalize: Optional[str] = None
    frequency: Optional[str] = None
    strength: Optional[float] = None
    gamma: Optional[float] = None
    beta: Optional[float] = None
    form: Optional[str] = None
    tau: Optional[float] = None
    max_margin: Optional[float] = None
    scale: Optional[float] = None
    smooth_head: Optional[float] = None  # las: label smoothing of the most frequent class (0.4)
    smooth_tail: Optional[float] = None  # las: of the rarest (0.1)
    smooth_shape: Optional[str] = None  # las: concave, linear or convex in between
    drw_epoch: Optional[int] = None
    drw_beta: Optional[float] = None

    def options(self) -> Dict[str, Any]:
        """Keyword options for :func:`ccar.losses.build_loss` (set ones only; ``base`` only for ccar)."""
        opts = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "name"}
        if self.name != "ccar":
            opts.pop("base", None)
        return opts

    @property
    def uses_ldam(self) -> bool:
        return self.name == "ldam" or (self.name == "ccar" and self.base == "ldam")


@dataclass
class ModelConfig:
    name: str = "auto"  # auto (from the data: ccar.engine.setup.auto_model), resnet32, cnn, mlp, resnet50, resnext50, timm:<name>
    width: int = 16  # cnn
    depth: int = 32  # resnet_cifar
    hidden: List[int] = field(default_factory=lambda: [256, 256])  # mlp
    head: str = "auto"  # linear, cosine; auto = cosine for LDAM
    weights: Optional[str] = None  # a .safetensors file to start from (a ccar run's best.safetensors included)
    pretrained: bool = False  # timm:<name>: timm's pretrained weights (hub/cache, or model.weights as timm's file)


@dataclass
class LoraOptions:
    rank: int = 8
    alpha: float = 16.0
    targets: List[str] = field(default_factory=list)  # module names; [] = every linear layer (else conv) of the backbone


@dataclass
class HeadInit:
    init: str = "random"  # random, or text: CLIP/SigLIP's class-name text embeddings (a zero-shot start; LIFT)
    prompt: str = "a photo of a {}."  # head.init=text: the text of each class, its name in place of {}


@dataclass
class AugmentConfig:
    flip: str = "auto"  # horizontal flip of training images: auto (the dataset's choice: photos yes, digits/grey no), true, false
    policy: str = "none"  # none, randaugment, autoaugment (CIFAR-10 policy): batched on the device (kornia)
    n: int = 2  # randaugment: operations per image
    m: int = 10  # randaugment: magnitude (0-30)
    cutout: int = 0  # side of the square Cutout zeroes in each training image (0: off)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd, adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_epochs: int = 1
    schedule: str = "cosine"  # cosine, multistep, constant
    milestones: List[int] = field(default_factory=lambda: [160, 180])
    decay: float = 0.01  # multistep factor per milestone
    max_norm: Optional[float] = None  # MaxNorm (weight balancing): classifier rows projected to norm <= this per step
    backbone_lr: Optional[float] = None  # learning rate of everything but the classifier (default: lr)
    accumulate: int = 1  # gradient accumulation: one optimizer step per this many batches (effective batch x this)
    sam: float = 0.0  # sharpness-aware minimisation: the radius rho (0: off; ccar.engine.sam)
    sam_adaptive: bool = False  # ASAM: the radius scaled per weight by |w| + 0.01
    sam_scope: str = "all"  # all, or tail: ImbSAM, only the tail classes' loss is made flat
    sam_tail_below: Optional[int] = None  # sam_scope=tail: classes with fewer training images (unset: rarest third)


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist-lt"
    data_root: Optional[str] = None
    imbalance: Optional[float] = None  # default 100 for the synthetic long tails
    n_max: Optional[int] = None  # synthetic long tails: images of the head class (default: the smallest source class)
    profile: str = "exp"
    classes: Optional[List[int]] = None  # synthetic long tails: a subset of the source's classes (relabelled 0..k-1)
    val_fraction: float = 0.1
    seed: int = 0
    epochs: int = 15
    out: Optional[str] = None  # run folder; default runs/<dataset>-<loss>-s<seed>
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else off), bf16, fp16, off
    channels_last: str = "auto"  # auto (on for convolutional models on image data), true, false
    compile: bool = False
    deterministic: bool = False  # CUDA: deterministic kernels (slower). CPU runs are bit-reproducible either way
    threads: int = 0  # CPU threads (0: torch's default)
    resident: bool = True  # small datasets: keep them on the device (false: host memory, batches copied over)
    workers: int = 4  # DataLoader workers for file-backed datasets
    image_size: str = "auto"  # folders and file lists: pixels, or auto (folders: from the images; file lists: 224)
    in_memory: str = "auto"  # dataset=folder: decode once into memory (auto: when it fits in 2 GiB), true, false
    test_fraction: float = 0.2  # dataset=folder with one tree: the share of each class carved out as the test split
    label_column: Optional[str] = None  # dataset=csv (default: label, target or class, else the last column)
    csv_impute: str = "none"  # dataset=csv: none (a missing value is an error) or mean (mean / most frequent)
    posthoc_tau: Optional[float] = None  # post-hoc logit adjustment at evaluation
    tau_norm: Optional[str] = None  # post-hoc tau-normalisation of the classifier: a number, or auto (chosen on val)
    sampler: str = "instance"  # instance, class-balanced, sqrt, progressive (ccar.data.sampling)
    sampler_epoch: int = 0  # instance sampling before this epoch, `sampler` from it on (deferred re-sampling)
    mix: str = "none"  # none, mixup, cutmix, remix: mixing of training batches (ccar.engine.mixing)
    mix_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)
    mix_prob: float = 1.0  # share of the batches mixed
    mix_until: Optional[int] = None  # mix in epochs before this one (unset: every epoch)
    remix_kappa: float = 3.0  # mix=remix: count ratio from which a pair counts as imbalanced
    remix_tau: float = 0.5  # mix=remix: below this weight the head sample loses its label
    sync_bn: bool = False  # torchrun: BatchNorm statistics over the global batch instead of each process's
    finetune: str = "full"  # which parameters train: full, linear (classifier), bias (+ biases), lora (+ adapters)
    cache_features: str = "auto"  # frozen backbone: classifier trained on features computed once (auto: finetune=linear)
    feature_cache: Optional[str] = None  # folder keeping those features between runs (a sweep: its features/)
    retrain: Optional[str] = None  # set by `ccar retrain`: crt, lws, ft, las or ncm (second stage of a parent run)
    parent: Optional[str] = None  # set by `ccar retrain`: the run folder whose model is re-trained
    checkpoint_every: int = 1  # epochs
    checkpoint_minutes: float = 0.0  # also checkpoint mid-epoch every this many minutes (0: off; long epochs)
    resume: Optional[str] = None  # auto: continue the run in out if it has a checkpoint; false; unset: auto on restarts
    progress: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    head: HeadInit = field(default_factory=HeadInit)  # how the classifier starts (model.head: its kind)
    lora: LoraOptions = field(default_factory=LoraOptions)  # finetune=lora
    optim: OptimConfig = field(default_factory=OptimConfig)
    synthetic: GaussianShape = field(default_factory=GaussianShape)  # dataset=gaussian-lt (ccar.data.synthetic)

    @property
    def image_size_value(self):
        """``image_size`` as an int, or the string ``auto``."""
        return self.image_size if self.image_size == "auto" else int(self.image_size)

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        loss = self.loss.name + (f"-{self.loss.base}" if self.loss.name == "ccar" else "")
        return Path("runs") / f"{self.dataset}-{loss}-s{self.seed}"


# --- (de)serialisation -----------------------------------------------------------------------------------------------


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> Dict[str, Any]:  # resolving the string annotations is 85 % of loading a config: once per class
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after YAML parsing), converting int -> float where natural."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:  # `compile=yes`, `resident: off`
            return YAML11_BOOLS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # `true`/`false`: string keys such as channels_last take them as text
            return "true" if value else "false"
        if value is None:  # `amp=null`: the word, for the key's own check to name the valid values
            return "null"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _apply(obj, mapping: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {mapping!r}")
    fields = _fields(type(obj))
    hints = _type_hints(type(obj))
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys{(' of ' + prefix.rstrip('.')) if prefix else ''}: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


# --- valid ranges ------------------------------------------------------------------------------------------------------

AMP_MODES = ("auto", "bf16", "fp16", "off")
MAX_SEED = 2**31 - 1  # numpy's RandomState takes seeds below 2**32; seed + 1 and seed * 1000 + epoch must fit


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every numeric key against its valid range; the first violation raises :class:`ConfigError` naming it.

    Options of the loss (omega, beta, ...) are checked by the loss itself when it is built, with the same kind of
    message; the data keys that depend on the files (e.g. an imbalance that empties a class) when the data is read.

    >>> validate(TrainConfig(epochs=-3))
    Traceback (most recent call last):
    ccar.errors.ConfigError: epochs must be an integer >= 1, got -3
    """
    o = cfg.optim
    _check(cfg.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}", cfg.amp)
    _check(cfg.channels_last in ("auto", "true", "false"), "channels_last", "auto, true or false", cfg.channels_last)
    _check(cfg.epochs >= 1, "epochs", "an integer >= 1", cfg.epochs)
    from ..data.sampling import SAMPLERS

    _check(cfg.sampler in SAMPLERS, "sampler", f"one of {', '.join(SAMPLERS)}", cfg.sampler)
    _check(0 <= cfg.sampler_epoch < cfg.epochs, "sampler_epoch", f"an epoch in 0..{cfg.epochs - 1}", cfg.sampler_epoch)
    from .mixing import MIX_MODES

    _check(cfg.mix in MIX_MODES, "mix", f"one of {', '.join(MIX_MODES)}", cfg.mix)
    _check(cfg.mix_alpha > 0, "mix_alpha", "a number > 0 (Beta(alpha, alpha))", cfg.mix_alpha)
    _check(0 < cfg.mix_prob <= 1, "mix_prob", "a probability in (0, 1]", cfg.mix_prob)
    _check(cfg.mix_until is None or 1 <= cfg.mix_until <= cfg.epochs, "mix_until", f"an epoch in 1..{cfg.epochs}",
           cfg.mix_until)
    _check(cfg.remix_kappa >= 1, "remix_kappa", "a count ratio >= 1", cfg.remix_kappa)
    _check(0 < cfg.remix_tau < 1, "remix_tau", "a number in (0, 1)", cfg.remix_tau)
    _check(o.max_norm is None or o.max_norm > 0, "optim.max_norm", "a number > 0", o.max_norm)
    from .decoupling import RETRAIN_METHODS

    _check(cfg.retrain is None or cfg.retrain in RETRAIN_METHODS, "retrain",
           f"one of {', '.join(RETRAIN_METHODS)} (use `ccar retrain RUN_DIR method=...`)", cfg.retrain)
    if cfg.tau_norm is not None and cfg.tau_norm != "auto":
        try:
            tau = float(cfg.tau_norm)
        except ValueError:
            tau = float("nan")
        _check(math.isfinite(tau) and tau >= 0, "tau_norm", "a number >= 0 or auto", cfg.tau_norm)
    _check(0 <= cfg.seed <= MAX_SEED, "seed", f"an integer in 0..{MAX_SEED}", cfg.seed)
    _check(cfg.imbalance is None or cfg.imbalance >= 1, "imbalance", "a number >= 1 (n_max / n_min)", cfg.imbalance)
    _check(cfg.n_max is None or cfg.n_max >= 1, "n_max", "an integer >= 1 (images of the largest class)", cfg.n_max)
    _check(0 <= cfg.val_fraction < 1, "val_fraction", "a fraction in [0, 1)", cfg.val_fraction)
    _check(0 < cfg.test_fraction < 1, "test_fraction", "a fraction in (0, 1)", cfg.test_fraction)
    for name, rule, value in cfg.synthetic.problems():
        _check(False, f"synthetic.{name}", rule, value)
    _check(cfg.in_memory in ("auto", "true", "false"), "in_memory", "auto, true or false", cfg.in_memory)
    _check(cfg.csv_impute in ("none", "mean"), "csv_impute", "none or mean", cfg.csv_impute)
    _check(cfg.threads >= 0, "threads", "an integer >= 0 (0: torch's default)", cfg.threads)
    _check(cfg.workers >= 0, "workers", "an integer >= 0", cfg.workers)
    _check(cfg.image_size == "auto" or (cfg.image_size.isdigit() and int(cfg.image_size) >= 8), "image_size",
           "auto or an integer >= 8 (pixels)", cfg.image_size)
    from .finetune import FINETUNE_MODES

    _check(cfg.finetune in FINETUNE_MODES, "finetune", f"one of {', '.join(FINETUNE_MODES)}", cfg.finetune)
    _check(cfg.cache_features in ("auto", "true", "false"), "cache_features", "auto, true or false", cfg.cache_features)
    _check(cfg.cache_features != "true" or cfg.retrain != "las", "cache_features",
           "auto or false for `ccar retrain method=las` (BatchNorm statistics shift: the backbone runs on images)",
           cfg.cache_features)
    _check(cfg.cache_features != "true" or cfg.finetune == "linear" or cfg.retrain is not None, "cache_features",
           f"true only for a frozen backbone (finetune=linear, or `ccar retrain`; finetune={cfg.finetune} trains it)",
           cfg.cache_features)
    _check(not cfg.model.pretrained or cfg.model.name.startswith("timm:"), "model.pretrained",
           "false unless model.name=timm:<name> (hf: models are pretrained; others start from model.weights)",
           cfg.model.pretrained)
    _check(cfg.head.init in ("random", "text"), "head.init", "random or text", cfg.head.init)
    _check(cfg.head.init != "text" or cfg.model.name.startswith("hf:"), "head.init",
           "random unless the model is a CLIP or SigLIP model (model.name=hf:...)", cfg.head.init)
    _check("{}" in cfg.head.prompt, "head.prompt", "a text with {} where the class name goes", cfg.head.prompt)
    _check(cfg.lora.rank >= 1, "lora.rank", "an integer >= 1", cfg.lora.rank)
    _check(o.backbone_lr is None or o.backbone_lr >= 0, "optim.backbone_lr", "a number >= 0", o.backbone_lr)
    _check(o.accumulate >= 1, "optim.accumulate", "an integer >= 1 (batches per optimizer step)", o.accumulate)
    _check(o.sam >= 0, "optim.sam", "a radius >= 0 (0: off)", o.sam)
    from .sam import SAM_SCOPES

    _check(o.sam_scope in SAM_SCOPES, "optim.sam_scope", f"one of {', '.join(SAM_SCOPES)}", o.sam_scope)
    _check(o.sam_tail_below is None or o.sam_tail_below >= 1, "optim.sam_tail_below", "an integer >= 1",
           o.sam_tail_below)
    _check(o.sam > 0 or (not o.sam_adaptive and o.sam_scope == "all"), "optim.sam",
           "a radius > 0 when optim.sam_adaptive or optim.sam_scope=tail is set", o.sam)
    _check(not o.sam or o.accumulate == 1, "optim.accumulate", "1 with optim.sam (a SAM step needs its whole "
           "batch at once)", o.accumulate)
    _check(cfg.augment.flip in ("auto", "true", "false"), "augment.flip", "auto, true or false", cfg.augment.flip)
    from ..data.policies import POLICIES

    _check(cfg.augment.policy in POLICIES, "augment.policy", f"one of {', '.join(POLICIES)}", cfg.augment.policy)
    _check(cfg.augment.n >= 1, "augment.n", "an integer >= 1 (operations per image)", cfg.augment.n)
    _check(0 <= cfg.augment.m <= 30, "augment.m", "a magnitude in 0..30", cfg.augment.m)
    _check(cfg.augment.cutout >= 0, "augment.cutout", "a side in pixels >= 0 (0: off)", cfg.augment.cutout)
    _check(cfg.resume in (None, "auto", "false"), "resume", "auto or false (unset: auto when torchrun or Slurm "
           "restarted the process)", cfg.resume)
    _check(cfg.checkpoint_minutes >= 0, "checkpoint_minutes", "a number of minutes >= 0 (0: off)",
           cfg.checkpoint_minutes)
    _check(cfg.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1 (epochs)", cfg.checkpoint_every)
    _check(cfg.posthoc_tau is None or cfg.posthoc_tau >= 0, "posthoc_tau", "a number >= 0", cfg.posthoc_tau)
    _check(cfg.model.width >= 1, "model.width", "an integer >= 1", cfg.model.width)
    _check(cfg.model.depth >= 1, "model.depth", "an integer >= 1", cfg.model.depth)
    _check(all(h >= 1 for h in cfg.model.hidden), "model.hidden", "a list of layer sizes >= 1 ([] is a linear model)",
           cfg.model.hidden)
    _check(o.lr > 0, "optim.lr", "a number > 0", o.lr)
    _check(0 <= o.momentum < 1, "optim.momentum", "a number in [0, 1)", o.momentum)
    _check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _check(o.batch_size >= 1, "optim.batch_size", "an integer >= 1", o.batch_size)
    _check(0 <= o.warmup_epochs <= cfg.epochs, "optim.warmup_epochs", f"an integer in 0..epochs ({cfg.epochs})",
           o.warmup_epochs)
    _check(0 < o.decay <= 1, "optim.decay", "a factor in (0, 1]", o.decay)
    if o.schedule == "multistep":
        _check(all(1 <= m <= cfg.epochs for m in o.milestones), "optim.milestones",
               f"epochs within 1..epochs ({cfg.epochs}) for schedule=multistep", o.milestones)
    drw = cfg.loss.drw_epoch
    _check(drw is None or 0 <= drw < cfg.epochs, "loss.drw_epoch", f"an epoch in 0..{cfg.epochs - 1} (epochs={cfg.epochs})",
           drw)
    return cfg


def config_from_dict(data: Dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    _apply(cfg, data or {})
    return validate(cfg)


# YAML 1.1 (PyYAML) reads these words as booleans; ccar's loader reads only true/false so, and a string key keeps
# the word as text (`amp=off`, `sampler: no`...); a boolean key still accepts them (`compile=yes`).
YAML11_BOOLS = {**dict.fromkeys(("yes", "on", "true"), True), **dict.fromkeys(("no", "off", "false"), False)}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently, so a stray second ``out:`` or a method listed twice would quietly replace the first), and that only
    ``true``/``false`` are booleans (YAML 1.2's rule: ``off``, ``no``, ``on``, ``yes`` stay text until a key's type
    says otherwise)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (each key may appear once)",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load_yaml(path: str) -> Any:
    """A YAML file (config or sweep) as Python data; bad bytes, bad syntax and duplicate keys are ConfigErrors that
    name the file and line."""
    p = Path(path)
    try:
        return yaml.load(p.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file ``path``, then ``key=value`` overrides (``optim.lr=0.05``, ``loss.base=la``)."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(path)
        try:
            _apply(cfg, data if data is not None else {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    apply_overrides(cfg, overrides)
    return validate(cfg)


def parse_override(item: str) -> tuple:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. loss.name=ce, optim.lr=0.05)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}") from exc
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    for item in overrides:
        key, value = parse_override(item)
        nested: Dict[str, Any] = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, nested)
    return cfg


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
