"""What multi-expert models do at test time: SADE's test-time self-supervised aggregation, scored as the paper
scores it (Zhang et al., NeurIPS 2022), and the statistics of RIDE's routed evaluation (:func:`routing_stats`).

A multi-expert model's experts are trained for different label distributions; at test time the weights of their
ensemble are learnt from the *unlabeled* test inputs alone, by making the aggregated prediction stable between two
augmented views of each input (:func:`ccar.losses.experts.fit_expert_weights`). The label distribution of the test
set is what the weights adapt to, so each test-agnostic prior (forward / backward long tails of
:func:`ccar.metrics.shifted_prior`, and uniform) gets its own test set: the balanced test set sub-sampled to that
prior (per class: its share of the largest class's images, at least one; seeded), on which the weights are learnt
and the accuracy scored -- beside the equal-weight ensemble on the same images.

The test labels play no part in the weights: they only score the result. The model's own weights are unchanged
(``ccar predict`` aggregates with equal weights unless told otherwise).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch

from ..data.loaders import random_crop_flip
from ..losses.experts import fit_expert_weights
from ..metrics import AGNOSTIC_FACTORS, _agnostic_keys, shifted_prior
from .build import make_loaders
from .distributed import DistContext
from .run import Run


@torch.no_grad()
def two_view_logits(model, images: Iterable[torch.Tensor], augment, prepare: Callable, autocast: Callable,
                    seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The experts' logits (E, N, C), on the CPU, of two views of every raw image batch in ``images`` (on the
    model's device): as evaluated, and another random crop (at least 2 px) and flip drawn from a generator seeded
    with ``seed``. ``prepare`` normalises a raw batch; ``autocast()`` is the run's precision context."""
    generator = torch.Generator().manual_seed(seed)
    views: Tuple[list, list] = ([], [])
    for x in images:
        second = random_crop_flip(x, max(augment.crop_padding, 2), augment.flip, generator) if x.ndim == 4 else x
        for out, batch in zip(views, (x, second)):
            with autocast():
                out.append(model.expert_logits(prepare(batch)).float().cpu())
    return torch.cat(views[0], 1), torch.cat(views[1], 1)


def _test_batches(run: Run):
    """The whole test split's batches (under torchrun too: rank 0 scores it alone)."""
    loader = run.eval_batches if not run.dist.enabled else make_loaders(run.data, run.cfg, run.device,
                                                                        DistContext())[1]
    return loader(run.data.test)


@torch.no_grad()
def expert_views(run: Run, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' logits (E, N, C) of two views of every test image (:func:`two_view_logits`) and the labels
    (N,), on the CPU."""
    run.model.eval()
    targets = []

    def images():
        for x, y in _test_batches(run):
            targets.append(y.cpu())
            yield x.to(run.device, non_blocking=True)

    v1, v2 = two_view_logits(run.model, images(), run.data.augment, run.prepare, run.autocast, seed)
    return v1, v2, torch.cat(targets)


@torch.no_grad()
def routing_stats(run: Run) -> Dict[str, object]:
    """A routed multi-expert model (RIDE's second stage) on the whole test split: the mean number of experts an
    image consulted, and the share of images that reached each expert."""
    model = run.model
    model.eval()
    counts = []
    for x, _ in _test_batches(run):
        with run.autocast():
            counts.append(model.routed(run.prepare(x.to(run.device, non_blocking=True)))[1].cpu())
    count = torch.cat(counts)
    reached = [round(100.0 * float((count > e).float().mean()), 2) for e in range(len(model.experts))]
    return {"experts_per_image": round(float(count.mean()), 4), "reached_percent": reached,
            "experts": len(model.experts)}


def subsample(targets: torch.Tensor, prior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of a test set drawn from the balanced ``targets`` with class proportions ``prior``: class c keeps
    round(m_c * q_c / max q) of its m_c images (at least 1), the first of a seeded permutation.

    >>> subsample(torch.tensor([0] * 4 + [1] * 4), torch.tensor([0.8, 0.2]), torch.Generator().manual_seed(0)).numel()
    5
    """
    keep = []
    top = float(prior.max())
    for c in range(len(prior)):
        members = (targets == c).nonzero().flatten()
        if len(members) == 0:
            continue
        n = max(1, round(len(members) * float(prior[c]) / top))
        keep.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(keep).sort().values


def self_supervised_aggregation(run: Run) -> Dict[str, Dict[str, object]]:
    """Per test-agnostic prior: top-1 (%) of the equal-weight ensemble and of the self-supervised weights on the
    test set sub-sampled to that prior, the weights, and the number of test images."""
    seed = run.cfg.seed
    v1, v2, targets = expert_views(run, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    out: Dict[str, Dict[str, object]] = {}
    for key, factor, direction in _agnostic_keys(AGNOSTIC_FACTORS):
        idx = subsample(targets, shifted_prior(run.data.class_counts, factor, direction).float(), generator)
        a, b, y = v1[:, idx], v2[:, idx], targets[idx]
        weights = fit_expert_weights(a, b, generator=torch.Generator().manual_seed(seed + 2))
        equal = a.mean(0).argmax(1)
        learnt = torch.einsum("e,enc->nc", weights.float(), a).argmax(1)
        out[key] = {"equal": 100.0 * float((equal == y).float().mean()),
                    "self_supervised": 100.0 * float((learnt == y).float().mean()),
                    "weights": [round(float(w), 4) for w in weights], "images": int(len(idx))}
    return out
