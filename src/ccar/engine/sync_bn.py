"""BatchNorm over the global batch under ``torchrun`` (``sync_bn=true``).

On CUDA this is PyTorch's ``nn.SyncBatchNorm``. PyTorch's version refuses CPU tensors, so on CPU (gloo) ccar uses
:class:`GlobalBatchNorm`, which computes the same thing with two all-reduces: per-channel sum, sum of squares and
count in the forward; sum of dy and of dy * x_hat in the backward. The affine parameters' gradients stay local
(DistributedDataParallel averages them), exactly as in ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _GlobalBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        total_x = x.sum(dims)
        local = torch.stack([total_x, (x * x).sum(dims), torch.full_like(total_x, x.numel() / x.shape[1])])
        total = _all_reduce(local.double()).to(x.dtype)
        count = total[2]
        mean = total[0] / count
        var = (total[1] / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, invstd, weight, count)
        ctx.dims, ctx.shape = dims, shape
        y = x_hat * weight.view(shape) + bias.view(shape)
        mean, var = mean.detach(), var.detach()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x_hat, invstd, weight, count = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local = torch.stack([dy.sum(dims), (dy * x_hat).sum(dims)])
        grad_bias, grad_weight = local[0].clone(), local[1].clone()  # local: DDP averages parameter gradients
        total = _all_reduce(local.double()).to(dy.dtype)
        mean_dy = (total[0] / count).view(shape)
        mean_dy_xhat = (total[1] / count).view(shape)
        dx = (dy - mean_dy - x_hat * mean_dy_xhat) * (invstd * weight).view(shape)
        return dx, grad_weight, grad_bias, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every process's batch (CPU/gloo stand-in for SyncBatchNorm)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y, mean, var, count = _GlobalBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``model`` as a global-batch BatchNorm for ``device`` (state and parameters kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        with torch.no_grad():
            out.weight.copy_(module.weight)
            out.bias.copy_(module.bias)
        out.weight.requires_grad_(module.weight.requires_grad)  # (frozen stays frozen: PaCo's key encoder, a
        out.bias.requires_grad_(module.bias.requires_grad)  # frozen backbone's BatchNorm)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
