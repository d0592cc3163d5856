"""The models of two method families: multiple experts (RIDE, SADE) and contrastive learning (PaCo, GPaCo, BCL).

In training these models return a dict of tensors -- ``"logits"`` (what the loop counts accuracy by) and what
their losses need (``"experts"``; ``"features"``, ``"prototypes"``, ``"keys"``, ``"queue"``); in evaluation they
return logits like every other model, so evaluation, ``ccar eval`` and ``ccar predict`` need nothing new:

- :class:`MultiExpert`: a shared early backbone (stem and first stage) and E expert branches (the later stages,
  pooling and classifier per expert, at ``expert_width`` of the single model's widths, as RIDE and SADE do); the
  prediction is the weighted average of the experts' logits (weights: a buffer, equal unless SADE's test-time
  aggregation set them);
- :class:`Contrastive`: a backbone with its classifier plus a projection head (two layers, L2-normalised output)
  over the pooled features; BCL adds a prototype head over the classifier's weights; PaCo adds a momentum encoder
  and a queue of its keys (MoCo's), both saved with the weights so a resumed run continues them.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import STEM_FROM
from .heads import make_head


class _PadShortcut(nn.Module):
    """The CIFAR ResNets' parameter-free shortcut between any widths: subsample, zero-pad the channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.lo, self.hi = stride, (planes - in_planes) // 2, planes - in_planes - (planes - in_planes) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.lo, self.hi))


class _Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (_PadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Expert(nn.Module):
    """One expert: its layers, global average pooling, its classifier."""

    def __init__(self, layers: nn.Module, width: int, num_classes: int, cosine_head: bool):
        super().__init__()
        self.layers, self.fc = layers, make_head(width, num_classes, cosine_head)
        self.width = width

    def parts(self, h):
        """(pooled features, logits)."""
        feature = self.layers(h).mean((2, 3))
        return feature, self.fc(feature)

    def forward(self, h):
        return self.parts(h)[1]


ROUTER_HIDDEN = 16  # RIDE's expert_hidden_fc_output_dim


class _Router(nn.Module):
    """RIDE's routers: router i (after expert i, 0-based, for i < E-1) sees the L2-normalised pooled features of
    expert i through its own ``Linear(width, 16)`` + ReLU, beside the top ``top`` values of the mean logits of experts
    0..i (times ``scale``: RIDE's model multiplies cosine logits by s = 30 before its routers see them); a shared
    ``Linear(16 + top, 1)`` gives the logit of "ask the next expert"."""

    def __init__(self, widths, top: int, scale: float):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(w, ROUTER_HIDDEN) for w in widths)
        self.out = nn.Linear(ROUTER_HIDDEN + top, 1)
        self.top, self.scale = top, scale

    def forward(self, i: int, feature: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.hidden[i](F.normalize(feature, dim=1)))
        top = torch.topk(mean_logits * self.scale, self.top, dim=1).values
        return self.out(torch.cat([top.to(hidden.dtype), hidden], dim=1)).squeeze(1)


class MultiExpert(nn.Module):
    """A shared ``trunk`` and E ``experts``: training returns ``{"logits": mean, "experts": (E, B, C)}`` (and
    ``"router"`` (B, E-1) with a ``router``), evaluation the experts' logits averaged with ``expert_weights`` (E
    values summing to 1; equal by default) -- or, with a ``router``, routed: each image consults experts in order
    until its router says enough, and gets the mean of those it consulted (:meth:`routed`)."""

    def __init__(self, trunk: nn.Module, experts: nn.ModuleList, router: Optional[_Router] = None):
        super().__init__()
        self.trunk, self.experts, self.router = trunk, experts, router
        self.register_buffer("expert_weights", torch.full((len(experts),), 1.0 / len(experts)))

    @property
    def fc(self):  # (the first expert's classifier: what summaries and checks of "the classifier" look at)
        return self.experts[0].fc

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.stack([expert(h) for expert in self.experts])

    def forward(self, x: torch.Tensor):
        if self.router is not None:
            return self._train_router(x) if self.training else self.routed(x)[0]
        z = self.expert_logits(x)
        if self.training:
            return {"logits": z.mean(0), "experts": z}
        return torch.einsum("e,ebc->bc", self.expert_weights.to(z.dtype), z)

    def _train_router(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.trunk(x)
        features, logits = zip(*(expert.parts(h) for expert in self.experts))
        z = torch.stack(logits)
        running = z.float().cumsum(0) / torch.arange(1, len(z) + 1, device=z.device).view(-1, 1, 1)
        router = torch.stack([self.router(i, features[i], running[i]) for i in range(len(z) - 1)], dim=1)
        return {"logits": z.mean(0), "experts": z, "router": router}

    @torch.no_grad()
    def routed(self, x: torch.Tensor):
        """(logits (B, C), experts consulted per image (B,)): expert 1 for every image; then, while its router's
        logit is > 0 (probability > 0.5), each image asks the next expert, which runs on those images only."""
        h = self.trunk(x)
        feature, total = self.experts[0].parts(h)
        total = total.float()
        count = torch.ones(len(x), device=x.device)
        rows = torch.arange(len(x), device=x.device)
        for i in range(1, len(self.experts)):
            ask = self.router(i - 1, feature, total[rows] / count[rows].unsqueeze(1)) > 0
            rows, feature = rows[ask], feature[ask]
            if not len(rows):
                break
            feature, z = self.experts[i].parts(h[rows])
            total[rows] += z.float()
            count[rows] += 1
        return total / count.unsqueeze(1), count


def multi_expert(name: str, num_classes: int, input_shape, experts: int, expert_width: float, *, width: int = 32,
                 depth: int = 32, cosine_head: bool = False, router_top: int = 0,
                 router_scale: float = 1.0) -> MultiExpert:
    """RIDE's architecture (also SADE's) over ccar's ResNet-32 or compact CNN: the stem and first stage shared, each
    expert its own second and third stages at ``expert_width`` of their widths (ResNet-32 at 0.75: 24 and 48
    channels, as RIDE's), its pooling and its classifier; ``router_top`` > 0 adds RIDE's routers (seeing the top
    ``min(router_top, classes)`` mean logits times ``router_scale``: RIDE's s for cosine heads)."""
    if experts < 2:
        raise ConfigError(f"model.experts must be at least 2 for a multi-expert model; got {experts}")
    c = input_shape[0]
    if name in ("resnet32", "resnet_cifar"):
        if (depth - 2) % 6:
            raise ConfigError(f"model.depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        stem = min(input_shape[1:]) >= STEM_FROM  # large inputs: the single model's stride-4 entry
        trunk = nn.Sequential(nn.Conv2d(c, 16, 3, 2 if stem else 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1) if stem else nn.Identity(), *[_Block(16, 16, 1) for _ in range(n)])
        mid, last = (max(2, 2 * round(planes * expert_width / 2)) for planes in (32, 64))

        def branch():
            layers, in_planes = [], 16
            for planes in (mid, last):
                for i in range(n):
                    layers.append(_Block(in_planes, planes, 2 if i == 0 else 1))
                    in_planes = planes
            return _Expert(nn.Sequential(*layers), last, num_classes, cosine_head)
    elif name == "cnn":
        trunk = nn.Sequential(*[m for i in range(2) for m in (
            nn.Conv2d(c if i == 0 else width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())])
        mid, last = (max(1, round(planes * expert_width)) for planes in (2 * width, 4 * width))

        def branch():
            layers, c_in = [], width
            for planes in (mid, last):
                layers.append(nn.MaxPool2d(2))
                for _ in range(2):
                    layers += [nn.Conv2d(c_in, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()]
                    c_in = planes
            return _Expert(nn.Sequential(*layers), last, num_classes, cosine_head)
    else:
        raise ConfigError(f"multi-expert models (model.experts > 1) are built over resnet32 or cnn; got "
                          f"model.name={name}")
    branches = nn.ModuleList(branch() for _ in range(experts))
    router = (_Router([b.width for b in branches][:-1], min(router_top, num_classes), router_scale)
              if router_top > 0 else None)
    model = MultiExpert(trunk, branches, router)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


class Contrastive(nn.Module):
    """``base`` (a model with ``embed(x)`` -> pooled features and a linear ``fc``) plus a projection head. Training
    with ``targets`` returns the classifier's logits and the projected, L2-normalised features of every row (the
    views stacked), BCL's ``prototypes`` (its head over the classifier's weights) when ``prototypes``, and PaCo's
    ``keys`` / ``queue`` when ``queue`` > 0 (a momentum encoder of ``base`` and the projection, updated before each
    training forward pass; the keys of the second view are queued after the queue is read; the online encoder
    then sees the first view, the query, alone: logits and features of its B rows)."""

    def __init__(self, base: nn.Module, dim: int = 128, prototypes: bool = False, queue: int = 0,
                 momentum: float = 0.999):
        super().__init__()
        width = base.fc.in_features if isinstance(base.fc, nn.Linear) else base.fc.weight.shape[0]
        self.base, self.momentum = base, momentum
        self.proj = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.prototype_head = (nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
                               if prototypes else None)
        self.key_encoder: Optional[nn.Module] = None
        if queue:
            self.key_encoder = copy.deepcopy(nn.ModuleDict({"base": base, "proj": self.proj}))
            for p in self.key_encoder.parameters():
                p.requires_grad_(False)
            self.register_buffer("queue", torch.zeros(queue, dim))
            self.register_buffer("queue_targets", torch.full((queue,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def fc(self):  # (the classifier of ccar.models.heads.classifier and friends)
        return self.base.fc

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if not self.training:
            return self.base(x)
        paco = self.key_encoder is not None and targets is not None
        h = self.base.embed(x[: len(targets)] if paco else x)  # (PaCo's online encoder sees the query view only)
        out: Dict[str, torch.Tensor] = {"logits": self.base.fc(h), "features": F.normalize(self.proj(h).float(), dim=1)}
        if self.prototype_head is not None:
            weight = self.base.fc.weight if isinstance(self.base.fc, nn.Linear) else self.base.fc.weight.t()
            out["prototypes"] = F.normalize(self.prototype_head(weight).float(), dim=1)
        if paco:
            out.update(self._keys(x[len(targets): 2 * len(targets)], targets))
        return out

    @torch.no_grad()
    def _keys(self, view2: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        online = list(self.base.parameters()) + list(self.proj.parameters())
        for k, q in zip(self.key_encoder.parameters(), online):
            k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)
        keys = F.normalize(self.key_encoder["proj"](self.key_encoder["base"].embed(view2)).float(), dim=1)
        out = {"keys": keys, "queue": self.queue.clone(), "queue_targets": self.queue_targets.clone()}
        self._enqueue(*_gathered(keys, targets))
        return out

    def _enqueue(self, keys: torch.Tensor, targets: torch.Tensor) -> None:
        size = len(self.queue)
        if len(keys) > size:  # a (global) batch larger than the queue: its last keys fill it
            keys, targets = keys[-size:], targets[-size:]
        n = len(keys)
        rows = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[rows] = keys
        self.queue_targets[rows] = targets
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def _gathered(keys: torch.Tensor, targets: torch.Tensor):
    """Every process's keys and labels (PaCo's queue is global under torchrun, as in its paper), in the global
    batch's order (rank r holds its rows r, r + W, ...: :func:`ccar.data.sampling.shard`), so the queue is what one
    process would have queued."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, targets
    keys_all = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    targets_all = [torch.empty_like(targets) for _ in range(dist.get_world_size())]
    dist.all_gather(keys_all, keys.contiguous())
    dist.all_gather(targets_all, targets.contiguous())
    return torch.stack(keys_all, 1).flatten(0, 1), torch.stack(targets_all, 1).flatten(0, 1)
