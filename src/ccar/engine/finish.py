"""The end of a run: the best-on-validation and the last model scored on the test set, once, after selection;
``metrics.json``, the weight files, the figures and the printed table."""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import torch

from ..report.plots import run_figures
from ..report.tables import metrics_table, sade_table
from . import checkpoint as ckpt
from .finetune import load_trained, saved_state
from .run import Run, split_size
from .scoring import evaluate_split, evaluate_test_split

TEST_KEYS = ("top1", "balanced", "per_class", "many", "medium", "few", "groups", "ece", "test_agnostic",
             "test_agnostic_oracle", "confusion_groups")


def _selection(run: Run, best_state, history: List[Dict[str, object]]) -> tuple:
    """(best epoch, its validation scores, how the model was selected)."""
    if best_state is None:  # no validation split
        best_epoch = len(history)
    else:
        best_epoch = max(range(len(history)), key=lambda i: (history[i]["val_balanced"] or -1, -i)) + 1
    val = history[best_epoch - 1] if history else {"val_top1": None, "val_balanced": None}
    if not history and split_size(run.data.val) > 0:
        # method=ncm trains no epoch; its validation score is what a sweep tunes the first stage by
        scores = evaluate_split(run, run.data.val, shifts=False)
        val = {"val_top1": scores["top1"], "val_balanced": scores["balanced"]}
    how = ("nearest class mean (nothing trained, nothing selected)" if run.cfg.retrain == "ncm" else
           "best balanced accuracy on the validation split" if best_state is not None else
           "last epoch (no validation split)")
    return best_epoch, val, how


def test_time_aggregation(run: Run) -> Optional[Dict[str, object]]:
    """SADE's self-supervised expert weights per test-agnostic prior (:mod:`ccar.engine.test_time`) where the run
    asks for them (``test_time_aggregation``: auto = for sade), on rank 0; else None."""
    mode = run.cfg.test_time_aggregation
    if mode == "auto":
        mode = "self-supervised" if run.cfg.loss.method == "sade" else "none"
    if mode == "none" or not run.dist.is_main:
        return None
    from .test_time import self_supervised_aggregation

    return self_supervised_aggregation(run)


def finish(run: Run, best_state: Optional[Dict[str, torch.Tensor]], history: List[Dict[str, object]]
           ) -> Dict[str, object]:
    """Evaluate the best-on-validation and the last model on the test set; write metrics, weights and figures."""
    cfg, data = run.cfg, run.data
    last_state = saved_state(run.model, cfg.finetune, clone=True)
    results = {}
    for which, state in (("last", last_state), ("best", best_state or last_state)):
        load_trained(run.model, state, cfg.finetune)
        results[which] = evaluate_test_split(run)
    best_epoch, val, how = _selection(run, best_state, history)
    aggregation = test_time_aggregation(run)  # (of the best model, which the loop above left loaded)
    routing = None
    if getattr(run.model, "router", None) is not None and run.dist.is_main:  # RIDE's routed experts
        from .test_time import routing_stats

        routing = routing_stats(run)
    metrics = {
        **{k: results["best"][k] for k in TEST_KEYS},
        "val_top1": val["val_top1"], "val_balanced": val["val_balanced"], "best_epoch": best_epoch,
        "epochs": len(history), "seconds": history[-1]["seconds"] if history else 0.0,
        "class_counts": data.class_counts, "selection": how, "best": results["best"], "last": results["last"],
        "precision": {"ran": run.precision.name, "why": run.precision.why},
    }
    if "tau_norm" in results["best"]:
        metrics["tau_norm"] = results["best"]["tau_norm"]
    if cfg.parent:
        metrics["parent"] = cfg.parent
    if aggregation is not None:
        metrics["test_agnostic_sade"] = aggregation
    if routing is not None:
        metrics["routing"] = routing
    metrics.update(data.reference)  # e.g. the Bayes balanced accuracy of gaussian-lt
    if run.dist.is_main:
        (run.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        ckpt.save_weights(run.run_dir / "best.safetensors", best_state or last_state)
        ckpt.save_weights(run.run_dir / "last.safetensors", last_state)
        figures = run_figures(run.run_dir, cfg, metrics, history)
        run.log(metrics_table({"best-on-val": results["best"], "last epoch": results["last"]}, data.class_counts))
        if aggregation is not None:
            run.log(sade_table(aggregation))
        if routing is not None:
            run.log(f"routed experts: {routing['experts_per_image']:.2f} of {routing['experts']} per test image "
                    f"(share reaching expert 1, 2, ...: {', '.join(f'{r:.1f} %' for r in routing['reached_percent'])})")
        run.log(f"results: {run.run_dir / 'metrics.json'}" + (f"; figures: {', '.join(str(f) for f in figures)}"
                                                               if figures else ""))
    return metrics
