"""Valid ranges of a run configuration: :func:`validate` checks every key and names the first one out of range.

Options of the loss (omega, beta, ...) are checked by the loss itself when it is built, with the same kind of
message; the data keys that depend on the files (e.g. an imbalance that empties a class) when the data is read.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .schema import (AMP_MODES, COMPILE_MODES, FEATURE_NORMS, FINETUNE_MODES, MAX_SEED, MIX_MODES, POLICIES, RETRAIN_METHODS, SAM_SCOPES,
                     SAMPLERS, TEST_TIME, TrainConfig)


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every key against its valid range; the first violation raises :class:`ConfigError` naming it.

    >>> validate(TrainConfig(epochs=-3))
    Traceback (most recent call last):
    ccar.errors.ConfigError: epochs must be an integer >= 1, got -3
    """
    for section in (_schedule_and_recipes, _data, _model_and_finetune, _families, _optimizer, _augment_and_runs,
                    _numbers):
        section(cfg)
    return cfg


def _schedule_and_recipes(cfg: TrainConfig) -> None:
    _check(cfg.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}", cfg.amp)
    _check(cfg.channels_last in ("auto", "true", "false"), "channels_last", "auto, true or false", cfg.channels_last)
    _check(cfg.compile in COMPILE_MODES, "compile", "auto (a CUDA graph of the step where possible), graph, true "
           "(torch.compile) or false", cfg.compile)
    _check(cfg.epochs >= 1, "epochs", "an integer >= 1", cfg.epochs)
    _check(cfg.sampler in SAMPLERS, "sampler", f"one of {', '.join(SAMPLERS)}", cfg.sampler)
    _check(0 <= cfg.sampler_epoch < cfg.epochs, "sampler_epoch", f"an epoch in 0..{cfg.epochs - 1}", cfg.sampler_epoch)
    _check(cfg.mix in MIX_MODES, "mix", f"one of {', '.join(MIX_MODES)}", cfg.mix)
    _check(cfg.mix_alpha > 0, "mix_alpha", "a number > 0 (Beta(alpha, alpha))", cfg.mix_alpha)
    _check(0 < cfg.mix_prob <= 1, "mix_prob", "a probability in (0, 1]", cfg.mix_prob)
    _check(cfg.mix_until is None or 1 <= cfg.mix_until <= cfg.epochs, "mix_until", f"an epoch in 1..{cfg.epochs}",
           cfg.mix_until)
    _check(cfg.remix_kappa >= 1, "remix_kappa", "a count ratio >= 1", cfg.remix_kappa)
    _check(0 < cfg.remix_tau < 1, "remix_tau", "a number in (0, 1)", cfg.remix_tau)
    _check(cfg.optim.max_norm is None or cfg.optim.max_norm > 0, "optim.max_norm", "a number > 0", cfg.optim.max_norm)
    _check(cfg.retrain is None or cfg.retrain in RETRAIN_METHODS, "retrain",
           f"one of {', '.join(RETRAIN_METHODS)} (use `ccar retrain RUN_DIR method=...`)", cfg.retrain)
    if cfg.tau_norm is not None and cfg.tau_norm != "auto":
        try:
            tau = float(cfg.tau_norm)
        except ValueError:
            tau = float("nan")
        _check(math.isfinite(tau) and tau >= 0, "tau_norm", "a number >= 0 or auto", cfg.tau_norm)


def _data(cfg: TrainConfig) -> None:
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


def _model_and_finetune(cfg: TrainConfig) -> None:
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
    _check(cfg.model.feature_norm in FEATURE_NORMS, "model.feature_norm", f"one of {', '.join(FEATURE_NORMS)}",
           cfg.model.feature_norm)


def _families(cfg: TrainConfig) -> None:
    """Multi-expert (ride, sade) and contrastive (paco, gpaco, bcl) losses: their models' keys, and the recipes
    that do not combine with them."""
    m, family, method = cfg.model, cfg.loss.family, cfg.loss.method
    _check(cfg.test_time_aggregation in TEST_TIME, "test_time_aggregation", f"one of {', '.join(TEST_TIME)}",
           cfg.test_time_aggregation)
    _check(cfg.test_time_aggregation != "self-supervised" or family == "experts", "test_time_aggregation",
           "auto or none unless the loss trains experts (ride, sade)", cfg.test_time_aggregation)
    _check(m.experts == 0 or family == "experts", "model.experts", "0 unless loss.name is ride or sade (or ccar over "
           "them)", m.experts)
    _check(family != "experts" or m.experts == 0 or m.experts >= 2, "model.experts",
           f"at least 2 for loss {method} (0: 3 experts)", m.experts)
    _check(method != "sade" or m.experts in (0, 3), "model.experts", "3 for sade (one expert per label "
           "distribution: long-tailed, uniform, inverse)", m.experts)
    _check(0 < m.expert_width <= 1, "model.expert_width", "a fraction in (0, 1]", m.expert_width)
    _check(m.projection >= 1, "model.projection", "an integer >= 1", m.projection)
    _check(m.queue >= 1, "model.queue", "an integer >= 1 (keys kept by paco's momentum encoder)", m.queue)
    _check(0 <= m.key_momentum < 1, "model.key_momentum", "a number in [0, 1)", m.key_momentum)
    _check(cfg.retrain != "router" or cfg.loss.name == "ride-router", "loss.name", "ride-router in RIDE's second "
           "stage (retrain=router)", cfg.loss.name)
    _check(method != "ride-router" or cfg.retrain == "router", "loss.name", "another loss: ride-router trains RIDE's "
           "routers over a trained RIDE run (`ccar retrain RUN method=router`)", cfg.loss.name)
    _check(m.router_top >= 1, "model.router_top", "an integer >= 1", m.router_top)
    if family is None:
        return
    _check(m.head != "cosine" or method in ("ride", "ride-router"), "model.head", f"linear or auto with loss "
           f"{method} (its loss takes the logits unscaled: a cosine head's would stay in [-1, 1])", m.head)
    name = f"loss {method}" + (" under ccar" if cfg.loss.name == "ccar" else "")
    for blocked, key, value in ((cfg.retrain not in (None, "router"), "retrain", cfg.retrain),
                                (cfg.tau_norm is not None, "tau_norm", cfg.tau_norm),
                                (bool(cfg.posthoc_tau), "posthoc_tau", cfg.posthoc_tau),
                                (cfg.finetune != "full", "finetune", cfg.finetune),
                                (cfg.optim.backbone_lr is not None, "optim.backbone_lr", cfg.optim.backbone_lr),
                                (family == "contrastive" and cfg.mix != "none", "mix", cfg.mix),
                                (method == "paco" and bool(cfg.optim.sam), "optim.sam", cfg.optim.sam)):
        _check(not blocked, key, f"{'none' if key == 'mix' else 'full' if key == 'finetune' else 'unset'} with {name} "
               f"(its model is not one plain classifier"
               + ("; its two views are not mixed" if key == "mix" else "; SAM's second pass would queue its keys "
                  "twice" if key == "optim.sam" else "") + ")", value)


def _optimizer(cfg: TrainConfig) -> None:
    o = cfg.optim
    _check(o.backbone_lr is None or o.backbone_lr >= 0, "optim.backbone_lr", "a number >= 0", o.backbone_lr)
    _check(o.accumulate >= 1, "optim.accumulate", "an integer >= 1 (batches per optimizer step)", o.accumulate)
    _check(o.sam >= 0, "optim.sam", "a radius >= 0 (0: off)", o.sam)
    _check(o.sam_scope in SAM_SCOPES, "optim.sam_scope", f"one of {', '.join(SAM_SCOPES)}", o.sam_scope)
    _check(o.sam_tail_below is None or o.sam_tail_below >= 1, "optim.sam_tail_below", "an integer >= 1",
           o.sam_tail_below)
    _check(o.sam > 0 or (not o.sam_adaptive and o.sam_scope == "all"), "optim.sam",
           "a radius > 0 when optim.sam_adaptive or optim.sam_scope=tail is set", o.sam)
    _check(not o.sam or o.accumulate == 1, "optim.accumulate", "1 with optim.sam (a SAM step needs its whole "
           "batch at once)", o.accumulate)


def _augment_and_runs(cfg: TrainConfig) -> None:
    _check(cfg.augment.flip in ("auto", "true", "false"), "augment.flip", "auto, true or false", cfg.augment.flip)
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


def _numbers(cfg: TrainConfig) -> None:
    o = cfg.optim
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
