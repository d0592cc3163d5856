"""Progress and logs as a callback: the progress bar, one line per epoch, ``log.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime import fmt_time, progress
from .base import Callback


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))


class Logging(Callback):
    """The bar on rank 0 (epoch, steps, ETA), an epoch line (loss, accuracies, lr, images/s, ETA), ``log.jsonl``
    (rewritten from the checkpoint's history on resume) and TensorBoard scalars when it is installed."""

    def on_fit_start(self, trainer) -> None:
        run, state = trainer.run, trainer.state
        done = state.partial["step"] if state.partial else 0
        self.bar = progress(trainer.steps * (run.cfg.epochs - state.epoch) - done,
                            run.cfg.progress and run.dist.is_main)
        self.first_epoch, self.seconds_before = state.epoch, state.seconds  # (this session's ETA only)
        self.tb = None
        if run.dist.is_main:
            with open(run.run_dir / "log.jsonl", "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in state.history)
            self.tb = _tensorboard(run.run_dir)

    def on_epoch_start(self, trainer) -> None:
        self.bar.set_description(f"epoch {trainer.state.epoch + 1}/{trainer.run.cfg.epochs}")

    def on_step_end(self, trainer, batch, out) -> None:
        self.bar.update(1)

    def on_epoch_end(self, trainer, record) -> None:
        run, state = trainer.run, trainer.state
        if not run.dist.is_main:
            return
        epoch, epochs = state.epoch, run.cfg.epochs
        eta = (epochs - epoch - 1) * (state.seconds - self.seconds_before) / (epoch + 1 - self.first_epoch)
        val = (f"val {record['val_top1']:5.1f}% (balanced {record['val_balanced']:5.1f}%)"
               if record["val_top1"] is not None else "no val split")
        line = (f"epoch {epoch + 1:>3}/{epochs}  loss {record['loss']:.4f}  train {record['train_top1']:5.1f}%  "
                f"{val}  lr {record['lr']:.4f}  {record['images_per_s']:,.0f} img/s  eta {fmt_time(eta)}")
        self.bar.write(line) if not self.bar.disable else run.log(line)
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if v is not None:
                    self.tb.add_scalar(k, v, epoch + 1)

    def teardown(self, trainer) -> None:
        if hasattr(self, "bar"):
            self.bar.close()
        if getattr(self, "tb", None) is not None:
            self.tb.close()
