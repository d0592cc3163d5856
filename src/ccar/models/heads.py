"""Classifier heads and how the rest of ccar finds them: the cosine head, the lookup of a model's classifier (ccar's
models and torchvision: ``fc``; timm: its own name), LWS's per-class scale around it, and BatchNorm freezing.

Every module that works on "the classifier" (fine-tuning modes, decoupling, scoring, the feature cache) finds it
here, in the lowest layer that owns the concept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class NormedLinear(nn.Module):
    """Cosine classifier: logits = normalize(x) @ normalize(W), in [-1, 1]. Pair it with LDAM (scale s = 30)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class FeatureNorm(nn.Module):
    """The classifier's input conditioning (``model.feature_norm``): ``standardize`` subtracts the training split's
    mean and divides by its std per feature (fitted once, :meth:`fit`; buffers saved with the weights, so ``ccar
    eval`` and ``ccar predict`` apply them through the model itself); ``l2`` scales each feature vector to norm
    sqrt(D). A frozen backbone's features can have any scale (1e-4 for a random CNN, 1e3 for a random ResNet-32):
    without it a linear probe barely moves (docs/benchmarks.md)."""

    def __init__(self, width: int, mode: str = "standardize"):
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Statistics of the training split's features ``x`` (N, D); a near-constant feature is divided by at least
        a thousandth of the typical std (float noise in dead units is not blown up)."""
        if self.mode != "standardize":
            return
        x = x.float().to(self.mean.device)
        std = x.std(0)
        self.mean.copy_(x.mean(0))
        self.std.copy_(std.clamp_min(1e-3 * float(std.mean()) + 1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "standardize":
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.mode == "l2":
            return F.normalize(x, dim=1) * x.shape[1] ** 0.5
        return x

    def extra_repr(self) -> str:
        return self.mode


def _apply_input_norm(module: nn.Module, args: tuple) -> tuple:
    return (module.input_norm(args[0]),) + tuple(args[1:])


def attach_feature_norm(head: nn.Module, width: int, mode: str) -> FeatureNorm:
    """Give the classifier ``head`` a :class:`FeatureNorm` of its inputs as its child ``input_norm`` (state-dict
    keys ``<head>.input_norm.mean`` / ``.std``), applied by a forward pre-hook: the head keeps its class, parameters
    and keys (tau-norm, MaxNorm, LWS, NCM see the same module)."""
    head.input_norm = FeatureNorm(width, mode)
    head.register_forward_pre_hook(_apply_input_norm)
    return head.input_norm


def feature_norm_of(model: nn.Module):
    """The :class:`FeatureNorm` in front of the model's classifier (inside an LWS wrapper too), or None."""
    head = classifier(model)
    return getattr(head, "input_norm", None) or getattr(getattr(head, "classifier", None), "input_norm", None)


def make_head(features: int, num_classes: int, cosine: bool) -> nn.Module:
    return NormedLinear(features, num_classes) if cosine else nn.Linear(features, num_classes)


class LearnableWeightScaling(nn.Module):
    """LWS: ``classifier(x) * scale`` with one learnable scale per class (initialised to 1)."""

    def __init__(self, classifier: nn.Module, num_classes: int):
        super().__init__()
        self.classifier = classifier
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x) * self.scale


def classifier_name(model: nn.Module) -> str:
    """The attribute holding the final classifier (ccar's models and torchvision: ``fc``; timm: its own name)."""
    if hasattr(model, "fc") and isinstance(model.fc, nn.Module):
        return "fc"
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    raise ConfigError(f"cannot find the classifier of {type(model).__name__} (expected an `fc` layer)")


def classifier(model: nn.Module) -> nn.Module:
    return model.get_submodule(classifier_name(model))


def in_head(name: str, head: str) -> bool:
    """Whether the parameter or module ``name`` belongs to the classifier ``head``."""
    return name == head or name.startswith(head + ".")


def linear_classifier(model: nn.Module, what: str) -> nn.Linear:
    """The model's classifier as an ``nn.Linear`` (inside an LWS wrapper too); other heads are an error."""
    head = classifier(model)
    if isinstance(head, LearnableWeightScaling):
        head = head.classifier
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{what} needs a linear classifier; this model's is {type(head).__name__} "
                          f"(a cosine head already has unit-norm rows)")
    return head


def wrap_lws(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier by :class:`LearnableWeightScaling` around it (the model of an LWS run)."""
    name = classifier_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, LearnableWeightScaling(getattr(parent, attr), num_classes))
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm layer in evaluation mode (its running statistics unchanged) while the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def classifier_inputs(model: nn.Module, sink: list, detach: bool = True, to_float: bool = False):
    """A hook on the model's classifier that appends each call's input -- the backbone's features, before any
    :class:`FeatureNorm` -- to ``sink``; returns its handle (``handle.remove()`` ends it). One hook for every
    method that needs features: NCM, the tau grid, the cache."""
    def keep(module, args):
        x = args[0].detach() if detach else args[0]
        sink.append(x.float() if to_float else x)

    return classifier(model).register_forward_pre_hook(keep, prepend=True)
