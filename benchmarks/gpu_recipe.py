"""The CIFAR-100-LT paper recipe end to end (ResNet-32, batch 128, 10,847 images at IF 100), ccar's fast path
against a reference-style pipeline, measured side by side in one run; plus concurrent small runs against one.

- ccar: the engine as users run it (`ccar train --config configs/cifar100-lt.yaml`): device-resident uint8 data,
  batched crop/flip on the device, bf16 autocast and channels_last on CUDA, optional torch.compile; timed end to end
  (data loading, compilation, every epoch's validation, the final test evaluation).
- reference: what the LDAM-DRW repository does: PIL images, per-sample random crop + flip + to-tensor + normalise
  in DataLoader workers (torchvision's transforms when importable, the same operations in PIL/numpy otherwise),
  fp32. Timed over ``--reference-epochs`` epochs and reported per image, with its projected total.
- concurrency: ``--concurrent`` copies of a short ccar run at once against one alone (aggregate images/s).

Uses real CIFAR-100 when ``--data-root`` holds ``cifar-100-python``; otherwise it writes synthetic files of the same
shape, format and class profile into a temporary folder. Targets (issue #6): <= 60 s end to end on one H200 and
>= 5x the reference pipeline. On a CPU, run it small:  python benchmarks/gpu_recipe.py --small

    python benchmarks/gpu_recipe.py [--data-root DIR] [--epochs 200] [--compile] [--concurrent 4] [--smoke]

``--epochs N`` scales the recipe's schedule (warm-up 5 and lr milestones 160, 180 of 200 epochs) to N epochs.
``--smoke``: seconds on the CPU (10 synthetic images per class, ResNet-8, 2 epochs), to check that the script works.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ccar.data import build_dataset
from ccar.engine.config import load_config
from ccar.engine.train import train
from ccar.models import build_model
from _smoke import CONFIGS, parse_args

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def synthetic_cifar100(root: Path, per_class: int) -> Path:
    """Random images in the real cifar-100-python pickle format (``per_class`` training images per class)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", per_class), ("test", max(2, per_class // 5))):
        labels = np.repeat(np.arange(100), n)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels.tolist()}, protocol=4))
    return root


def scaled_schedule(epochs: int) -> tuple:
    """The recipe's warm-up and lr milestones (5; 160, 180 of 200 epochs) at ``epochs``: milestones at 80 % and 90 %,
    distinct and within 1..epochs (the config's rule); warm-up at most a tenth of the run, so it ends before the
    first decay.

    >>> scaled_schedule(200), scaled_schedule(10), scaled_schedule(2), scaled_schedule(1)
    ((5, [160, 180]), (1, [8, 9]), (0, [1, 2]), (0, [1]))
    """
    first = min(max(1, round(0.8 * epochs)), max(1, epochs - 1))  # below the last epoch, to leave room for the second
    second = min(max(first + 1, round(0.9 * epochs)), epochs)
    return min(5, epochs // 10), sorted({first, second})


def ccar_run(root: str, out: str, epochs: int, device: str, compile_: bool, imbalance: int, threads: int = 0,
             depth: int = 32) -> dict:
    warmup, milestones = scaled_schedule(epochs)
    overrides = [f"data_root={root}", f"imbalance={imbalance}", f"epochs={epochs}", f"out={out}", f"device={device}",
                 "progress=false", f"compile={str(compile_).lower()}", f"threads={threads}", f"model.depth={depth}",
                 f"optim.warmup_epochs={warmup}", f"optim.milestones={milestones}"]
    if device != "cpu":
        overrides += ["channels_last=true", "amp=bf16"]
    cfg = load_config(str(CONFIGS / "cifar100-lt.yaml"), overrides)
    start = time.perf_counter()
    metrics = train(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": sum(metrics["class_counts"]) * epochs, "top1": metrics["top1"]}


class _ReferenceDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, targets: np.ndarray):
        self.images, self.targets = images, targets
        try:  # the reference repository's exact transforms where torchvision imports
            import torchvision.transforms as T

            self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
        except Exception:
            self.transform = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image, ImageOps

        img = Image.fromarray(self.images[i].transpose(1, 2, 0))
        if self.transform is not None:
            return self.transform(img), int(self.targets[i])
        padded = ImageOps.expand(img, border=4, fill=0)
        x, y = np.random.randint(0, 9, 2)
        img = padded.crop((x, y, x + 32, y + 32))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = ((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), int(self.targets[i])


def reference_run(root: str, epochs: int, device: str, workers: int, imbalance: int, depth: int = 32) -> dict:
    data = build_dataset("cifar100-lt", root, imbalance)
    images, targets = data.train[0].numpy(), data.train[1].numpy()
    loader = torch.utils.data.DataLoader(_ReferenceDataset(images, targets), batch_size=128, shuffle=True,
                                         num_workers=workers, pin_memory=device != "cpu", persistent_workers=workers > 0)
    dev = torch.device(device)
    model = build_model("resnet32", 100, (3, 32, 32), depth=depth).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "images": seen}


def _concurrent_worker(args):
    return ccar_run(*args)


def concurrency(root: str, tmp: Path, n: int, epochs: int, device: str, imbalance: int, depth: int = 32) -> tuple:
    """Aggregate images/s of ``n`` runs at once against one run alone (same size, same device)."""
    threads = 0 if device != "cpu" else 1
    one = ccar_run(root, str(tmp / "c1"), epochs, device, False, imbalance, threads, depth)
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(n) as pool:
        many = pool.map(_concurrent_worker, [(root, str(tmp / f"c{n}-{i}"), epochs, device, False, imbalance, threads,
                                              depth) for i in range(n)])
        pool.close()  # workers that exit on their own release their semaphores (tqdm's lock); terminate() leaks them
        pool.join()
    wall = time.perf_counter() - start
    return one["images"] / one["seconds"], sum(r["images"] for r in many) / wall


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="folder holding cifar-100-python (else synthetic files of the same shape)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--reference-epochs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes)")
    p.add_argument("--workers", type=int, default=8, help="reference DataLoader workers")
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--concurrent-epochs", type=int, default=5)
    p.add_argument("--per-class", type=int, default=500, help="synthetic data: training images per class")
    p.add_argument("--imbalance", type=int, default=100)
    p.add_argument("--depth", type=int, default=32, help="ResNet depth (32: the recipe's ResNet-32)")
    p.add_argument("--small", action="store_true", help="CPU-sized: 50 images per class, 1 epoch, 2 concurrent runs")
    args = parse_args(p, dict(device="cpu", per_class=10, imbalance=10, depth=8, epochs=2, reference_epochs=1,
                              concurrent=2, concurrent_epochs=1, workers=1))
    if args.small:  # 50 images per class: imbalance 10 keeps every class
        args.per_class, args.imbalance, args.epochs, args.reference_epochs = 50, 10, 1, 1
        args.concurrent, args.concurrent_epochs, args.workers = 2, 1, 2
    return args


def main() -> None:
    args = arguments()
    device, imbalance, depth = args.device, args.imbalance, args.depth
    with tempfile.TemporaryDirectory(prefix="ccar-bench-") as tmp_name:  # the synthetic files are 150 MB at full size
        tmp = Path(tmp_name)
        if args.data_root and (Path(args.data_root) / "cifar-100-python").is_dir():
            root, source = args.data_root, "real CIFAR-100"
        else:
            root = str(synthetic_cifar100(tmp / "data", args.per_class))
            source = f"synthetic CIFAR-100 ({args.per_class}/class)"
        gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
        print(f"{source}, imbalance {imbalance}; ResNet-{depth}; device {device} ({gpu}); torch {torch.__version__}; "
              f"compile={args.compile}", flush=True)
        ccar = ccar_run(root, str(tmp / "ccar"), args.epochs, device, args.compile, imbalance, depth=depth)
        ref = reference_run(root, args.reference_epochs, device, args.workers, imbalance, depth)
        ccar_ips, ref_ips = ccar["images"] / ccar["seconds"], ref["images"] / ref["seconds"]
        print(f"{'pipeline':<40}{'images/s':>12}{'total s':>10}")
        print(f"{'ccar, end to end, ' + str(args.epochs) + ' epochs':<40}{ccar_ips:>12,.0f}{ccar['seconds']:>10.1f}")
        print(f"{'reference, ' + str(args.reference_epochs) + ' epochs (total projected)':<40}{ref_ips:>12,.0f}"
              f"{ccar['images'] / ref_ips:>10.1f}")
        print(f"speed-up ccar / reference: {ccar_ips / ref_ips:.2f}x   (ccar test top-1 after {args.epochs} epochs: "
              f"{ccar['top1']:.1f}%)")
        if args.concurrent > 1:
            one, many = concurrency(root, tmp, args.concurrent, args.concurrent_epochs, device, imbalance, depth)
            print(f"{args.concurrent} concurrent runs: {many:,.0f} images/s in aggregate vs {one:,.0f} for one run "
                  f"alone ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
