"""Models: ResNet-32 for CIFAR, a compact CNN for 28x28 images, an MLP for tables, a cosine classifier head, and
torchvision/timm backbones when those optional extras are installed."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .heads import NormedLinear, classifier, classifier_name, make_head as _head

MODELS = ("auto", "resnet32", "cnn", "mlp", "resnet50", "resnext50", "timm:<name>", "hf:<hub id or folder>")
HF_PREFIX = "hf:"
TIMM_PREFIX = "timm:"
STEM_FROM = 96  # ResNet-32 on inputs this large or larger starts with a stride-4 stem


class _ShortcutA(nn.Module):
    """Parameter-free shortcut of the CIFAR ResNets (option A): subsample and zero-pad the channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016), 16/32/64 channels; n = 5 is ResNet-32 (~0.46 M params)."""

    def __init__(self, num_classes: int, depth: int = 32, in_channels: int = 3, cosine_head: bool = False,
                 stem: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"model.depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        # stem: an ImageNet-style entry (stride-2 conv, 3x3 max-pool) so the stages run at a quarter of the input's
        # resolution -- what makes the network trainable on a CPU for photos of 96 px and more.
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 2 if stem else 1, 1, bias=False)
        self.pool = nn.MaxPool2d(3, 2, 1) if stem else nn.Identity()
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = _head(64, num_classes, cosine_head)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def embed(self, x):
        """The pooled features the classifier reads."""
        return self.layers(self.pool(F.relu(self.bn1(self.conv1(x))))).mean((2, 3))

    def forward(self, x):
        return self.fc(self.embed(x))


class SmallCNN(nn.Module):
    """Six 3x3 conv layers in three stages (width w, 2w, 4w) with BN and ReLU, global pooling, linear head."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, cosine_head: bool = False):
        super().__init__()
        layers, c_in = [], in_channels
        for stage, c in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = _head(c_in, num_classes, cosine_head)

    def embed(self, x):
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.fc(self.embed(x))


class MLP(nn.Module):
    """Multilayer perceptron for tabular features (Linear, BatchNorm, ReLU per hidden layer)."""

    def __init__(self, num_classes: int, in_features: int, hidden: Sequence[int] = (256, 256), cosine_head: bool = False):
        super().__init__()
        layers, d = [], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            d = h
        self.features = nn.Sequential(*layers)
        self.fc = _head(d, num_classes, cosine_head)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.features(x))


def _timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or a timm built against another torch (as beside the CPU wheel)
        raise ConfigError(f"model.name=timm:... needs timm importable beside your torch ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); pip install 'ccar[vision]'") from exc
    return timm


def timm_preprocessing(name: str):
    """Input size, mean and std of timm model ``name``'s pretrained weights (its ``pretrained_cfg``)."""
    from .pretrained import Preprocessing

    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"model.name=timm:{name}: timm knows no pretrained weights of that name "
                          f"(`timm.list_pretrained('{name.split('.')[0]}*')` lists them)")
    return Preprocessing(int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std))


def _timm_model(name: str, num_classes: int, cosine_head: bool, pretrained: bool, weights: Optional[str]) -> nn.Module:
    """A timm backbone (its own classifier removed) behind ccar's classifier, as a :class:`PretrainedClassifier`.
    ``pretrained``: timm loads the weights -- from the hub (or its cache), or from ``weights`` through timm's own
    ``pretrained_cfg_overlay`` (a local file; timm drops a classifier of another class count)."""
    from .pretrained import PretrainedClassifier

    timm = _timm()
    overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if pretrained and weights else {}
    try:
        backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **overlay)
    except Exception as exc:  # unknown model (RuntimeError), unreachable hub, unreadable file
        hint = "" if weights or not pretrained else "; offline, give the weight file with model.weights=FILE"
        raise ConfigError(f"model.name=timm:{name}: timm cannot build it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from exc
    width = int(backbone.num_features)
    size = timm_preprocessing(name).size if pretrained else None
    return PretrainedClassifier(backbone, width, _head(width, num_classes, cosine_head), size)


def _torchvision(name: str, num_classes: int, cosine_head: bool) -> nn.Module:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or torchvision built for another torch
        raise ConfigError(
            f"model.name={name} needs a torchvision that matches your torch ({exc}); pip install 'ccar[vision]'"
        ) from exc
    ctor = {"resnet50": torchvision.models.resnet50, "resnext50": torchvision.models.resnext50_32x4d}[name]
    model = ctor(weights=None, num_classes=num_classes)
    if cosine_head:
        model.fc = NormedLinear(model.fc.in_features, num_classes)
    return model


def build_model(
    name: str, num_classes: int, input_shape: Tuple[int, ...], *, width: int = 32, depth: int = 32,
    hidden: Sequence[int] = (256, 256), cosine_head: bool = False, pretrained: bool = False,
    weights: Optional[str] = None,
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) or (F,).

    >>> sum(p.numel() for p in build_model("resnet32", 100, (3, 32, 32)).parameters())
    470004
    """
    if name == "resnet32" or name == "resnet_cifar":  # inputs of 96 px or more get the downsampling stem
        return ResNetCifar(num_classes, depth, input_shape[0], cosine_head, stem=min(input_shape[1:]) >= STEM_FROM)
    if name == "cnn":
        return SmallCNN(num_classes, input_shape[0], width, cosine_head)
    if name == "mlp":
        if len(input_shape) != 1:
            raise ConfigError(f"model.name=mlp is for tabular features; this dataset has inputs {input_shape}")
        return MLP(num_classes, input_shape[0], hidden, cosine_head)
    if name.startswith(HF_PREFIX):
        from .pretrained import HFBackbone, PretrainedClassifier, hf_preprocessing

        backbone = HFBackbone(name[len(HF_PREFIX):])
        return PretrainedClassifier(backbone, backbone.num_features, _head(backbone.num_features, num_classes,
                                                                           cosine_head),
                                    hf_preprocessing(name[len(HF_PREFIX):]).size)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX):], num_classes, cosine_head, pretrained, weights)
    if name in ("resnet50", "resnext50"):
        return _torchvision(name, num_classes, cosine_head)
    raise ConfigError(f"unknown model.name {name!r}; valid: {', '.join(MODELS)}")
