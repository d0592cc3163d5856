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
    """A forward hook on the model's classifier that appends each call's input to ``sink``; returns its handle
    (``handle.remove()`` ends it). One hook for every method that needs features: NCM, the tau grid, the cache."""
    def keep(module, inputs, output):
        x = inputs[0].detach() if detach else inputs[0]
        sink.append(x.float() if to_float else x)

    return classifier(model).register_forward_hook(keep)
