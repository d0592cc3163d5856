"""Where ccar stands on one GPU, measured side by side in one run at the CIFAR-100-LT shape (10,847 training images of
32x32 at imbalance 100, ResNet-32, batch 128, bf16, channels-last, data resident on the GPU):

1. step throughput (steady images/s, warm-up excluded): a bare PyTorch loop, eager and as a CUDA graph, against
   ccar's engine eager (``compile=false``), the eager kernels captured (``compile=graph``) and the compiled model
   captured (``compile=auto``): the same data, the same batched crop and flip on the device, the same model; ccar's
   number is its training epochs' images/s as ``ccar train`` logs them;
2. packed cells: K ResNet-32s trained as one program (:mod:`ccar.engine.packed`: each its own batch, loss -- CE and
   CCAR-LA alternate -- and learning rate), captured as one CUDA graph, aggregate images/s against K = 1;
3. the 200-epoch recipe end to end (``ccar train --config configs/cifar100-lt.yaml``, ``compile=auto``): data
   loading, capture, every epoch's validation and the final test evaluation;
4. ccar packs: K cells of the recipe as ``ccar sweep`` packs them (:mod:`ccar.engine.pack_train`: each cell its
   own run folder, validation and checkpoints), aggregate images/s of the steady epochs against K = 1 -- on the CPU
   too, where it shows why ``pack: auto`` does not pack there.

Targets (issue 32, on an H200): captured ccar >= 0.9x the bare CUDA-graph loop; a pack of 16 >= 5x one cell; the
recipe under 90 s. Real CIFAR-100 when ``--data-root`` holds ``cifar-100-python``, else synthetic files of the same
shape, format and class profile (throughput does not depend on the pixels; accuracy does).

    python benchmarks/gpu_recipe.py [--data-root DIR] [--epochs 200] [--steps 300] [--packs 1,4,16]
        [--ccar-packs 1,4,16] [--only 1,2,3,4] [--smoke]

``--epochs N`` scales the recipe's schedule (warm-up 5, lr milestones 160, 180 of 200 epochs) to N epochs.
``--smoke``: seconds on the CPU (10 synthetic images per class, ResNet-8, a few steps; the CUDA-graph rows say
that they need a GPU), to check that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ccar.data import Augment, build_dataset, normalize, random_crop_flip
from ccar.engine.config import load_config
from ccar.engine.packed import PackedModels, PackedStep, StackedSGD
from ccar.engine.train import train
from ccar.losses import build_loss
from ccar.models import build_model
from _smoke import CONFIGS, parse_args

AUGMENT = Augment(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), crop_padding=4, flip=True)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """Random batches of the resident training set with ccar's batched crop and flip, drawn on the device."""

    def __init__(self, images, targets, batch: int, device: torch.device, seed: int = 0, channels_last: bool = True):
        self.images, self.targets, self.batch, self.device = images.to(device), targets.to(device), batch, device
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def next(self):
        idx = torch.randint(0, len(self.targets), (self.batch,), device=self.device, generator=self.generator)
        x = random_crop_flip(self.images[idx], AUGMENT.crop_padding, True, self.generator)
        return normalize(x, AUGMENT, channels_last=self.channels_last), self.targets[idx]


def _timed(step, batches, steps: int, warmup: int, device: torch.device, images_per_step: int) -> float:
    for _ in range(warmup):
        step(*batches.next())
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*batches.next())
    _sync(device)
    return steps * images_per_step / (time.perf_counter() - start)


def captured(step, example, device: torch.device, warmup: int = 3):
    """``step(x, y)`` as a CUDA graph: warmed up on a side stream, captured once, then replayed on copies."""
    static = [t.clone() for t in example]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*static)

    def replay(*inputs):
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()

    return replay


def bare_throughput(data, device, depth: int, steps: int, graph: bool, batch: int = 128) -> float:
    """A bare PyTorch loop over the same data and augmentation: bf16 autocast, channels-last, CE, SGD."""
    torch.manual_seed(0)
    model = build_model("resnet32", 100, (3, 32, 32), depth=depth).to(device, memory_format=torch.channels_last)
    lr = torch.tensor(0.1, device=device) if graph else 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4, **({"fused": True} if graph else {}))
    model.train()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=not graph)
        loss.backward()
        opt.step()

    batches = Batches(*data, batch, device)
    if graph:
        opt.zero_grad(set_to_none=True)
        step = captured(step, batches.next(), device)
    return _timed(step, batches, steps, 5, device, batch)


def packed_throughput(data, device, depth: int, k: int, steps: int, graph: bool, batch: int = 128) -> float:
    """K ResNet-32s as one program (each its own batch, loss and lr), aggregate images/s."""
    torch.manual_seed(0)
    models = [build_model("resnet32", 100, (3, 32, 32), depth=depth) for _ in range(k)]
    packed = PackedModels(models).to(device).train()
    counts = torch.bincount(data[1], minlength=100).tolist()
    losses = [build_loss("ce", counts) if i % 2 == 0 else build_loss("ccar", counts, base="la") for i in range(k)]
    losses = [fn.to(device) for fn in losses]
    for fn in losses:
        fn.validate = False
    opt = StackedSGD(packed.params, [0.1 * (1 + i / k) for i in range(k)], [0.9] * k, [2e-4] * k)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=False)
    packed_step = PackedStep(packed, losses, opt, autocast if device.type == "cuda" else contextlib.nullcontext)
    cells = [Batches(*data, batch, device, seed=i, channels_last=False) for i in range(k)]  # (stacked: K, B, C, H, W)

    class Stacked:
        def next(self):
            xs, ys = zip(*(c.next() for c in cells))
            return torch.stack(xs), torch.stack(ys)

    def step(xs, ys):  # bf16 autocast on a GPU, as ccar runs (the packed batch norm in float32)
        packed_step(xs, ys)

    batches = Stacked()
    if graph:
        step = captured(step, batches.next(), device)
    return _timed(step, batches, steps, 3, device, k * batch)


def ccar_run(root: str, out: str, epochs: int, device: str, compile_: str, imbalance: int, depth: int) -> dict:
    warmup, milestones = scaled_schedule(epochs)
    overrides = [f"data_root={root}", f"imbalance={imbalance}", f"epochs={epochs}", f"out={out}", f"device={device}",
                 "progress=false", f"compile={compile_}", f"model.depth={depth}", f"optim.warmup_epochs={warmup}",
                 f"optim.milestones={milestones}"] + (["threads=1"] if device == "cpu" else [])
    cfg = load_config(str(CONFIGS / "cifar100-lt.yaml"), overrides)
    start = time.perf_counter()
    metrics = train(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - start
    history = [__import__("json").loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    steady = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]  # (epoch 1: warm-up)
    return {"seconds": seconds, "top1": metrics["top1"], "steady": float(np.median(steady)),
            "first": history[0]["images_per_s"]}


def ccar_pack(root: str, out: Path, k: int, epochs: int, device: str, imbalance: int, depth: int) -> dict:
    """K cells of the recipe (CE and CCAR-LA alternating, each its own seed and lr) as one ccar pack
    (:func:`ccar.engine.pack_train.train_pack`, what ``ccar sweep`` runs with ``pack``): aggregate images/s of the
    steady epochs and the wall time, build and test evaluation included."""
    from ccar.engine.pack_train import train_pack

    warmup, milestones = scaled_schedule(epochs)
    cfgs = []
    for i in range(k):
        loss = ["loss.name=ce"] if i % 2 == 0 else ["loss.name=ccar", "loss.base=la"]
        overrides = [f"data_root={root}", f"imbalance={imbalance}", f"epochs={epochs}", f"out={out / str(i)}",
                     f"device={device}", "progress=false", f"model.depth={depth}", f"optim.warmup_epochs={warmup}",
                     f"optim.milestones={milestones}", f"seed={i}", f"optim.lr={0.1 * (1 + i / k):.4f}",
                     *loss] + (["threads=1"] if device == "cpu" else [])
        cfgs.append(load_config(str(CONFIGS / "cifar100-lt.yaml"), overrides))
    start = time.perf_counter()
    train_pack(cfgs, [False] * k, log=lambda *_: None)
    seconds = time.perf_counter() - start
    history = [json.loads(line) for line in (out / "0" / "log.jsonl").read_text().splitlines()]
    steady = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    return {"seconds": seconds, "steady": k * float(np.median(steady))}


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="folder holding cifar-100-python (else synthetic files of the same shape)")
    p.add_argument("--epochs", type=int, default=200, help="the end-to-end recipe's epochs (0: skip it)")
    p.add_argument("--ccar-epochs", type=int, default=4, help="epochs of the ccar throughput runs")
    p.add_argument("--steps", type=int, default=300, help="timed steps of each bare loop")
    p.add_argument("--packs", default="1,4,16", help="pack sizes K")
    p.add_argument("--pack-steps", type=int, default=40)
    p.add_argument("--ccar-packs", default="1,4,16", help="section 4: K of the ccar packs (0: skip)")
    p.add_argument("--only", default="", help="comma-separated sections to run: 1, 2, 3 (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-class", type=int, default=500, help="synthetic data: training images per class")
    p.add_argument("--imbalance", type=int, default=100)
    p.add_argument("--depth", type=int, default=32, help="ResNet depth (32: the recipe's ResNet-32)")
    return parse_args(p, dict(device="cpu", per_class=10, imbalance=10, depth=8, epochs=2, ccar_epochs=2, steps=3,
                              packs="1,2", pack_steps=2, ccar_packs="1,2"))


def attempt(label: str, measure, *args, **kwargs):
    """``measure(*args)``, or None with the error printed: one failing row does not lose the others (a lent GPU's
    minutes are few)."""
    try:
        return measure(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (reported, then the next row)
        print(f"  {label}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", flush=True)
        return None


def _row(name: str, value: float, ref: float = None, note: str = "") -> None:
    if value is None:
        return
    ratio = f"{value / ref:6.2f}x" if ref else ""
    print(f"  {name:<44}{value:>12,.0f} {ratio:>7}  {note}", flush=True)


def main() -> None:
    args = arguments()
    device, gpu = torch.device(args.device), args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="ccar-bench-") as tmp_name:  # the synthetic files are 150 MB at full size
        tmp = Path(tmp_name)
        if args.data_root and (Path(args.data_root) / "cifar-100-python").is_dir():
            root, source = args.data_root, "real CIFAR-100"
        else:
            root, source = str(synthetic_cifar100(tmp / "data", args.per_class)), f"synthetic CIFAR-100 ({args.per_class}/class)"
        data = build_dataset("cifar100-lt", root, args.imbalance).train
        name = torch.cuda.get_device_name(device) if gpu else "CPU"
        print(f"{source}, imbalance {args.imbalance} ({len(data[1]):,} training images); ResNet-{args.depth}, batch "
              f"128; device {args.device} ({name}); torch {torch.__version__}", flush=True)
        if args.only and "1" not in args.only.split(","):
            bare = graph = None
        else:
            bare, graph = _section_one(args, data, device, gpu, root, tmp)
        if not args.only or "2" in args.only.split(","):
            _section_two(args, data, device, gpu)
        if args.ccar_packs != "0" and (not args.only or "4" in args.only.split(",")):
            _section_four(args, root, tmp)
        if args.epochs and (not args.only or "3" in args.only.split(",")):
            run = attempt("recipe", ccar_run, root, str(tmp / "recipe"), args.epochs, args.device, "auto",
                          args.imbalance, args.depth)
            if run:
                print(f"3. the {args.epochs}-epoch recipe end to end (ccar train, compile=auto): {run['seconds']:.1f} "
                      f"s, {run['steady']:,.0f} images/s in its epochs, test top-1 {run['top1']:.1f}%")


def _section_one(args, data, device, gpu, root, tmp):
    print("1. step throughput, images/s (steady state; ratio: to the bare CUDA-graph loop)")
    bare = attempt("bare eager", bare_throughput, data, device, args.depth, args.steps, graph=False)
    graph = attempt("bare graph", bare_throughput, data, device, args.depth, args.steps, graph=True) if gpu else None
    _row("bare PyTorch loop, eager", bare, graph)
    if graph:
        _row("bare PyTorch loop, one CUDA graph per step", graph, graph)
    elif not gpu:
        print("  bare PyTorch loop, one CUDA graph per step: needs a GPU")
    modes = [("false", "ccar train, eager (compile=false)")] + (
        [("graph", "ccar train, eager kernels as one CUDA graph (compile=graph)")] if gpu else []) + [
        ("auto", "ccar train, compile=auto")]
    for mode, label in modes:
        run = attempt(label, ccar_run, root, str(tmp / f"ccar-{mode}"), args.ccar_epochs, args.device, mode,
                      args.imbalance, args.depth)
        if run:
            _row(label, run["steady"], graph, f"(first epoch {run['first']:,.0f}, warm-up and capture)")
    return bare, graph


def _section_two(args, data, device, gpu):
    print("2. packed cells (own batch, loss and lr each; bf16 on a GPU), aggregate images/s (ratio: to K = 1)")
    one = None
    for k in [int(v) for v in args.packs.split(",")]:
        ips = attempt(f"K = {k}", packed_throughput, data, device, args.depth, k, args.pack_steps, graph=gpu)
        one = one or ips
        _row(f"K = {k:>2}{', one CUDA graph' if gpu else ', eager (CPU)'}", ips, one)


def _section_four(args, root, tmp):
    print(f"4. ccar packs ({args.ccar_epochs} epochs of the recipe per cell, CE and CCAR-LA alternating; train_pack "
          f"as ccar sweep runs it): aggregate images/s (ratio: to K = 1) and wall time per cell")
    one = None
    for k in [int(v) for v in args.ccar_packs.split(",")]:
        run = attempt(f"pack K = {k}", ccar_pack, root, tmp / f"pack{k}", k, args.ccar_epochs, args.device,
                      args.imbalance, args.depth)
        if run:
            one = one or run["steady"]
            _row(f"ccar pack K = {k:>2}", run["steady"], one, f"({run['seconds'] / k:.1f} s per cell in all)")


if __name__ == "__main__":
    main()
