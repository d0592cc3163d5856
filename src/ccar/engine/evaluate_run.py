"""Re-evaluate a finished run's saved model on the test set (``ccar eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..config import load_config
from ..errors import ConfigError
from ..report.tables import metrics_table
from .build import load_run
from .scoring import evaluate_test_split


def evaluate_run(run_dir: Path, which: str = "best", overrides: Sequence[str] = ()) -> dict:
    """Metrics of ``run_dir``'s ``best`` or ``last`` weights; overrides such as ``posthoc_tau=1`` or ``data_root``."""
    config = run_dir / "config.yaml"
    weights = run_dir / f"{which}.safetensors"
    if not config.is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished ccar run (needs config.yaml and {weights.name})")
    cfg = load_config(str(config), overrides)
    run = load_run(cfg, weights)
    metrics = evaluate_test_split(run)
    suffix = f"-posthoc{cfg.posthoc_tau:g}" if cfg.posthoc_tau else ""
    suffix += f"-taunorm{cfg.tau_norm}" if cfg.tau_norm is not None else ""
    path = run_dir / f"eval-{which}{suffix}.json"
    path.write_text(json.dumps(metrics, indent=1))
    label = which + (f" +LA τ={cfg.posthoc_tau:g}" if cfg.posthoc_tau else "")
    label += f" +τ-norm {metrics['tau_norm']:g}" if "tau_norm" in metrics else ""
    return {"metrics": metrics, "path": path, "table": metrics_table({label: metrics}, run.data.class_counts)}
