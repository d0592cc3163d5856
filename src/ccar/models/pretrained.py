"""Pretrained backbones behind one small interface: pooled features, their width, and the preprocessing (input
size, mean, std) the backbone expects. The classifier head, the losses and the engine never ask where a backbone
came from.

``model.name=hf:<hub id or local folder>``: any vision model that ``transformers``' ``AutoModel`` loads (ViT,
DINOv2, ConvNeXt, Swin, ResNet, ...; for CLIP and SigLIP the vision tower), with its image processor's size, mean
and std. Offline use works from a local folder and the Hugging Face cache (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

@dataclass(frozen=True)
class Preprocessing:
    """What a pretrained backbone expects of its input images."""

    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("model.name=hf:... needs transformers: pip install 'ccar[hf]'") from exc
    transformers.logging.set_verbosity_error()  # "some weights were not used" on vision towers is expected
    transformers.logging.disable_progress_bar()  # a bar per model load; ccar shows its own progress
    return transformers


def _reason(exc: Exception) -> str:
    """The exception's type and first line that says something: transformers' missing-backend errors start with a
    blank line, so a plain first line would be empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else f"{type(exc).__name__} with no message"


def _not_found(source: str, exc: Exception) -> ConfigError:
    return ConfigError(f"model.name=hf:{source}: cannot load it ({_reason(exc)}); "
                       f"give a local folder saved with save_pretrained, or fetch it once online "
                       f"(`huggingface-cli download {source}`) and run with HF_HUB_OFFLINE=1")


def _load_error(source: str, exc: Exception) -> ConfigError:
    """A missing package is not a missing model: say so, and which package where Python or transformers names it."""
    if not isinstance(exc, ImportError):
        return _not_found(source, exc)
    name = getattr(exc, "name", None)  # set on ModuleNotFoundError; transformers' backend checks leave it None
    fix = f"pip install {name}" if name else "install it and run again"
    return ConfigError(f"model.name=hf:{source}: a package transformers needs for this model is missing "
                       f"({_reason(exc)}); {fix}")


def _side(size) -> int:
    """The side of a processor's size: a number, or a mapping (a dict, or transformers' SizeDict) of height /
    shortest_edge / width."""
    if size is None or isinstance(size, (int, float)):
        return int(size) if size else 0
    for key in ("height", "shortest_edge", "width", "longest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return 0


def _processor_config(transformers, source: str) -> dict:
    """The saved configuration of ``source``'s image processor (preprocessor_config.json, or the image processor
    inside processor_config.json), read as data: building the processor object needs a backend that some
    transformers releases insist on (5.17's ``AutoImageProcessor`` refuses to run without torchvision)."""
    try:
        config, _ = transformers.ImageProcessingMixin.get_image_processor_dict(source)
        return config
    except Exception as exc:  # OSError, ValueError from the hub client
        failure = exc
    try:  # offline, an uncached hub id fails above too: only a model that is there lacks its processor
        from transformers.utils import cached_file

        model_config = cached_file(source, "config.json")  # 5.x: None where 4.x raises OSError
    except Exception as exc:
        raise _load_error(source, exc) from exc
    if model_config is None:
        raise _not_found(source, OSError("no config.json there")) from failure
    if isinstance(failure, OSError):
        raise ConfigError(f"model.name=hf:{source} has no image processor (preprocessor_config.json); "
                          f"a vision model saved with its image processor is needed") from failure
    raise _load_error(source, failure) from failure


@functools.lru_cache(maxsize=8)
def hf_preprocessing(source: str) -> Preprocessing:  # read by the data and by the model: once per process
    """The input size, mean and std of ``source``'s image processor (its crop size when it has one)."""
    config = _processor_config(_transformers(), source)
    size = _side(config.get("crop_size")) or _side(config.get("size"))
    mean, std = config.get("image_mean"), config.get("image_std")
    if not size or not mean or not std:
        missing = [k for k, v in (("size", size), ("image_mean", mean), ("image_std", std)) if not v]
        raise ConfigError(f"model.name=hf:{source}: its image processor gives no {', '.join(missing)}; "
                          f"add them to its preprocessor_config.json")
    return Preprocessing(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


class HFBackbone(nn.Module):
    """A ``transformers`` vision model as a feature extractor: images (B, 3, H, W) -> pooled features (B, D)."""

    def __init__(self, source: str):
        super().__init__()
        transformers = _transformers()
        try:
            model = transformers.AutoModel.from_pretrained(source)
        except Exception as exc:  # OSError, ValueError, the hub client's errors; ImportError for a missing backend
            raise _load_error(source, exc) from exc
        # CLIP, SigLIP (image and text towers): the vision tower, and CLIP's projection into the shared space; the
        # features are then the L2-normalised image embeddings that zero-shot classification compares with text.
        self.joint = hasattr(model.config, "vision_config")
        self.projection = getattr(model, "visual_projection", None) if self.joint else None
        if self.joint:
            model = model.vision_model
        self.model = model
        cfg = model.config
        width = getattr(cfg, "hidden_size", None)
        sizes = getattr(cfg, "hidden_sizes", None)  # ConvNeXt, ResNet, Swin-like: the last stage's width
        self.num_features = int(self.projection.out_features if self.projection is not None
                                else sizes[-1] if sizes else width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # no pooler: the class token of a transformer, else the mean over positions
            hidden = out.last_hidden_state
            pooled = hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))
        pooled = pooled.flatten(1)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, dim=-1) if self.joint else pooled


@torch.no_grad()
def text_classifier(source: str, class_names, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """LIFT's initialisation (Shi et al. 2024): the classifier rows are the class names' text embeddings
    (``prompt`` with the name filled in), times the model's logit scale, so that ``fc(backbone(x))`` starts as the
    model's zero-shot classifier. Returns (weight C x D, bias C)."""
    transformers = _transformers()
    try:
        full = transformers.AutoModel.from_pretrained(source)
    except Exception as exc:  # OSError, ValueError, the hub client's errors; ImportError for a missing backend
        raise _load_error(source, exc) from exc
    if not hasattr(full, "get_text_features"):
        raise ConfigError(f"head.init=text needs a model with a text tower (CLIP, SigLIP); hf:{source} is a "
                          f"{type(full).__name__} without one (use head.init=random)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except ImportError as exc:  # a tokenizer that needs sentencepiece or tokenizers is there, its package is not
        raise _load_error(source, exc) from exc
    except Exception as exc:
        raise ConfigError(f"head.init=text: hf:{source} has no tokenizer saved with it ({type(exc).__name__}); "
                          f"save the model's tokenizer in the same folder") from exc
    siglip = "siglip" in full.config.model_type  # SigLIP's text tower was trained on max-length padding
    texts = [prompt.format(str(name).replace("_", " ")) for name in class_names]
    tokens = tokenizer(texts, padding="max_length" if siglip else True, truncation=True, return_tensors="pt")
    out = full.get_text_features(**tokens)
    text = F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)
    scale = full.logit_scale.exp().float()
    bias = getattr(full, "logit_bias", None)
    bias = torch.zeros(len(texts)) if bias is None else bias.float().expand(len(texts)).clone()
    return text * scale, bias


class PretrainedClassifier(nn.Module):
    """``fc(backbone(x))``: a pretrained backbone and a fresh classifier (linear, or cosine for LDAM).

    Inputs of another size than the backbone's (e.g. 28x28 Fashion-MNIST) are resized on the device (bilinear), and
    one-channel images repeated to three, so every image dataset can use any backbone (``input_size`` None: a
    backbone trained from scratch, which takes the data's own size)."""

    def __init__(self, backbone: nn.Module, num_features: int, head: nn.Module, input_size: Optional[int]):
        super().__init__()
        self.backbone, self.num_features, self.fc, self.input_size = backbone, num_features, head, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and (x.shape[-1] != self.input_size or x.shape[-2] != self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.fc(self.backbone(x))
