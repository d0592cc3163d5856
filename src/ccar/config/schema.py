"""The run configuration's schema: typed dataclasses with their defaults, and the valid values of every key that
takes one of a set (declared here, beside the schema, so that the configuration imports nothing from the engine).

The defaults are the built-in default job: CCAR over logit adjustment on Fashion-MNIST-LT, imbalance 100.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.policies import POLICIES
from ..data.sampling import SAMPLERS
from ..data.synthetic import GaussianShape

# Valid values of the keys that take one of a set. The modules that implement them import these names.
AMP_MODES = ("auto", "bf16", "fp16", "off")
MIX_MODES = ("none", "mixup", "cutmix", "remix")  # ccar.engine.mixing
RETRAIN_METHODS = ("crt", "lws", "ft", "las", "ncm", "router")  # `ccar retrain RUN method=...` (ccar.engine.decoupling)
FINETUNE_MODES = ("full", "linear", "bias", "lora")  # ccar.engine.finetune
SAM_SCOPES = ("all", "tail")  # ccar.engine.sam
SCHEDULES = ("cosine", "multistep", "constant")
OPTIMIZERS = ("sgd", "adamw")
COMPILE_MODES = ("auto", "graph", "true", "false")
FEATURE_NORMS = ("auto", "standardize", "l2", "none")  # model.feature_norm (ccar.models.heads.FeatureNorm)
# The two method families whose models are not one classifier (ccar.models.families), by loss name
EXPERT_LOSSES = ("ride", "sade", "ride-router")  # multi-expert models (ride-router: RIDE's second stage)
CONTRASTIVE_LOSSES = ("paco", "gpaco", "bcl")  # two views, a projection head (BCL: prototypes; PaCo: a queue)
TEST_TIME = ("auto", "none", "self-supervised")  # test_time_aggregation (SADE's; ccar.engine.test_time)
MAX_SEED = 2**31 - 1  # numpy's RandomState takes seeds below 2**32; seed + 1 and seed * 1000 + epoch must fit

__all__ = ["AMP_MODES", "COMPILE_MODES", "CONTRASTIVE_LOSSES", "EXPERT_LOSSES", "TEST_TIME", "FEATURE_NORMS", "MIX_MODES", "RETRAIN_METHODS", "FINETUNE_MODES", "SAM_SCOPES", "SCHEDULES", "OPTIMIZERS",
           "POLICIES", "SAMPLERS", "MAX_SEED", "LossConfig", "ModelConfig", "LoraOptions", "HeadInit", "AugmentConfig",
           "OptimConfig", "TrainConfig", "to_dict"]


@dataclass
class LossConfig:
    """The loss (``name``: one of :data:`ccar.losses.LOSS_NAMES`) and its options; unset (null) options take the
    loss's own defaults, and an option the loss does not take is an error naming the loss's options."""

    name: str = "ccar"  # the loss; ccar re-weights the loss named by base
    base: Optional[str] = "la"  # ccar only: the loss under CCAR's weight
    omega: Optional[float] = None  # ccar: the confidence pivot, in (0, 1]
    power_base: Optional[float] = None  # ccar: the base of the power in Omega
    detach_weight: Optional[bool] = None  # ccar: true treats Omega as a constant weight (no gradient through it)
    normalize: Optional[str] = None  # ccar: batch divides by the batch mean of Omega (unset: no normalisation)
    frequency: Optional[str] = None  # ccar: sum (f_c = n_y / sum n, the paper) or max (n_y / max n, an extension)
    strength: Optional[float] = None  # ccar: exponent on Omega (0 turns CCAR off, 1 is the paper)
    gamma: Optional[float] = None  # focal exponent (focal, cb-focal, cb with form=focal); vs: (n_c / n_max)^gamma;
    # paco, gpaco: the weight of the samples in the contrastive softmax's denominator (1.0)
    beta: Optional[float] = None  # class-balanced weights (1 - beta) / (1 - beta^n_c), beta in [0, 1); paco, gpaco:
    # the weight of the sample's own class centre as a positive (1.0)
    form: Optional[str] = None  # cb: ce or focal
    tau: Optional[float] = None  # la, vs, bcl: the logit adjustment tau * log(prior)
    max_margin: Optional[float] = None  # ldam, ride: the margin of the rarest class (margins proportional to n^-1/4)
    scale: Optional[float] = None  # ldam, ride: the scale of the logits after the margin (ride-router: the RIDE run's)
    diversity_weight: Optional[float] = None  # ride: the factor of the KL between each expert and the ensemble
    # (-0.2: rewards disagreement, RIDE's)
    base_temperature: Optional[float] = None  # ride: the diversity term's softmax temperature (1.0)
    reweight_factor: Optional[float] = None  # ride: after drw_epoch, per-class diversity temperatures from
    # C * prior * factor + 1 - factor (0.05)
    inverse_lambda: Optional[float] = None  # sade: the third expert's inverse-prior adjustment strength (2.0)
    alpha: Optional[float] = None  # paco, gpaco: the weight of each same-class sample in the contrastive term (0.01)
    temperature: Optional[float] = None  # paco, gpaco (0.05), bcl (0.07): the contrastive temperature
    ce_weight: Optional[float] = None  # bcl: the weight of the logit-compensated CE (2.0)
    contrast_weight: Optional[float] = None  # bcl: the weight of the balanced contrastive term (0.6)
    pos_weight: Optional[float] = None  # ride-router: the weight of "ask the next expert" in its binary loss (100)
    smooth_head: Optional[float] = None  # las: label smoothing of the most frequent class (0.4)
    smooth_tail: Optional[float] = None  # las: of the rarest (0.1)
    smooth_shape: Optional[str] = None  # las: concave, linear or convex in between
    drw_epoch: Optional[int] = None  # deferred re-weighting: class-balanced weights from this epoch on
    drw_beta: Optional[float] = None  # deferred re-weighting: the beta of those weights

    def options(self) -> Dict[str, Any]:
        """Keyword options for :func:`ccar.losses.build_loss` (set ones only; ``base`` only for ccar)."""
        opts = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "name"}
        if self.name != "ccar":
            opts.pop("base", None)
        return opts

    @property
    def method(self) -> str:
        """The loss under CCAR (``base``) or the loss itself."""
        return self.base if self.name == "ccar" else self.name

    @property
    def uses_ldam(self) -> bool:  # (RIDE's experts train with LDAM: a cosine classifier each)
        return self.method in ("ldam", "ride", "ride-router")

    @property
    def family(self) -> Optional[str]:
        """``experts`` or ``contrastive`` for the losses whose models are not one plain classifier, else None."""
        return "experts" if self.method in EXPERT_LOSSES else "contrastive" if self.method in CONTRASTIVE_LOSSES else None


@dataclass
class ModelConfig:
    name: str = "auto"  # auto (from the data: ccar.engine.build.auto_model), resnet32, cnn, mlp, resnet50, resnext50, timm:<name>
    width: int = 16  # cnn
    depth: int = 32  # resnet_cifar
    hidden: List[int] = field(default_factory=lambda: [256, 256])  # mlp
    head: str = "auto"  # linear, cosine; auto = cosine for LDAM
    feature_norm: str = "auto"  # the classifier's inputs: standardize (training-split statistics), l2, none;
    # auto = standardize for a frozen backbone (finetune=linear, not head.init=text), else none
    weights: Optional[str] = None  # a .safetensors file to start from (a ccar run's best.safetensors included)
    pretrained: bool = False  # timm:<name>: timm's pretrained weights (hub/cache, or model.weights as timm's file)
    experts: int = 0  # multi-expert models (loss ride, sade): expert branches; 0 = auto (3 for ride and sade)
    expert_width: float = 0.75  # each expert's widths, a fraction of the single model's later stages (RIDE: 24 of 32, 48 of 64)
    projection: int = 128  # contrastive losses (paco, gpaco, bcl): the projection head's output dimension
    queue: int = 4096  # paco: the momentum encoder's queue of keys (MoCo's); gpaco and bcl have none
    key_momentum: float = 0.999  # paco: the momentum encoder's update, key <- m * key + (1 - m) * online
    router_top: int = 30  # ccar retrain method=router: the router sees the top k of the experts' mean logits (k <= C)


@dataclass
class LoraOptions:
    rank: int = 8  # the rank of each adapter
    alpha: float = 16.0  # the adapters' scaling (peft's lora_alpha; the update is scaled by alpha / rank)
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
    lr: float = 0.1  # peak learning rate (after the warm-up)
    momentum: float = 0.9  # sgd only (adamw keeps its default betas)
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = 5e-4  # not applied to BatchNorm and bias parameters
    batch_size: int = 128  # per process (under torchrun: per GPU)
    warmup_epochs: int = 1  # linear warm-up of the learning rate over this many epochs
    schedule: str = "cosine"  # cosine, multistep, constant
    milestones: List[int] = field(default_factory=lambda: [160, 180])  # multistep: epochs where lr is x decay
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
    data_root: Optional[str] = None  # the data's folder (own data: required; built-in sets: found or downloaded)
    imbalance: Optional[float] = None  # default 100 for the synthetic long tails
    n_max: Optional[int] = None  # synthetic long tails: images of the head class (default: the smallest source class)
    profile: str = "exp"  # synthetic long tails: exponential or step class counts
    classes: Optional[List[int]] = None  # synthetic long tails: a subset of the source's classes (relabelled 0..k-1)
    val_fraction: float = 0.1  # stratified validation split carved from the training set (model selection)
    seed: int = 0  # the run's seed (validation split, initialisation, batches, augmentation)
    epochs: int = 15
    out: Optional[str] = None  # run folder; default runs/<dataset>-<loss>-s<seed>
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else off), bf16, fp16, off
    channels_last: str = "auto"  # auto (on for convolutional models on image data), true, false
    compile: str = "auto"  # auto: on a GPU, the torch.compile'd step as one CUDA graph where the run allows it,
    # else eager; graph: the eager kernels as one CUDA graph, or an error saying why not; true: torch.compile
    # without a graph; false: eager (ccar.engine.step)
    deterministic: bool = False  # CUDA: deterministic kernels (slower). CPU runs are bit-reproducible either way
    threads: int = 0  # CPU threads (0: torch's default)
    resident: bool = True  # small datasets: keep them on the device (false: host memory, batches copied over)
    workers: int = 4  # DataLoader workers for file-backed datasets
    image_size: str = "auto"  # folders and file lists: pixels, or auto (folders: from the images; file lists: 224)
    in_memory: str = "auto"  # dataset=folder: decode once into memory (auto: when it fits in 2 GiB), true, false
    test_fraction: float = 0.2  # dataset=folder with one tree: the share of each class carved out as the test split
    label_column: Optional[str] = None  # dataset=csv (default: label, target or class, else the last column)
    csv_impute: str = "none"  # dataset=csv: none (a missing value is an error) or mean (mean / most frequent)
    class_names: Optional[str] = None  # classes.txt (one name per line) or a JSON mapping (e.g. WordNet id -> name):
    # the names reports, predictions and head.init=text use (unset: classes.txt/.json in data_root, for own data)
    posthoc_tau: Optional[float] = None  # post-hoc logit adjustment at evaluation
    test_time_aggregation: str = "auto"  # multi-expert models: self-supervised (SADE's expert weights learnt on the
    # unlabeled test inputs of each test-agnostic prior), none (equal weights); auto = self-supervised for sade
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
    progress: bool = True  # progress bars and per-epoch lines on the terminal
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



def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
