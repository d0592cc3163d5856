"""``ccar train``: a config becomes a run folder. :func:`train` reads top to bottom: claim the folder, build the
data and the run, the loss and the optimizer, then the :class:`~ccar.engine.trainer.Trainer` (a step and its
callbacks) fits, and the final model is scored on the test set once."""

from __future__ import annotations

from typing import Dict

import torch

from ..config import OptimConfig, TrainConfig, validate
from ..errors import ConfigError
from ..losses import build_loss
from ..data.policies import batch_policy
from ..models.heads import NormedLinear, classifier, classifier_name
from .build import assemble, build_data, with_feature_cache
from .callbacks import build_callbacks, lr_at  # noqa: F401  (lr_at: importable where it always was)
from .decoupling import set_class_means
from .distributed import init_distributed
from .features import fit_feature_norm, uses_cache
from .finish import finish
from .run import Run
from .run_folder import claim, read_resume_checkpoint, write_run_files
from .runtime import resolve_device
from .sam import optimizer_summary
from .step import Step, build_step, step_summary
from .trainer import Trainer, TrainState
from .transforms import build_transforms


def build_optimizer(model: torch.nn.Module, o: OptimConfig, graph_safe: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters; no weight decay on BatchNorm and bias parameters (standard for
    the CIFAR-LT recipes' ResNets too). ``optim.backbone_lr``: everything but the classifier at its own rate (each
    group's ``lr_scale`` times the schedule's lr). ``graph_safe``: for a CUDA graph, each group's learning rate is
    a device tensor that the schedule fills in place, and the update a fused kernel that reads it there."""
    parts = [(1.0, [p for p in model.parameters() if p.requires_grad])]
    if o.backbone_lr is not None:
        head = classifier_name(model) + "."
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        parts = [(o.backbone_lr / o.lr, [p for n, p in trainable if not n.startswith(head)]),
                 (1.0, [p for n, p in trainable if n.startswith(head)])]
    groups = [{"params": [p for p in params if (p.ndim > 1) == decay], "weight_decay": o.weight_decay if decay else 0.0,
               "lr_scale": scale} for scale, params in parts for decay in (True, False)]
    if graph_safe:
        device = next(p.device for _, params in parts for p in params)
        for group in groups:
            group["lr"] = torch.tensor(o.lr, device=device)
    fused = {"fused": True} if graph_safe else {}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **fused)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, **fused)
    raise ConfigError(f"optim.name must be sgd or adamw; got {o.name!r}")


def seed_and_device(cfg: TrainConfig, dist) -> torch.device:
    """The run's device (under torchrun on CUDA: this process's GPU), threads and seeds; deterministic kernels when
    asked (CPU runs are bit-reproducible either way)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def summary(run: Run, step: Step, saved) -> str:
    """What the run is, in a few lines: data, model, loss, precision, device, folder; the optimizer step's kind;
    the augmentation policy; where a resumed run continues."""
    cfg, model = run.cfg, run.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = (f", from {cfg.model.weights}" if cfg.model.weights else "") + (
        f", finetune={cfg.finetune}: {n_trained:,} trained" if cfg.finetune != "full" else "")
    cosine = ", cosine head" if isinstance(classifier(model), NormedLinear) else ""
    lines = [f"{run.data.summary()}\nmodel {cfg.model.name} ({n_params / 1e6:.2f} M params{cosine}{start}), loss "
             f"{step.loss_fn!r}, {run.precision.describe()}, device {run.device}"
             f"{f' x{run.dist.world_size}' if run.dist.enabled else ''}, run folder {run.run_dir}"]
    if cfg.optim.accumulate > 1 or cfg.optim.sam:
        lines.append(optimizer_summary(cfg.optim, run.dist.world_size, getattr(step, "tail", None)))
    how = step_summary(run)  # ('' for the plain default on the CPU)
    if how:
        lines.append(how)
    policy = batch_policy(cfg.augment)
    if policy is not None:
        lines.append(f"augmentation policy: {policy.describe()} (each training batch, after the crop and flip)")
    if saved is not None:
        partial, epoch = saved[1].get("partial"), saved[1]["epoch"] + 1
        lines.append("resuming from its checkpoint: " + (f"epoch {epoch + 1}, after step {partial['step']}"
                                                          if partial else f"the start of epoch {epoch + 1}"))
    return "\n".join(lines)


def prepare(cfg: TrainConfig, resume: bool = False, log=print, signals: bool = True) -> Trainer:
    """Everything :func:`train` does before the loop: the run folder claimed, the data, the run, the loss, the
    optimizer, the step and its callbacks, a resumed run's state restored -- a :class:`Trainer` ready to fit.
    ``signals``: whether its callbacks watch for stop signals (a pack's first cell watches for all of them)."""
    validate(cfg)  # configs built in code get the same range checks as files and overrides
    dist = init_distributed(cfg.device)
    device = seed_and_device(cfg, dist)
    resume, auto = claim(cfg, resume)
    data = build_data(cfg, dist, device, log)
    saved = read_resume_checkpoint(cfg, resume, auto)
    run, loader = assemble(cfg, data, dist, device, log, resumed=saved is not None)
    loss_fn = build_loss(cfg.loss.name, data.class_counts, **cfg.loss.options()).to(device)
    loss_fn.validate = False  # labels were range-checked when the data was loaded: no host sync per step
    if dist.is_main:
        write_run_files(run)
    if uses_cache(cfg):  # a frozen backbone: its features once, then the classifier alone trains on them
        run, loader = with_feature_cache(run)
    elif saved is None:  # (a resumed run's statistics are in its checkpoint)
        fit_feature_norm(run)
    optimizer = build_optimizer(run.model, cfg.optim, graph_safe=device.type == "cuda")  # (eager and graph alike)
    step = build_step(run, optimizer, loss_fn, len(loader))
    state = TrainState.restore(saved, run.model, optimizer, cfg.finetune) if saved is not None else TrainState()
    if cfg.retrain == "ncm":  # nearest class mean: nothing to train, the classifier is the training set's means
        set_class_means(run)
        state.epoch = cfg.epochs
    if dist.is_main:
        log(summary(run, step, saved))
    callbacks = build_callbacks(cfg, device.type, signals=signals)
    return Trainer(run, step, loader, build_transforms(run), callbacks, state)


def train(cfg: TrainConfig, resume: bool = False, log=print) -> Dict[str, object]:
    """Train ``cfg`` into its run folder; returns the metrics written to ``metrics.json``."""
    trainer = prepare(cfg, resume, log)
    state = trainer.fit()
    metrics = finish(trainer.run, state.best_state, state.history)
    trainer.run.dist.barrier()  # every rank leaves together, after rank 0 has written the run
    return metrics
