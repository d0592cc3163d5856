"""Batched inference of a model over a split (the metrics themselves are :mod:`ccar.metrics`)."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict(model: torch.nn.Module, batches, prepare, device, amp_dtype=None) -> tuple:
    """Run ``model`` over ``batches`` of (x, y); returns (float32 logits, targets) on the CPU."""
    model.eval()
    outs, ys = [], []
    for x, y in batches:
        x = prepare(x.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        outs.append(logits.float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)
