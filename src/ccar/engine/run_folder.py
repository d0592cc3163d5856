"""A run's folder: which folder a run writes to and whether it continues what is there (the resume policy), a
check that it can be written before any work, and the files that describe the run (``config.yaml``, ``data.json``,
``preprocessing.json``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Tuple

import yaml

from ..config import TrainConfig, to_dict
from ..errors import TrainingError
from . import checkpoint as ckpt
from .build import DATA_FILE, save_data_description
from .preemption import check_same_config, resume_mode
from .run import Run

CHECKPOINT = "checkpoint.safetensors"


def claim(cfg: TrainConfig, resume: bool) -> Tuple[bool, bool]:
    """Settle ``cfg.out`` and whether the run continues its checkpoint (``--resume``, or ``resume=auto`` finding
    one); a folder that already holds another run is an error naming the fix. Returns (resumes, by resume=auto)."""
    run_dir = cfg.run_dir()
    auto = not resume and resume_mode(cfg.resume) == "auto"
    if cfg.out is None and not resume and (run_dir / CHECKPOINT).exists():
        # A rerun of the default job gets a fresh folder (runs/NAME-2, -3, ...) instead of an error; a restarted
        # one (resume=auto) continues the newest, which its first attempt created.
        n = 2
        while (run_dir.parent / f"{run_dir.name}-{n}").exists():
            n += 1
        cfg.out = str(run_dir.parent / (f"{run_dir.name}-{n - 1}" if auto and n > 2 else
                                        run_dir.name if auto else f"{run_dir.name}-{n}"))
        run_dir = cfg.run_dir()
    state_path = run_dir / CHECKPOINT
    if auto:  # continue what is there (of the same config: checked once model.name=auto is resolved), else start
        resume = state_path.exists()
    if not resume and state_path.exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume (or resume=auto) to continue it or choose another out=DIR")
    if resume and not state_path.exists():
        raise TrainingError(f"--resume: no checkpoint at {state_path}")
    return resume, auto


def read_resume_checkpoint(cfg: TrainConfig, resume: bool, auto: bool) -> Optional[tuple]:
    """The checkpoint a resumed run continues, read once (None for a fresh run); under ``resume=auto`` its config
    must be this run's (``model.name=auto`` resolved first)."""
    if not resume:
        return None
    saved = ckpt.read_checkpoint(cfg.run_dir() / CHECKPOINT)
    if auto:
        check_same_config(saved[1]["config"], to_dict(cfg), cfg.run_dir())
    return saved


def check_output_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training, not after hours, when the run folder is unwritable or the disk too full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"output folder {run_dir} is not writable ({exc.strerror or exc}); choose another with out=DIR") from exc
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise TrainingError(
            f"only {free / 2**20:.0f} MiB free at {run_dir}; checkpoints need about {needed_bytes / 2**20:.0f} MiB"
        )


def write_run_files(run: Run) -> None:
    """``config.yaml`` (headed by the precision the run trains in and why), ``data.json`` (what ``ccar predict``
    needs) and, for tables, ``preprocessing.json`` (what ``ccar eval`` and ``ccar predict`` apply to new rows)."""
    n_params = sum(p.numel() for p in run.model.parameters())
    check_output_dir(run.run_dir, needed_bytes=n_params * 4 * 4 + (64 << 20))
    header = f"# precision: {run.precision.describe()}\n"
    (run.run_dir / "config.yaml").write_text(header + yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
    save_data_description(run.data, run.run_dir / DATA_FILE)
    if run.data.preprocessing is not None:
        run.data.preprocessing.save(run.run_dir / "preprocessing.json", run.data.augment.mean, run.data.augment.std)
