"""Several same-shaped models trained as one program: the unit a packed sweep is built from.

A ResNet-32 at batch 128 leaves a large GPU almost idle (each step is a few hundred tiny kernels); separate
processes do not fill it either. :class:`PackedModels` stacks K models' parameters and buffers along a new first
dimension (``torch.func.stack_module_state``) and runs them with ``torch.func.vmap`` over ``functional_call``: one
forward pass computes all K models (convolutions become grouped convolutions), each on its own batch, and BatchNorm
keeps each model's running statistics. :class:`PackedStep` adds what makes each model a cell of its own: its own
loss function, its own learning rate, momentum and weight decay (as data, a value per model, not as branches), and
a fused update (:class:`StackedSGD`) whose per-model learning rates live on the device, so that the whole step can
be captured as one CUDA graph like :class:`~ccar.engine.step.CapturedStep`.

``PackedModels.unpack(k)`` gives model k's state dict, with the keys of the model it was packed from: a packed
cell's weights are saved exactly as an unpacked run's.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state


class PackedModels(nn.Module):
    """K models of the same architecture as one module: ``forward(x)`` takes (K, B, ...) and returns (K, B, C)."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if len({tuple((n, p.shape) for n, p in m.state_dict().items()) for m in models}) != 1:
            raise ValueError("packed models must have the same architecture (state-dict names and shapes)")
        params, buffers = stack_module_state(list(models))
        self.k = len(models)
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.params = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.param_names])
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[name].clone())
        # The architecture, its own tensors never used: kept out of the module tree (.to() has nothing to move)
        self.__dict__["template"] = _stats_dtype_norms(copy.deepcopy(models[0]).to("meta").train(models[0].training))

    def stacked(self) -> Dict[str, torch.Tensor]:
        tensors = dict(zip(self.param_names, self.params))
        tensors.update({n: getattr(self, f"buffer_{i}") for i, n in enumerate(self.buffer_names)})
        return tensors

    def train(self, mode: bool = True):
        super().train(mode)
        self.template.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def one(tensors, xb):
            return functional_call(self.template, tensors, (xb,))

        return torch.vmap(one, randomness="different")(self.stacked(), x)

    @torch.no_grad()
    def bind(self, k: int, model: nn.Module) -> None:
        """Make ``model``'s parameters and buffers views of model ``k``'s slice of the stack: what reads or writes
        ``model`` (evaluation, a checkpoint, MaxNorm) reads or writes the packed model ``k``, as it trains."""
        stacked = self.stacked()
        for name, param in model.named_parameters():
            param.data = stacked[name].data[k]
        for name, _ in list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = stacked[name][k]

    def unpack(self, k: int) -> Dict[str, torch.Tensor]:
        """Model ``k``'s state dict (copies), keyed as the model it was packed from."""
        return {name: t[k].detach().clone() for name, t in self.stacked().items()}


class _StatsDtypeNorm:
    """BatchNorm that normalises in its running statistics' dtype: vmap's batch-norm rule, unlike the plain kernel,
    refuses a bf16 input beside float32 statistics (what autocast gives). Under reduced precision the input is cast
    up and the output back; in float32 nothing changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if stats is not None and x.dtype != stats.dtype:
            return super().forward(x.to(stats.dtype)).to(x.dtype)
        return super().forward(x)


def _stats_dtype_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _StatsDtypeNorm):
            module.__class__ = type(f"Packed{type(module).__name__}", (_StatsDtypeNorm, type(module)), {})
    return model


class StackedSGD:
    """SGD with momentum (and Nesterov) over stacked parameters, each model with its own learning rate, momentum and
    weight decay (tensors of K values on the device; weight decay only on parameters of more than one dimension per
    model, as :func:`ccar.engine.train.build_optimizer` does). The learning rates are filled in place each step:
    nothing is read back to the host, so the update can be captured in a CUDA graph."""

    def __init__(self, params: Sequence[nn.Parameter], lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float], nesterov: bool = False):
        self.params = list(params)
        device = self.params[0].device
        self.lr = torch.tensor(list(lr), dtype=torch.float32, device=device)
        self.momentum = torch.tensor(list(momentum), dtype=torch.float32, device=device)
        self.weight_decay = torch.tensor(list(weight_decay), dtype=torch.float32, device=device)
        self.nesterov = nesterov
        self.buffers: List[torch.Tensor] = [torch.zeros_like(p) for p in self.params]
        self.started = torch.zeros((), dtype=torch.bool, device=device)  # the first step sets the buffers to d

    def bind(self, k: int, optimizer: torch.optim.Optimizer, names: Sequence[str], model: nn.Module) -> None:
        """Model ``k``'s own optimizer (a ``torch.optim.SGD`` over its parameters, which a checkpoint saves and a
        resumed run restores) shares its momentum buffers with the stack: a restored buffer is copied in, and from
        then on the optimizer's state is a view of model ``k``'s slice."""
        params = dict(model.named_parameters())
        restored = [optimizer.state.get(params[n], {}).get("momentum_buffer") for n in names]
        if any(b is not None for b in restored):
            self.started.fill_(True)
        for name, buf, old in zip(names, self.buffers, restored):
            if old is not None:
                buf[k].copy_(old)
            optimizer.state[params[name]]["momentum_buffer"] = buf[k]

    def set_lr(self, lrs: Sequence[float]) -> None:
        """Each model's learning rate for the next step (host values, copied in place: the tensor stays put)."""
        self.lr.copy_(torch.tensor(list(lrs), dtype=torch.float32), non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @staticmethod
    def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (like.ndim - 1)))

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.buffers):
            if p.grad is None:
                continue
            d = p.grad
            if p.ndim > 2:  # (K, ...) of a weight of more than one dimension: decayed
                d = d + self._per_model(self.weight_decay, p) * p
            m = self._per_model(self.momentum, p)
            buf.copy_(torch.where(self.started, m * buf + d, d))  # torch's SGD: the first buffer is the gradient
            update = d + m * buf if self.nesterov else buf
            p.sub_(self._per_model(self.lr, p) * update)
        self.started.fill_(True)


class PackedStep:
    """Forward, each model's own loss, backward and the stacked update for K batches at once (one per model):
    ``__call__(xs, ys)`` with xs (K, B, ...) and ys (K, B); returns the K mean losses and the logits (K, B, C)."""

    def __init__(self, packed: PackedModels, loss_fns: Sequence[nn.Module], optimizer: StackedSGD,
                 autocast=contextlib.nullcontext):
        if len(loss_fns) != packed.k:
            raise ValueError(f"{packed.k} packed models need {packed.k} loss functions, got {len(loss_fns)}")
        self.packed, self.loss_fns, self.optimizer, self.autocast = packed, list(loss_fns), optimizer, autocast
        for loss_fn in self.loss_fns:
            loss_fn.reduction = "none"

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor):
        return self._update(xs, lambda logits: torch.stack([fn(logits[k], ys[k]).mean()
                                                            for k, fn in enumerate(self.loss_fns)]))

    def run(self, batches: Sequence) -> tuple:
        """One step of K :class:`~ccar.engine.step.Batch` es (one per model, each with its own per-sample losses:
        a mixed batch mixes its two labels' losses)."""
        xs = torch.stack([b.x for b in batches])
        return self._update(xs, lambda logits: torch.stack([b.losses(fn, logits[k]).mean() for k, (b, fn)
                                                            in enumerate(zip(batches, self.loss_fns))]))

    def _update(self, xs: torch.Tensor, mean_losses):
        with self.autocast():
            logits = self.packed(xs)
        losses = mean_losses(logits)
        self.optimizer.zero_grad()
        losses.sum().backward()  # each model's parameters get the gradient of its own mean loss
        self.optimizer.step()
        return losses.detach(), logits.detach()


class CapturedPackedStep(PackedStep):
    """:class:`PackedStep` as one CUDA graph, as :class:`~ccar.engine.step.CapturedStep` does for one model: the
    first ``warmup`` full steps run eagerly on a side stream, the next is captured, then replayed with the stacked
    batches copied into its static inputs (the per-model learning rates are a device tensor the schedule fills).
    The epoch's last, partial step and mixed batches run eagerly; a loss that changes (DRW) is captured again."""

    def __init__(self, *args, warmup: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup, self.warm, self.graph, self.key, self.overhead_seconds = warmup, 0, None, None, 0.0

    def run(self, batches: Sequence) -> tuple:
        if any(b.y_mix is not None for b in batches):
            return super().run(batches)
        xs, ys = torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches])
        key = tuple(getattr(fn, "drw_active", None) for fn in self.loss_fns)
        if self.graph is not None and (key != self.key or xs.shape != self.static_x.shape):
            if xs.shape != self.static_x.shape:  # the epoch's last, partial batches
                return self(xs, ys)
            self.graph = None  # a loss changed: capture again
        if self.graph is None:
            if self.warm < self.warmup:
                self.warm += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self(xs, ys)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(xs, ys, key)
        self.static_x.copy_(xs)
        self.static_y.copy_(ys)
        self.graph.replay()
        return self.static_out

    def _capture(self, xs: torch.Tensor, ys: torch.Tensor, key) -> None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        self.static_x, self.static_y, self.key = xs.clone(), ys.clone(), key
        self.optimizer.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self(self.static_x, self.static_y)
        torch.cuda.synchronize()
        self.overhead_seconds += time.perf_counter() - started

    def take_overhead(self) -> float:
        seconds, self.overhead_seconds = self.overhead_seconds, 0.0
        return seconds
