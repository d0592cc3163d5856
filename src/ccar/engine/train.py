"""The training engine: one loop, readable top to bottom (:func:`train`), plus test-set evaluation of a run."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel

from ..data import normalize
from ..data.loaders import loader_state, resume_loader
from ..data.policies import batch_policy
from ..errors import ConfigError, TrainingError
from ..losses import build_loss
from ..models import NormedLinear
from . import checkpoint as ckpt
from .config import OptimConfig, TrainConfig, save_config, to_dict, validate
from .decoupling import classifier_name, prepare_retrain, project_max_norm, set_class_means
from .distributed import init_distributed
from .features import cached_features, head_only, uses_cache
from .finetune import load_trained, saved_state, set_train_modes
from .mixing import mix_batch, mixed_losses
from .sam import SAM, no_sync, optimizer_summary, sam_backward, tail_classes
from .preemption import Preempted, StopSignals, check_same_config, resume_mode, restore_rng, rng_tensors
from .setup import (DATA_FILE, amp_dtype, auto_model, dataset_from_config, init_head_from_text, make_loaders,
                    model_from_config, resolve_device, save_data_description, use_channels_last)
from .scoring import eval_logit_scale, evaluate_split, evaluate_test_split, split_size
from .sync_bn import convert_sync_batchnorm


# --- set-up helpers -------------------------------------------------------------------------------------------------


def lr_at(o: OptimConfig, epochs: int, t: float) -> float:
    """Learning rate for the step that ends at fractional epoch ``t`` (> 0): linear warm-up, then cosine,
    multistep (x ``decay`` at each milestone epoch) or constant.

    >>> o = OptimConfig(lr=0.1, warmup_epochs=5, schedule="multistep", milestones=[160, 180], decay=0.01)
    >>> [round(lr_at(o, 200, t), 6) for t in (1.0, 5.5, 160.5, 199.9)]
    [0.02, 0.1, 0.001, 1e-05]
    """
    if o.warmup_epochs > 0 and t <= o.warmup_epochs:
        return o.lr * t / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(1e-9, epochs - o.warmup_epochs)
        return 0.5 * o.lr * (1.0 + math.cos(math.pi * min(1.0, (t - o.warmup_epochs) / span)))
    if o.schedule == "multistep":
        return o.lr * o.decay ** sum(int(t) >= m for m in o.milestones)
    if o.schedule == "constant":
        return o.lr
    raise ConfigError(f"optim.schedule must be cosine, multistep or constant; got {o.schedule!r}")


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters (standard for the CIFAR-LT recipes' ResNets too); frozen
    # parameters (classifier re-training, frozen backbones) are left out. `optim.backbone_lr`: everything but the
    # classifier at its own rate (each group's `lr_scale` times the schedule's lr).
    head = classifier_name(model) + "."
    parts = [(1.0, [p for p in model.parameters() if p.requires_grad])]
    if o.backbone_lr is not None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        parts = [(o.backbone_lr / o.lr, [p for n, p in trainable if not n.startswith(head)]),
                 (1.0, [p for n, p in trainable if n.startswith(head)])]
    groups = [{"params": [p for p in params if (p.ndim > 1) == decay], "weight_decay": o.weight_decay if decay else 0.0,
               "lr_scale": scale} for scale, params in parts for decay in (True, False)]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    raise ConfigError(f"optim.name must be sgd or adamw; got {o.name!r}")


def check_output_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training, not after hours, when the run folder is unwritable or the disk too full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"output folder {run_dir} is not writable ({exc.strerror or exc}); choose another with out=DIR") from exc
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise TrainingError(
            f"only {free / 2**20:.0f} MiB free at {run_dir}; checkpoints need about {needed_bytes / 2**20:.0f} MiB"
        )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled or None, dynamic_ncols=True, leave=False, unit="step", file=sys.stderr)


# --- the loop -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, log=print) -> Dict[str, object]:
    """Train ``cfg`` into its run folder; returns the metrics written to ``metrics.json``."""
    validate(cfg)  # configs built in code get the same range checks as files and overrides
    ctx = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = cfg.run_dir()
    auto = not resume and resume_mode(cfg.resume) == "auto"
    if cfg.out is None and not resume and (run_dir / "checkpoint.safetensors").exists():
        # A rerun of the default job gets a fresh folder (runs/NAME-2, -3, ...) instead of an error; a restarted
        # one (resume=auto) continues the newest, which its first attempt created.
        n = 2
        while (run_dir.parent / f"{run_dir.name}-{n}").exists():
            n += 1
        cfg.out = str(run_dir.parent / (f"{run_dir.name}-{n - 1}" if auto and n > 2 else
                                        run_dir.name if auto else f"{run_dir.name}-{n}"))
        run_dir = cfg.run_dir()
    state_path = run_dir / "checkpoint.safetensors"
    if auto:  # continue what is there (of the same config: checked once model.name=auto is resolved), else start
        resume = state_path.exists()
    if not resume and state_path.exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume (or resume=auto) to continue it or choose another out=DIR")
    if resume and not state_path.exists():
        raise TrainingError(f"--resume: no checkpoint at {state_path}")
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = dataset_from_config(cfg)
    counts = data.class_counts  # from the whole training split, so identical (global) on every rank
    if ctx.enabled:  # every rank must have built the same split; shards differ, the counts may not
        mine = torch.tensor(counts, dtype=torch.float64, device=device)
        total = ctx.all_reduce_sum(mine.clone())
        if not torch.equal(total, mine * ctx.world_size):
            raise TrainingError(f"rank {ctx.rank}: class counts differ between processes; check data_root on every node")
    if cfg.model.name == "auto":  # resolved once, so config.yaml (eval, predict, resume) names the model itself
        cfg.model.name, why = auto_model(data.input_shape)
        if ctx.is_main:
            log(f"model.name=auto: {cfg.model.name} ({why})")
    saved = ckpt.read_checkpoint(state_path) if resume else None  # (tensors, meta, optimizer meta), read once
    if auto and resume:
        check_same_config(saved[1]["config"], to_dict(cfg), run_dir)
    model = model_from_config(cfg, data)
    if cfg.head.init == "text" and not resume and not cfg.retrain:  # (a resumed run's head is in its checkpoint)
        init_head_from_text(model, cfg, data)
    model = model.to(device)
    if cfg.retrain:  # second stage: the parent's best model, all but the classifier frozen
        prepare_retrain(model, cfg.retrain, ckpt.load_weights(Path(cfg.parent) / "best.safetensors"), cfg.finetune)
    if cfg.sync_bn and ctx.enabled:
        model = convert_sync_batchnorm(model, device).to(device)
    cosine = isinstance(getattr(model, "fc", None), NormedLinear)
    channels_last = use_channels_last(cfg, data)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss.name, counts, **cfg.loss.options()).to(device)
    loss_fn.validate = False  # labels were range-checked when the data was loaded: no host sync per step
    optimizer = build_optimizer(model, cfg.optim)
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.is_main:
        check_output_dir(run_dir, needed_bytes=n_params * 4 * 4 + (64 << 20))
        save_config(cfg, run_dir / "config.yaml")
        save_data_description(data, run_dir / DATA_FILE)  # what `ccar predict` needs
        if data.preprocessing is not None:  # csv: what `ccar eval` and `ccar predict` must apply to new rows
            data.preprocessing.save(run_dir / "preprocessing.json", data.augment.mean, data.augment.std)
    dtype = amp_dtype(cfg.amp, device)
    train_loader, eval_batches = make_loaders(data, cfg, device, ctx)
    prepare = lambda x: normalize(x, data.augment, channels_last)  # noqa: E731
    if uses_cache(cfg):  # a frozen backbone: its features once, then the classifier alone trains on them
        data = cached_features(cfg, data, model, eval_batches, prepare, device, dtype, ctx, log)
        train_loader, eval_batches = make_loaders(data, cfg, device, ctx)
        prepare = lambda x: x  # noqa: E731
        head_only(model)  # from here on model(features) = its classifier's logits
    trains = any(p.requires_grad for p in model.parameters())  # (method=ncm trains nothing: no DDP to wrap it)
    net = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if ctx.enabled and trains else model)
    step_fn = torch.compile(net) if cfg.compile else net
    sam = SAM(model.parameters(), cfg.optim.sam, cfg.optim.sam_adaptive) if cfg.optim.sam else None
    tail = None
    if sam is not None and cfg.optim.sam_scope == "tail":
        tail = torch.zeros(len(counts), dtype=torch.bool, device=device)
        tail[tail_classes(counts, cfg.optim.sam_tail_below)] = True
        if not tail.any():
            raise ConfigError(f"optim.sam_tail_below={cfg.optim.sam_tail_below} leaves no tail class (the rarest "
                              f"class has {min(counts)} training images)")
    accumulate = cfg.optim.accumulate
    counts_t = torch.tensor(counts, dtype=torch.float32, device=device)  # (Remix's count ratios)
    policy = batch_policy(cfg.augment)  # augment.policy / augment.cutout: on the uint8 batch, before normalising
    if policy is not None and len(data.input_shape) != 3:
        raise ConfigError(f"augment.policy and augment.cutout apply to images; this run trains on vectors of "
                          f"{data.input_shape[0]} values"
                          + (" (cached from the frozen backbone: cache_features=false augments the images)"
                             if uses_cache(cfg) else ""))

    def forward(x):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return step_fn(x)

    start_epoch, history, best_val, best_state, elapsed, partial = 0, [], -1.0, None, 0.0, None
    if resume:
        tensors, meta, opt_meta = saved
        best_state = ckpt.load_into(model, optimizer, tensors, opt_meta, cfg.finetune)
        start_epoch, history, best_val, elapsed = meta["epoch"] + 1, meta["history"], meta["best_val"], meta["seconds"]
        partial = meta.get("partial")  # stopped mid-epoch (a signal, or checkpoint_minutes): where, and the RNGs
        if partial is not None:
            partial["rng"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    if cfg.retrain == "ncm":  # nearest class mean: nothing to train, the classifier is the training set's means
        set_class_means(model, eval_batches(data.train), prepare, device, dtype, ctx)
        start_epoch = cfg.epochs
    if ctx.is_main:
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        start = (f", from {cfg.model.weights}" if cfg.model.weights else "") + (
            f", finetune={cfg.finetune}: {n_trained:,} trained" if cfg.finetune != "full" else "")
        log(f"{data.summary()}\nmodel {cfg.model.name} ({n_params / 1e6:.2f} M params{', cosine head' if cosine else ''}"
            f"{start}), loss {loss_fn!r}, device {device}{f' x{ctx.world_size}' if ctx.enabled else ''}, "
            f"run folder {run_dir}")
        if accumulate > 1 or sam is not None:
            log(optimizer_summary(cfg.optim, ctx.world_size, tail))
        if policy is not None:
            log(f"augmentation policy: {policy.describe()} (each training batch, after the crop and flip)")
        if resume:
            where = f"epoch {start_epoch + 1}, after step {partial['step']}" if partial else \
                f"the start of epoch {start_epoch + 1}"
            log(f"resuming from its checkpoint: {where}")
        with open(run_dir / "log.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
            f.writelines(json.dumps(h) + "\n" for h in history)
    loss_fn.reduction = "none"  # each sample's loss (ImbSAM splits them by class); the step's loss is their mean
    tb = _tensorboard(run_dir) if ctx.is_main else None

    steps = len(train_loader)
    elapsed_before = elapsed  # time of earlier sessions of a resumed run (not part of this session's ETA)
    has_val = split_size(data.val) > 0
    check_every = 1 if device.type == "cpu" else 25
    first_step = partial["step"] if partial else 0
    bar = _progress(steps * (cfg.epochs - start_epoch) - first_step, cfg.progress and ctx.is_main)
    last_save = time.monotonic()
    with StopSignals(ctx) as stop:  # SIGTERM / SIGUSR1: a checkpoint after the step in progress, then stop
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 1000 + epoch)
            loss_fn.set_epoch(epoch)
            mixing = cfg.mix != "none" and (cfg.mix_until is None or epoch < cfg.mix_until)
            _set_epoch(train_loader, epoch)
            net.train()
            # a frozen backbone: fixed features (LAS: BatchNorm statistics shift to the re-sampled data)
            set_train_modes(model, "full" if cfg.retrain == "las" else "linear" if cfg.retrain else cfg.finetune)
            totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
            if partial is not None:  # resumed mid-epoch: the epoch's sums so far, its random states, its next batch
                if ctx.is_main:  # (sums over all ranks: rank 0 carries them, the others start from 0)
                    totals = torch.tensor(partial["totals"], dtype=torch.float64, device=device)
                resume_loader(train_loader, partial["step"], restore_rng(partial["rng"]))
            nonfinite = torch.zeros(steps, dtype=torch.bool, device=device)
            checked = first_step  # steps before this one are known to have finite losses
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            for step, (x, y) in enumerate(train_loader, start=first_step):
                lr = lr_at(cfg.optim, cfg.epochs, epoch + (step + 1) / steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints before backbone_lr have none
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = prepare(policy(x, ctx.rank, ctx.world_size) if policy is not None else x)
                if mixing:  # mix=mixup|cutmix|remix: the partners' labels and the label weight of each sample
                    x, y_j, lam = mix_batch(x, y, cfg.mix, cfg.mix_alpha, counts_t, cfg.mix_prob, cfg.remix_kappa,
                                            cfg.remix_tau)
                    losses = lambda logits: mixed_losses(loss_fn, logits, y, y_j, lam)  # noqa: E731
                else:
                    losses = lambda logits: loss_fn(logits, y)  # noqa: E731
                # optim.accumulate=K: one optimizer step per K batches (the epoch's last group may be shorter)
                group = min(accumulate, steps - step // accumulate * accumulate)
                stepping = (step + 1) % accumulate == 0 or step + 1 == steps
                # gradients stay local (DDP's no_sync) between steps, and in SAM's passes, which average them
                with no_sync(net) if (sam is not None or not stepping) else contextlib.nullcontext():
                    logits = forward(x)
                    per_sample = losses(logits)
                    loss = per_sample.mean()
                    nonfinite[step] = ~torch.isfinite(loss.detach())
                    if (step + 1) % check_every == 0 or step + 1 == steps:  # one host sync per check, not per step on GPUs
                        if nonfinite[checked : step + 1].any():
                            bad = checked + int(nonfinite[checked : step + 1].nonzero()[0])
                            raise TrainingError(_nonfinite_message(epoch, bad, loss.item(), lr, dtype, x, run_dir))
                        checked = step + 1
                    if step % accumulate == 0:
                        optimizer.zero_grad(set_to_none=True)
                    if sam is None:
                        (loss / group if group > 1 else loss).backward()
                    else:
                        sam_backward(sam, model, per_sample, y, lambda: losses(forward(x)), ctx, tail)
                if stepping:
                    optimizer.step()
                    if cfg.optim.max_norm:
                        project_max_norm(model, cfg.optim.max_norm)
                with torch.no_grad():
                    totals[0] += loss.detach().double() * len(y)
                    totals[1] += (logits.argmax(1) == y).sum()
                    totals[2] += len(y)
                bar.update(1)
                signum, timed = 0, False
                if stepping and ((step + 1) % (check_every * accumulate) == 0 or not ctx.enabled):  # every rank
                    # stops (saves) at the same step, between optimizer steps
                    due = bool(cfg.checkpoint_minutes) and time.monotonic() - last_save > 60 * cfg.checkpoint_minutes
                    signum, timed = stop.agreed(device, due)
                if (signum or timed) and step + 1 < steps:  # (at the epoch's end the epoch checkpoint follows)
                    so_far = ctx.all_reduce_sum(totals.clone())  # the epoch's sums over all ranks
                    if ctx.is_main:
                        part = {"epoch": epoch, "step": step + 1, "totals": so_far.tolist()}
                        meta = {"epoch": epoch - 1, "history": history, "best_val": best_val,
                                "seconds": elapsed + time.perf_counter() - t0, "config": to_dict(cfg), "partial": part}
                        ckpt.save_checkpoint(state_path, saved_state(model, cfg.finetune), optimizer, best_state, meta,
                                             rng_tensors(loader_state(train_loader)))
                    last_save = time.monotonic()
                    if signum:
                        ctx.barrier()  # no rank leaves (and has torchrun tear the group down) before rank 0 has written
                        bar.close()
                        raise Preempted(signum, f"at epoch {epoch + 1}, step {step + 1}/{steps}")
            partial, first_step = None, 0
            ctx.all_reduce_sum(totals)
            train_seconds = time.perf_counter() - t0
            if has_val:
                val = evaluate_split(model, eval_batches(data.val), prepare, device, counts, ctx, dtype, cfg.posthoc_tau,
                                     eval_logit_scale(cfg), shifts=False)
            else:  # val_fraction=0: no model selection, the last epoch is reported as "best" too
                val = {"top1": None, "balanced": None}
            elapsed += time.perf_counter() - t0
            loss_sum, correct, seen = totals.tolist()
            record = {
                "epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": 100 * correct / seen, "lr": lr,
                "val_top1": val["top1"], "val_balanced": val["balanced"], "images_per_s": seen / train_seconds,
                "seconds": elapsed,
            }
            history.append(record)
            # Model selection on the validation split only: balanced (class-averaged) accuracy, which estimates the
            # balanced test top-1 even though validation is long-tailed like training.
            if val["balanced"] is not None and val["balanced"] > best_val:
                best_val = val["balanced"]
                best_state = saved_state(model, cfg.finetune, clone=True)
            eta = (cfg.epochs - epoch - 1) * (elapsed - elapsed_before) / (epoch + 1 - start_epoch)
            if ctx.is_main:
                val_text = f"val {val['top1']:5.1f}% (balanced {val['balanced']:5.1f}%)" if has_val else "no val split"
                line = (f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {record['loss']:.4f}  train {record['train_top1']:5.1f}%  "
                        f"{val_text}  lr {lr:.4f}  "
                        f"{record['images_per_s']:,.0f} img/s  eta {_fmt_time(eta)}")
                bar.write(line) if not bar.disable else log(line)
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if tb is not None:
                    for k, v in record.items():
                        if v is not None:
                            tb.add_scalar(k, v, epoch + 1)
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    meta = {"epoch": epoch, "history": history, "best_val": best_val, "seconds": elapsed, "config": to_dict(cfg)}
                    ckpt.save_checkpoint(state_path, saved_state(model, cfg.finetune), optimizer, best_state, meta)
            last_save = time.monotonic()  # (checkpoint_minutes counts from the last checkpoint, mid-epoch or not)
            ctx.barrier()
        bar.close()
    if tb is not None:
        tb.close()
    metrics = finish(cfg, data, model, best_state, history, eval_batches, prepare, device, ctx, dtype, log)
    ctx.barrier()  # every rank leaves together, after rank 0 has written the run: no rank tears down the group early
    return metrics


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif getattr(loader, "sampler", None) is not None and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _nonfinite_message(epoch, step, value, lr, dtype, x, run_dir) -> str:
    if not torch.isfinite(x).all():
        cause = "the input batch itself holds NaN/Inf (bad data)"
    elif dtype == torch.float16:
        cause = "fp16 overflow (try amp=bf16 or amp=off)"
    else:
        cause = f"a learning rate too high for this model/loss (lr was {lr:.4g}; try optim.lr={lr / 10:.3g})"
    return (f"non-finite loss {value} at epoch {epoch + 1}, step {step + 1}; likely cause: {cause}. "
            f"The last good checkpoint is kept in {run_dir}; fix the cause and rerun with --resume")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))


def finish(cfg, data, model, best_state, history, eval_batches, prepare, device, ctx, dtype, log) -> Dict[str, object]:
    """Evaluate the best-on-validation and the last model on the test set; write metrics, weights and figures."""
    run_dir = cfg.run_dir()
    last_state = saved_state(model, cfg.finetune, clone=True)
    results = {}
    for which, state in (("last", last_state), ("best", best_state or last_state)):
        load_trained(model, state, cfg.finetune)
        results[which] = evaluate_test_split(cfg, data, model, eval_batches, prepare, device, ctx, dtype)
    if best_state is None:  # no validation split
        best_epoch = len(history)
    else:
        best_epoch = max(range(len(history)), key=lambda i: (history[i]["val_balanced"] or -1, -i)) + 1
    val = history[best_epoch - 1] if history else {"val_top1": None, "val_balanced": None}
    if not history and split_size(data.val) > 0:
        # method=ncm trains no epoch; its validation score is what a sweep tunes the first stage by
        scores = evaluate_split(model, eval_batches(data.val), prepare, device, data.class_counts, ctx, dtype,
                                cfg.posthoc_tau, eval_logit_scale(cfg), shifts=False)
        val = {"val_top1": scores["top1"], "val_balanced": scores["balanced"]}
    metrics = {
        **{k: results["best"][k] for k in ("top1", "balanced", "per_class", "many", "medium", "few", "groups", "ece",
                                           "test_agnostic", "test_agnostic_oracle", "confusion_groups")},
        "val_top1": val["val_top1"],
        "val_balanced": val["val_balanced"],
        "best_epoch": best_epoch,
        "epochs": len(history),
        "seconds": history[-1]["seconds"] if history else 0.0,
        "class_counts": data.class_counts,
        "selection": "nearest class mean (nothing trained, nothing selected)" if cfg.retrain == "ncm" else
        "best balanced accuracy on the validation split" if best_state is not None else "last epoch (no validation split)",
        "best": results["best"],
        "last": results["last"],
    }
    if "tau_norm" in results["best"]:
        metrics["tau_norm"] = results["best"]["tau_norm"]
    if cfg.parent:
        metrics["parent"] = cfg.parent
    metrics.update(data.reference)  # e.g. the Bayes balanced accuracy of gaussian-lt
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        ckpt.save_weights(run_dir / "best.safetensors", best_state or last_state)
        ckpt.save_weights(run_dir / "last.safetensors", last_state)
        from ..report.plots import run_figures
        from ..report.tables import metrics_table

        figures = run_figures(run_dir, cfg, metrics, history)
        log(metrics_table({"best-on-val": results["best"], "last epoch": results["last"]}, data.class_counts))
        log(f"results: {run_dir / 'metrics.json'}" + (f"; figures: {', '.join(str(f) for f in figures)}" if figures else ""))
    return metrics
