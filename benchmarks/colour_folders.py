"""Which model (and image size) should ``model.name=auto`` train on a colour image folder? Balanced test accuracy
reached within a fixed CPU-time budget, per candidate, on long-tailed colour folders built from real images.

    python benchmarks/colour_folders.py [--root /tmp/ccar-colour-folders] [--seeds 0 1] [--folders f96-1k ...]
    python benchmarks/colour_folders.py --folders f96-1k --widths 8 32        # + the CNN at widths 8 and 32
    python benchmarks/colour_folders.py --epochs 15 --folders f96-1k --only "cnn w16 @32" auto   # default-run length
    python benchmarks/colour_folders.py --smoke        # the same path on a tiny generated folder, in seconds

The folders: real Fashion-MNIST (and, for 20 classes, MNIST) images, coloured like photos -- the object tinted
with a random hue (or one near its class's hue: colour then carries some of the label, as in photos), pasted at a
random scale (55-100 % of the frame) and place onto a colour background (a smooth colour field, half of them with
stripes whose period is a fixed share of the frame, so the texture has the same look at every size), brightness
jitter and pixel noise -- at 32 to 224 px, 1k to 20k training images, an exponential long tail of imbalance 100
(LDAM-DRW's profile), and a balanced test part from the sources' test split (``DIR/train`` + ``DIR/test``).

Each candidate (model, width, image_size) trains with ``ccar train`` and its defaults (CCAR over logit adjustment,
SGD lr 0.1, cosine; ``amp=auto``; threads=1, in a subprocess): its CPU cost per training image is timed first (in
this process, one thread), and the run gets the number of epochs that fits the folder's CPU budget (at least one;
``--epochs N``: N epochs instead). ``auto`` is this release's own choice, run as a user runs it. Reported: the run's
own CPU seconds (getrusage of the child: start-up, training, validation, the test evaluations; the decoded-image
cache is filled beforehand, as a second run of a user's folder finds it), balanced test accuracy of the
best-on-validation model, and its validation score. The seeds after the first rerun the best two candidates of the
first and the old rule's. Results append to ROOT/results.jsonl; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

CCAR = [sys.executable, "-m", "ccar"]


@dataclass(frozen=True)
class Folder:
    name: str
    sources: Tuple[str, ...]  # mnist / fashion-mnist (real), or "toy" (generated: --smoke)
    size: int  # px
    n_max: int  # training images of the head class (exponential profile, imbalance 100)
    test_per_class: int
    hue: str  # random (colour says nothing about the class) or class (each class near its own hue)
    budget: float  # CPU seconds per run
    ext: str = ".png"
    imbalance: float = 100.0
    max_epochs: int = 200  # (--smoke: one)


FOLDERS = [
    Folder("f96-1k", ("fashion-mnist",), 96, 500, 200, "random", 60, ".jpg"),
    Folder("f224-1k", ("fashion-mnist",), 224, 500, 200, "class", 60, ".jpg"),
    Folder("f64-2k", ("fashion-mnist",), 64, 1000, 200, "class", 60),
    Folder("mf128-6k", ("fashion-mnist", "mnist"), 128, 1200, 100, "class", 75, ".jpg"),
    Folder("f32-6k", ("fashion-mnist",), 32, 2300, 200, "random", 60),
    Folder("mf64-21k", ("fashion-mnist", "mnist"), 64, 4500, 100, "random", 120),
]
SMOKE = Folder("toy40", ("toy",), 40, 12, 3, "random", 2, imbalance=4, max_epochs=1)


def source_arrays(name: str, split: str, root: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Grey 28x28 uint8 images (N, 28, 28) and labels of a real source; ``toy``: three generated shapes."""
    if name != "toy":
        from ccar.data.datasets import load_source

        x, y = load_source(name, root, split)
        return x[:, 0], y
    rng = np.random.default_rng(0 if split == "train" else 1)
    y = np.repeat(np.arange(3), 30)
    x = np.zeros((len(y), 28, 28), np.uint8)
    for i, c in enumerate(y):  # a vertical bar, a square, a horizontal bar: told apart within two epochs
        a, b = rng.integers(2, 12, 2)
        rows, cols = [(slice(a, a + 14), slice(b + 5, b + 9)), (slice(a, a + 12), slice(b, b + 12)),
                      (slice(a + 5, a + 9), slice(b, b + 14))][c]
        x[i, rows, cols] = 220
    return x, y


def folder_images(spec: Folder, split: str, data_root: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    """The chosen grey images and labels (classes of several sources are numbered one after the other)."""
    from ccar.data.profiles import long_tail_counts, long_tail_indices

    xs, ys, offset = [], [], 0
    for source in spec.sources:
        x, y = source_arrays(source, split, None if source == "toy" else data_root)
        k = int(y.max()) + 1
        if split == "train":  # the head class of the first source, the tail of the last: one long tail over all
            counts = long_tail_counts(spec.n_max, k * len(spec.sources), spec.imbalance)[offset:offset + k]
        else:
            counts = [spec.test_per_class] * k
        keep = long_tail_indices(y, counts, seed=0)
        xs.append(x[keep])
        ys.append(y[keep] + offset)
        offset += k
    return np.concatenate(xs), np.concatenate(ys)


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A colour scene behind the object: a smooth colour field around a random colour, stripes half the time."""
    from PIL import Image

    base = np.asarray(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.25, 0.9)))
    field = rng.uniform(-0.25, 0.25, (4, 4, 3))
    field = np.asarray(Image.fromarray(((field + 0.5) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    bg = base + field / 255 - 0.5
    if rng.random() < 0.5:  # a texture whose period is a share of the frame: the same scene at every size
        yy, xx = np.mgrid[0:size, 0:size] / size
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.15)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3))
        bg = bg + 0.12 * wave[..., None] * rng.uniform(-1, 1, 3)
    return bg


def colourise(grey: np.ndarray, label: int, spec: Folder, rng: np.random.Generator, classes: int) -> np.ndarray:
    """One grey 28x28 object as a colour photo-like ``spec.size`` image (uint8 H x W x 3)."""
    from PIL import Image

    size = spec.size
    side = int(round(size * rng.uniform(0.55, 1.0)))
    obj = np.asarray(Image.fromarray(grey).resize((side, side), Image.BILINEAR), np.float64) / 255
    top, left = rng.integers(0, size - side + 1, 2)
    hue = rng.random() if spec.hue == "random" else (label / classes + rng.normal(0, 0.1)) % 1.0
    colour = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0)))
    img = background(size, rng)
    alpha = np.clip(obj * 3, 0, 1)[..., None]  # the object's silhouette; its own shading tints the colour
    patch = img[top:top + side, left:left + side]
    img[top:top + side, left:left + side] = alpha * colour * (0.35 + 0.65 * obj[..., None]) + (1 - alpha) * patch
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def build_folder(spec: Folder, root: Path, data_root: Optional[str] = None) -> Path:
    """Write ``root/<name>/{train,test}/<class>/<i><ext>`` once (a marker file holds the spec that wrote it)."""
    from PIL import Image

    out = root / spec.name
    marker, written = out / "spec.json", json.dumps({k: v for k, v in asdict(spec).items() if k != "budget"})
    if marker.is_file() and marker.read_text() == written:
        return out
    rng = np.random.default_rng(12345)
    for split in ("train", "test"):
        x, y = folder_images(spec, split, data_root)
        classes = int(y.max()) + 1
        for i, (grey, label) in enumerate(zip(x, y)):
            path = out / split / f"c{label:02d}" / f"{i}{spec.ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colourise(grey, int(label), spec, rng, classes)).save(path, quality=90)
    marker.write_text(written)
    return out


@dataclass(frozen=True)
class Candidate:
    model: str  # cnn, resnet32 (its downsampling stem from 96 px on, as ccar builds it), or auto (ccar's own choice)
    width: int  # cnn's width (ignored by resnet32)
    size: int  # the image_size it trains at (auto: 0, image_size=auto)

    @property
    def label(self) -> str:
        if self.model == "auto":
            return "auto (this release)"
        name = f"cnn w{self.width}" if self.model == "cnn" else "resnet32" + (" stem" if self.size >= 96 else "")
        return f"{name} @{self.size}"

    def overrides(self) -> List[str]:
        if self.model == "auto":  # what a user's default run does
            return ["model.name=auto", "image_size=auto"]
        return [f"model.name={self.model}", f"model.width={self.width}", f"image_size={self.size}"]


AUTO = Candidate("auto", 16, 0)


def old_auto(size: int) -> Candidate:
    """What ``model.name=auto`` chose for colour folders before this benchmark (image_size=auto: the native size)."""
    if 24 <= size <= 40:
        return Candidate("resnet32", 16, size)
    return Candidate("cnn", 16, size) if size <= 64 else Candidate("resnet32", 16, size)


def candidates(native: int) -> List[Candidate]:
    """Today's choice; the compact CNN (width 16, the default) at the native size (up to 96 px) and reduced to
    32/48/64 px; ResNet-32 without its stem at 32 px (at 64 px one of its epochs takes 14-70 % of a budget here:
    not run); duplicates dropped. (The 96 px folder also has widths 8 and 32 at 32 px: ``--widths``.)"""
    found = [old_auto(native)] + [Candidate("cnn", 16, s) for s in (32, 48, 64, native) if s <= min(native, 96)]
    return list(dict.fromkeys(found + [Candidate("resnet32", 16, 32)]))


def cpu_per_image(c: Candidate, classes: int, steps: int = 3) -> float:
    """CPU seconds per training image of one SGD step at batch 128, one thread, channels-last and the precision of
    ``amp=auto`` (what the run will do), after a warm-up step."""
    import torch
    import torch.nn.functional as F

    from ccar.engine.runtime import amp_dtype
    from ccar.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(c.model, classes, (3, c.size, c.size), width=c.width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 3, c.size, c.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (128,))
    dtype = amp_dtype("auto", torch.device("cpu"))
    for i in range(steps + 1):
        if i == 1:
            start = time.process_time()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.process_time() - start) / (steps * 128)


def train_run(folder: Path, c: Candidate, seed: int, epochs: int, out: Path) -> Dict[str, float]:
    """``ccar train`` in a subprocess (one thread); the child's CPU seconds from getrusage, and its metrics."""
    command = CCAR + ["train", "dataset=folder", f"data_root={folder}", *c.overrides(), f"epochs={epochs}",
                      f"seed={seed}", "threads=1", "progress=false", f"out={out}"]
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"balanced": metrics["balanced"], "val_balanced": metrics["val_balanced"], "epochs": epochs,
            "cpu_s": cpu, "wall_s": wall, "train_s": metrics["seconds"], "log": done.stdout}


def epochs_for(spec: Folder, c: Candidate, n_train: int, classes: int) -> int:
    """Epochs whose training and per-epoch validation (a tenth of the images, forward only: ~1/3 of a step) fit
    the folder's CPU budget, from the timed step; at least one. 10 % more for augmentation and the loop."""
    per_epoch = cpu_per_image(c, classes) * n_train * (0.9 + 0.1 / 3) * 1.1
    return max(1, min(spec.max_epochs, int(spec.budget / per_epoch)))


def resolved(c: Candidate, folder: Path):
    """(the concrete candidate ``c`` trains, its dataset) -- for ``auto``, what this release chooses."""
    from ccar.data import build_dataset
    from ccar.engine.build import auto_model

    data = build_dataset("folder", str(folder), image_size=c.size or "auto", progress=False)  # fills the cache
    if c.model != "auto":
        return c, data
    return Candidate(auto_model(data.input_shape)[0], 16, data.image_size), data


def measure(spec: Folder, folder: Path, c: Candidate, seed: int, root: Path, done: Dict[str, dict],
            fixed_epochs: int = 0) -> dict:
    """One (folder, candidate, seed) row -- within the folder's budget, or ``fixed_epochs`` -- from results.jsonl
    when it is there."""
    import shutil

    mode = f"{fixed_epochs} epochs" if fixed_epochs else "budget"
    key = f"{spec.name}|{c.label}|{seed}" + (f"|e{fixed_epochs}" if fixed_epochs else "")
    if key in done:
        return done[key]
    concrete, data = resolved(c, folder)
    n_train = sum(data.class_counts)
    epochs = fixed_epochs or epochs_for(spec, concrete, n_train, data.num_classes)
    name = c.label.split(" (")[0].replace(" ", "-").replace("@", "")
    out = root / "runs" / spec.name / (f"{name}-s{seed}" + (f"-e{fixed_epochs}" if fixed_epochs else ""))
    shutil.rmtree(out, ignore_errors=True)
    label = c.label if c.model != "auto" else f"auto: {concrete.label}"
    row = {"key": key, "folder": spec.name, "candidate": label, "seed": seed, "mode": mode,
           "old_auto": c == old_auto(spec.size), "n_train": n_train, **train_run(folder, c, seed, epochs, out)}
    log = row.pop("log")
    if c.model == "auto":  # the reason the run printed
        row["why"] = next((line for line in log.splitlines() if line.startswith("model.name=auto")), "")
    with open(root / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    done[key] = row
    print(f"  {spec.name:>9} {label:<18} seed {seed}: {epochs:>3} epochs {row['cpu_s']:6.1f} CPU-s "
          f"{row['wall_s']:6.1f} s  balanced {row['balanced']:5.1f} %  val {row['val_balanced']:5.1f} %", flush=True)
    return row


def table(rows: List[dict], specs: List[Folder]) -> str:
    """Markdown, one block per folder and mode (the budget, or a fixed number of epochs): per candidate, balanced
    test accuracy of each seed and their mean (best in bold), epochs, the run's CPU seconds, validation score."""
    lines = ["| folder | candidate | epochs | CPU s | balanced test % (seeds) | mean | val % |", "|" + "---|" * 7]
    for spec in specs:
        mine = [r for r in rows if r["folder"] == spec.name]
        for mode in dict.fromkeys(r.get("mode", "budget") for r in mine):
            block = [r for r in mine if r.get("mode", "budget") == mode]
            labels = list(dict.fromkeys(r["candidate"] for r in block))
            runs = {lab: sorted((r for r in block if r["candidate"] == lab), key=lambda r: r["seed"]) for lab in labels}
            means = {lab: float(np.mean([r["balanced"] for r in runs[lab]])) for lab in labels}
            where = (f"{spec.name} ({spec.size} px, {block[0]['n_train']:,} train, "
                     + (f"{spec.budget:g} CPU-s)" if mode == "budget" else f"{mode})"))
            for lab in sorted(labels, key=lambda lab: -means[lab]):
                r0, seeds = runs[lab][0], " / ".join(f"{r['balanced']:.1f}" for r in runs[lab])
                epochs = " / ".join(dict.fromkeys(str(r["epochs"]) for r in runs[lab]))  # (timed per seed)
                mean = f"**{means[lab]:.1f}**" if means[lab] == max(means.values()) else f"{means[lab]:.1f}"
                lines.append(f"| {where} | {lab}{' (old auto)' if r0['old_auto'] else ''} | {epochs} | "
                             f"{np.mean([r['cpu_s'] for r in runs[lab]]):.0f} | {seeds} | {mean} | "
                             f"{np.mean([r['val_balanced'] for r in runs[lab]]):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/ccar-colour-folders", help="folders, runs and results.jsonl")
    parser.add_argument("--folders", nargs="*", default=[f.name for f in FOLDERS], help="a subset, by name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeat-top", type=int, default=2,
                        help="seeds after the first only for the best this many on the first seed, and the old auto")
    parser.add_argument("--epochs", type=int, default=0,
                        help="train this many epochs (every seed) instead of the budget's: the default run is 15")
    parser.add_argument("--widths", type=int, nargs="*", default=[], help="also the CNN at these widths at 32 px")
    parser.add_argument("--only", nargs="*", default=None, help="candidates by label, e.g. 'cnn w16 @48' auto")
    parser.add_argument("--data-root", default=None, help="IDX files (default: ccar's usual places)")
    parser.add_argument("--smoke", action="store_true", help="a tiny generated folder, auto alone, seconds")
    args = parser.parse_args()
    root = Path(args.root if not args.smoke else args.root + "-smoke")
    specs = [SMOKE] if args.smoke else [f for f in FOLDERS if f.name in args.folders]
    built = {spec.name: build_folder(spec, root, args.data_root) for spec in specs}
    os.environ["CCAR_CACHE"] = str(root / "cache")  # decoded images stay beside the folders (after MNIST is read)
    if args.smoke:  # a smoke run always runs: this release's choice, one seed, one epoch
        (root / "results.jsonl").unlink(missing_ok=True)
        args.seeds, args.only = args.seeds[:1], ["auto"]
    done = {}
    if (root / "results.jsonl").is_file():
        done = {r["key"]: r for r in map(json.loads, (root / "results.jsonl").read_text().splitlines())}
    for spec in specs:
        pool = candidates(spec.size) + [Candidate("cnn", w, 32) for w in args.widths]
        if args.only is not None:  # ("auto": this release's own choice, run as a user runs it)
            pool = [c for c in pool if c.label in args.only] + ([AUTO] if "auto" in args.only else [])
        if args.epochs:  # fixed epochs: every seed of every candidate asked for
            [measure(spec, built[spec.name], c, s, root, done, args.epochs) for s in args.seeds for c in pool]
            continue
        first = [measure(spec, built[spec.name], c, args.seeds[0], root, done) for c in pool]
        ranked = [c for _, c in sorted(zip(first, pool), key=lambda t: -t[0]["balanced"])]
        again = list(dict.fromkeys(ranked[:args.repeat_top] + [old_auto(spec.size)]))
        [measure(spec, built[spec.name], c, s, root, done) for s in args.seeds[1:] for c in again]
    print(table(list(done.values()), specs))  # (with rows of earlier candidate lists that results.jsonl holds)


if __name__ == "__main__":
    main()
