"""Batched inference of a run's model over a split (the metrics themselves are :mod:`ccar.metrics`)."""

from __future__ import annotations

from typing import Tuple

import torch

from .run import Run


@torch.no_grad()
def predict(run: Run, batches, bar=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``run.model`` over ``batches`` of (x, y); returns (float32 logits, targets) on the CPU. ``bar``: a
    progress bar advanced by each batch's size."""
    run.model.eval()
    outs, ys = [], []
    for x, y in batches:
        x = run.prepare(x.to(run.device, non_blocking=True))
        with run.autocast():
            logits = run.model(x)
        outs.append(logits.float().cpu())
        ys.append(y.cpu())
        if bar is not None:
            bar.update(len(y))
    return torch.cat(outs), torch.cat(ys)
