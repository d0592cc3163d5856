"""Which parameters train: the fine-tuning mode of a run, as one function, not a branch in the training loop.

- ``full``: everything (training from scratch, or fine-tuning all of a pretrained backbone);
- ``linear``: the classifier only (a linear probe of a frozen backbone);
- ``bias``: the classifier and every bias of the backbone (BitFit, Ben Zaken et al. 2022);
- ``lora``: the classifier and low-rank adapters on the backbone's layers (Hu et al. 2022, through ``peft``).

In every mode but ``full`` the backbone's BatchNorm statistics stay frozen (under ``linear`` the whole backbone runs in
evaluation mode: :func:`set_train_modes`), and a run's weight files hold only what it trained (plus the classifier):
the base weights are named by its config (``model.weights`` or ``model.name``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn

from ..errors import ConfigError
from ..config.schema import FINETUNE_MODES
from ..models.heads import classifier_name, freeze_batchnorm
from . import checkpoint as ckpt


def set_train_modes(model: nn.Module, mode: str) -> None:
    """After ``model.train()``: a backbone that only feeds a trained classifier (``linear``, and every classifier
    re-training) runs in evaluation mode as a whole -- fixed features, no dropout, BatchNorm statistics kept; under
    ``bias`` and ``lora`` only BatchNorm statistics stay frozen (dropout regularises the adapted layers as usual)."""
    if mode == "full":
        return
    if mode == "linear":
        head = classifier_name(model)
        for name, module in model.named_modules():
            if name and name != head and not name.startswith(head + "."):
                module.eval()
        return
    freeze_batchnorm(model)


def lora_targets(model: nn.Module, head: str) -> List[str]:
    """LoRA's default target modules: every linear layer of the backbone (attention and MLP projections of a
    transformer), else every convolution (a CNN)."""
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in model.named_modules()
                 if isinstance(m, kind) and n and n != head and not n.startswith(head + ".")]
        if names:
            return names
    raise ConfigError("finetune=lora: the backbone has no linear or convolution layer to adapt")


def apply_finetune(model: nn.Module, mode: str, rank: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] = ()) -> nn.Module:
    """Set ``requires_grad`` for ``mode`` (injecting LoRA adapters first for ``lora``); returns the model."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {mode!r}")
    head = classifier_name(model)
    if mode == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise ConfigError("finetune=lora needs peft: pip install 'ccar[lora]'") from exc
        names = list(targets) or lora_targets(model, head)
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(f"lora.targets: no module named {missing[0]!r} in the backbone")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none")
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        in_head = name.startswith(head + ".")
        p.requires_grad_(mode == "full" or in_head or (mode == "bias" and name.endswith(".bias"))
                         or (mode == "lora" and "lora_" in name))
    return model


def trained_keys(model: nn.Module, mode: str, state: Optional[Dict[str, torch.Tensor]] = None) -> Set[str]:
    """The state-dict keys a run in ``mode`` changes: all of them for ``full``; else the trainable parameters
    (the backbone's buffers, BatchNorm statistics among them, stay as loaded)."""
    keys = set(model.state_dict() if state is None else state)
    if mode == "full":
        return keys
    return keys & ({n for n, p in model.named_parameters() if p.requires_grad}
                   | {n for n in keys if ".input_norm." in n})  # the classifier's fitted input statistics


def saved_state(model: nn.Module, mode: str, clone: bool = False) -> Dict[str, torch.Tensor]:
    """What a run's weight files hold: the model's state limited to :func:`trained_keys` (``clone``: a detached
    copy, for the best and last models kept beside the training one)."""
    state = model.state_dict()
    keep = trained_keys(model, mode, state)
    return {k: (v.detach().clone() if clone else v) for k, v in state.items() if k in keep}


def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from a weight file (``model.weights=FILE.safetensors``, a ccar run's
    ``best.safetensors`` included): every tensor must fit, except the classifier, which is re-initialised when its
    shape differs (another class count)."""
    state = ckpt.load_weights(path)
    own = model.state_dict()
    head = classifier_name(model) + "."
    dropped = [k for k in state if k.startswith(head) and (k not in own or own[k].shape != state[k].shape)]
    wrong = [k for k in state if k not in dropped and k in own and own[k].shape != state[k].shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if wrong or missing or unexpected:
        raise ConfigError(f"model.weights={path} does not fit model (shape differs {wrong[:3]}, missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); use the model settings it was trained with")


def load_trained(model: nn.Module, state: Dict[str, torch.Tensor], mode: str, where: str = "weights") -> None:
    """Load a run's weights into a model built (base weights, adapters) from the same config."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    # (a run saved before model.feature_norm trained on raw features: its statistics stay the identity)
    needed = sorted(k for k in trained_keys(model, mode) & set(missing) if ".input_norm." not in k)
    if unexpected or needed:
        raise ConfigError(f"{where} do not fit this model (missing {needed[:3]}, unexpected {unexpected[:3]}); "
                          f"retrain with the run's own model settings")
