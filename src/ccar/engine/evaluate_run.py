"""Re-evaluate a finished run's saved model on the test set (``ccar eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


from ..data import normalize
from ..errors import ConfigError
from ..report.tables import metrics_table
from . import checkpoint as ckpt
from .finetune import load_trained
from .config import load_config
from .distributed import DistContext
from .scoring import evaluate_test_split
from .setup import amp_dtype, dataset_from_config, make_loaders, model_from_config, resolve_device, use_channels_last


def evaluate_run(run_dir: Path, which: str = "best", overrides: Sequence[str] = ()) -> dict:
    """Metrics of ``run_dir``'s ``best`` or ``last`` weights; overrides such as ``posthoc_tau=1`` or ``data_root``."""
    config = run_dir / "config.yaml"
    weights = run_dir / f"{which}.safetensors"
    if not config.is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished ccar run (needs config.yaml and {weights.name})")
    cfg = load_config(str(config), overrides)
    device = resolve_device(cfg.device)
    data = dataset_from_config(cfg)
    model = model_from_config(cfg, data).to(device)
    load_trained(model, ckpt.load_weights(weights), cfg.finetune, str(weights))
    _, eval_batches = make_loaders(data, cfg, device, DistContext())
    prepare = lambda x: normalize(x, data.augment, use_channels_last(cfg, data))  # noqa: E731
    metrics = evaluate_test_split(cfg, data, model, eval_batches, prepare, device, DistContext(),
                                  amp_dtype(cfg.amp, device))
    suffix = f"-posthoc{cfg.posthoc_tau:g}" if cfg.posthoc_tau else ""
    suffix += f"-taunorm{cfg.tau_norm}" if cfg.tau_norm is not None else ""
    path = run_dir / f"eval-{which}{suffix}.json"
    path.write_text(json.dumps(metrics, indent=1))
    label = which + (f" +LA τ={cfg.posthoc_tau:g}" if cfg.posthoc_tau else "")
    label += f" +τ-norm {metrics['tau_norm']:g}" if "tau_norm" in metrics else ""
    return {"metrics": metrics, "path": path, "table": metrics_table({label: metrics}, data.class_counts)}
