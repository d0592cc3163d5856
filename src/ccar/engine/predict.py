"""``ccar predict RUN_DIR INPUT...``: apply a trained model to new inputs with exactly the run's preprocessing.

INPUT is image files or folders (for image runs), CSV files (csv runs: the saved ``preprocessing.json``) or
feature files (.npz / .safetensors / .npy; features runs). The run's post-hoc settings apply (``posthoc_tau``,
``tau_norm``), and may be overridden with ``key=value``; a multi-expert model (RIDE, SADE) averages its experts as
trained, or learns their weights on the inputs with ``test_time_aggregation=self-supervised`` (SADE's test-time
aggregation: the inputs are the unlabeled test set). The output holds, per input, its name and the top-k
class names with their probabilities, as CSV or JSON lines.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import load_config
from ..data import Augment, ImageFileDataset, ImageFiles, normalize
from ..data.folders import IMAGE_EXTENSIONS, decode_image
from ..data.tabular import TabularPreprocessing, read_feature_rows, read_frame
from ..errors import ConfigError, DataError
from ..losses import posthoc_logit_adjustment
from ..losses.experts import fit_expert_weights
from . import checkpoint as ckpt
from .build import DATA_FILE, data_description, dataset_from_config, load_run, model_from_config
from .decoupling import TauNorm, resolve_tau_norm
from .finetune import load_trained
from .runtime import resolve_device, resolve_precision
from .scoring import chosen_tau, eval_logit_scale
from .test_time import two_view_logits

class _Described:
    """A stand-in for :class:`LongTailData` built from ``data.json`` (what the model and normalisation need)."""

    def __init__(self, d: Dict[str, object]):
        self.name, self.num_classes, self.class_names = d["name"], d["num_classes"], list(d["class_names"])
        self.class_counts, self.input_shape, self.kind = list(d["class_counts"]), tuple(d["input_shape"]), d["kind"]
        self.augment = Augment(crop_padding=int(d.get("crop_padding", 2)), flip=bool(d.get("flip", False)),
                               mean=tuple(d["mean"]), std=tuple(d["std"]))  # (runs before ccar saved the crop)
        self.image_size = d["image_size"]


def _image_paths(inputs: Sequence[str]) -> List[Path]:
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not f.name.startswith("."))
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"predict: input {item} does not exist")
    if not paths:
        raise DataError(f"predict: no image files in {', '.join(inputs)}")
    return paths


def _tabular_inputs(inputs: Sequence[str], run_dir: Path, desc) -> Tuple[List[str], np.ndarray]:
    names, blocks = [], []
    prep = None
    if desc.name == "csv":  # the run's fitted preprocessing, read once for every input file
        prep_file = run_dir / "preprocessing.json"
        if not prep_file.is_file():
            raise ConfigError(f"{run_dir} has no preprocessing.json (trained before ccar saved it); retrain it")
        prep, _, _ = TabularPreprocessing.load(prep_file)
    for item in inputs:
        p = Path(item)
        if not p.is_file():
            raise DataError(f"predict: input {item} is not a file")
        if prep is not None:
            if p.suffix.lower() != ".csv":
                raise DataError(f"predict: {p} is not a .csv file; this run was trained on CSV rows")
            x, _ = prep.transform(read_frame(p), p, with_labels=False)
            names += [f"{p}:{i + 2}" for i in range(len(x))]  # the line in the file
        else:
            x = read_feature_rows(p)
            names += [f"{p}[{i}]" for i in range(len(x))]
        if x.shape[1] != desc.input_shape[0]:
            raise DataError(f"predict: {p} has {x.shape[1]} features, the model expects {desc.input_shape[0]}")
        blocks.append(x)
    return names, np.concatenate(blocks)


def _batches(desc, inputs: Sequence[str], run_dir: Path, batch_size: int = 256):
    """(names, iterator of uint8/float batches) for the run's kind of input."""
    if desc.kind == "tabular":
        names, x = _tabular_inputs(inputs, run_dir, desc)
        tensor = torch.from_numpy(x)
        return names, (tensor[i : i + batch_size] for i in range(0, len(tensor), batch_size))
    paths = _image_paths(inputs)
    if desc.kind == "files":  # the file loader's evaluation transform (resize 256/224, centre crop)
        dataset = ImageFileDataset(ImageFiles(paths, np.zeros(len(paths), np.int64)), train=False, size=desc.image_size)
        return [str(p) for p in paths], (torch.stack([dataset[j][0] for j in range(i, min(i + batch_size, len(paths)))])
                                         for i in range(0, len(paths), batch_size))
    channels, size = desc.input_shape[0], desc.input_shape[1]
    return [str(p) for p in paths], (torch.from_numpy(np.stack([decode_image(p, size, channels) for p in
                                                                 paths[i : i + batch_size]]))
                                     for i in range(0, len(paths), batch_size))


@torch.no_grad()
def _self_supervised(model, batches, desc, device, precision, seed: int, log) -> torch.Tensor:
    """SADE's test-time aggregation on the inputs themselves: the expert weights learnt from two views of them
    (:func:`~ccar.engine.test_time.two_view_logits`), then the weighted experts' logits (N, C) of the first view."""
    v1, v2 = two_view_logits(model, (x.to(device) for x in batches), desc.augment,
                             lambda b: normalize(b, desc.augment), lambda: precision.autocast(device), seed)
    weights = fit_expert_weights(v1, v2, generator=torch.Generator().manual_seed(seed + 2))
    if log is not None:
        log(f"test_time_aggregation=self-supervised: expert weights {', '.join(f'{float(w):.3f}' for w in weights)} "
            f"learnt on these {v1.shape[1]} inputs" + (" (few: SADE learns them on a test set)" if v1.shape[1] < 128
                                                      else ""))
    return torch.einsum("e,enc->nc", weights.float(), v1)


def predict_run(run_dir: Path, inputs: Sequence[str], which: str = "best", overrides: Sequence[str] = (),
                top_k: int = 5, log=None) -> Tuple[List[str], torch.Tensor, List[str]]:
    """(input names, probabilities (N, C), class names) of ``run_dir``'s model on ``inputs``. A multi-expert model
    aggregates its experts as trained (equal weights), or, with ``test_time_aggregation=self-supervised``, with
    weights learnt on the inputs themselves (SADE; ``log`` is told them)."""
    run_dir = Path(run_dir)
    config, weights = run_dir / "config.yaml", run_dir / f"{which}.safetensors"
    if not config.is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished ccar run (needs config.yaml and {weights.name})")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    cfg = load_config(str(config), overrides)
    if (run_dir / DATA_FILE).is_file():
        desc = _Described(json.loads((run_dir / DATA_FILE).read_text()))
    else:  # a run from before data.json: rebuild the data description from the dataset itself
        desc = _Described(data_description(dataset_from_config(cfg)))
    device, tau = resolve_device(cfg.device), resolve_tau_norm(cfg.tau_norm)
    if tau == "auto":  # chosen on the run's validation split, exactly as `ccar eval` does
        run = load_run(cfg, weights)
        model, (tau, _) = run.model, chosen_tau(run)
    else:
        model = model_from_config(cfg, desc).to(device)
        load_trained(model, ckpt.load_weights(weights), cfg.finetune, str(weights))
    model.eval()
    precision = resolve_precision(cfg.amp, device)
    names, batches = _batches(desc, inputs, run_dir)
    if cfg.test_time_aggregation == "self-supervised":
        logits = _self_supervised(model, batches, desc, device, precision, cfg.seed, log) * eval_logit_scale(cfg)
        return names, torch.softmax(logits, 1), desc.class_names
    outputs = []
    with TauNorm(model, tau) if tau is not None else contextlib.nullcontext(), torch.no_grad():
        for x in batches:
            x = normalize(x.to(device), desc.augment)
            with precision.autocast(device):
                logits = model(x)
            outputs.append(logits.float().cpu() * eval_logit_scale(cfg))
    logits = torch.cat(outputs)
    if cfg.posthoc_tau:
        logits = posthoc_logit_adjustment(logits, desc.class_counts, cfg.posthoc_tau)
    return names, torch.softmax(logits, 1), desc.class_names


def write_predictions(names: List[str], probs: torch.Tensor, class_names: List[str], top_k: int,
                      out: Optional[str] = None) -> Optional[Path]:
    """CSV (default, or a .csv path) or JSON lines (a .jsonl/.json path) with the top-k classes of every input."""
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    rows = [{"input": n, **{f"top{j + 1}": class_names[int(i[j])] for j in range(k)},
             **{f"p{j + 1}": round(float(p[j]), 6) for j in range(k)}} for n, p, i in zip(names, top_p, top_i)]
    columns = ["input"] + [c for j in range(k) for c in (f"top{j + 1}", f"p{j + 1}")]
    if out and Path(out).suffix.lower() in (".jsonl", ".json"):
        text = "".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if not out:
        sys.stdout.write(text)
        return None
    Path(out).write_text(text)
    return Path(out)
