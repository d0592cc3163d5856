"""Every script in benchmarks/ runs end to end in its ``--smoke`` mode (seconds on the CPU), so that a benchmark cannot
stop working unnoticed: nothing else runs them, and gpu_recipe.py is meant for a GPU that CI does not have."""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"[\d,]+\.?\d*"

# Lines each smoke run must print: the script's table with numbers in it, not just an exit code.
EXPECTED = {
    "augment_policies.py": [
        rf"^resnet32 \(3, 32, 32\), batch 8: step without a policy +{NUMBER} ms$",
        rf"^  cutout 16 +{NUMBER} ms  x{NUMBER}  \| the policy alone +{NUMBER} ms = +{NUMBER} % of the step$",
        rf"^  none \(control\) +{NUMBER} ms  x{NUMBER}$",
    ],
    "bf16_accuracy.py": [
        rf"^relative difference, logits / gradients: emulated vs PyTorch bf16 {NUMBER} / {NUMBER}; ",
        rf"^top1 off +{NUMBER} +{NUMBER} ± {NUMBER}$",
        rf"^tail bf16 +{NUMBER} +{NUMBER} ± {NUMBER}$",
        rf"^  bf16 - float32 top1: [+-]{NUMBER} \(one seed: no interval\)$",
        rf"^mean training time per run: float32 {NUMBER} s, bf16 {NUMBER} s",
    ],
    "bf16_speed.py": [
        r"amp=auto is (bf16|float32) here$",
        rf"^  cnn +\(1, 28, 28\) +batch 8: float32 +{NUMBER} ms, bf16 +{NUMBER} ms -> bf16 is {NUMBER}x",
        rf"^  resnet32 +\(3, 32, 32\) +batch 8: float32 +{NUMBER} ms, bf16 +{NUMBER} ms -> bf16 is {NUMBER}x",
        rf"^  round 1 amp=off : +{NUMBER} s, +{NUMBER} img/s training, test top-1 {NUMBER}$",
        rf"^  round 1 amp=auto: +{NUMBER} s, +{NUMBER} img/s training, test top-1 {NUMBER}$",
        rf"^median whole job: amp=off {NUMBER} s \(1\.00x float32's speed\), amp=auto {NUMBER} s",
    ],
    "channels_last.py": [
        rf"^  round 1 channels_last=false: +{NUMBER} img/s training, +{NUMBER} s whole run$",
        rf"^  round 1 channels_last=true : +{NUMBER} img/s training, +{NUMBER} s whole run$",
        rf"^median: NCHW {NUMBER} img/s, channels-last {NUMBER} img/s -> {NUMBER}x training throughput; ",
    ],
    "csv_reader.py": [
        r"^2,000 rows x 11 columns",
        rf"^  hand-written csv module +{NUMBER} s \(median of 1\)$",
        rf"^  pandas \(ccar\) +{NUMBER} s \(median of 1\)$",
        rf"^speed-up: {NUMBER}x$",
    ],
    "feature_cache.py": [
        r"^3 head methods, finetune=linear, generated Fashion-MNIST files IF 10, ",
        rf"^  cached features \(computed once\): +{NUMBER} s$",
        rf"^  through the backbone every step: +{NUMBER} s$",
        *(rf"^    {m} +{NUMBER} \| +{NUMBER}$" for m in ("CCAR-LA", "CB-RS", "tau-norm")),
        r'^\{"cached_s": ',
    ],
    "gpu_recipe.py": [
        r"^synthetic CIFAR-100 \(10/class\), imbalance 10 \([\d,]+ training images\); ResNet-8, batch 128; device cpu",
        rf"^  bare PyTorch loop, eager +{NUMBER} *$",
        r"^  bare PyTorch loop, one CUDA graph per step: needs a GPU$",
        rf"^  ccar train, eager \(compile=false\) +{NUMBER} +\(first epoch {NUMBER}, warm-up and capture\)$",
        rf"^  ccar train, compile=auto +{NUMBER} +\(first epoch {NUMBER}, warm-up and capture\)$",
        rf"^  K =  2, eager \(CPU\) +{NUMBER} +{NUMBER}x *$",
        rf"^3\. the 2-epoch recipe end to end \(ccar train, compile=auto\): {NUMBER} s, {NUMBER} images/s in its "
        rf"epochs, test top-1 {NUMBER}%$",
    ],
    "loss_overhead.py": [
        r"^\(a\) one training step \(forward \+ loss \+ backward \+ SGD step\), batch 8, 100 classes",
        *(rf"^ *{m} \({shape}\): step CE +{NUMBER} ms \| CCAR +{NUMBER} ms \([+-]{NUMBER} %\) \| control CE "
          for m, shape in (("cnn", "1, 28, 28"), ("resnet32", "3, 32, 32"))),
        *(rf"^   1024 x 1000  CE +{NUMBER} us \| CCAR\({base}\) +{NUMBER} us \| {NUMBER}x$" for base in ("ce", "la")),
    ],
    "colour_folders.py": [
        r"^\| folder \| candidate \| epochs \| CPU s \| balanced test % \(seeds\) \| mean \| val % \|$",
        rf"^\| toy40 \(40 px, {NUMBER} train, {NUMBER} CPU-s\) \| .+ \| 1 \| {NUMBER} \| {NUMBER} \| ",
    ],
}
# Arguments beyond --smoke: colour_folders keeps its folders and results in --root (default: a fixed /tmp folder)
EXTRA_ARGS = {"colour_folders.py": lambda tmp: ["--root", str(tmp / "root")]}
if importlib.util.find_spec("kornia"):  # `make test` installs it; without it the script says so and skips those rows
    EXPECTED["augment_policies.py"] += [rf"^  {p} +{NUMBER} ms  x{NUMBER}  \| the policy alone"
                                        for p in ("randaugment n2 m10", "autoaugment cifar10", "randaugment \\+ cutout 16")]
    EXPECTED["augment_policies.py"] += [rf"^  randaugment n2 m10 \(grey\) +{NUMBER} ms"]
else:
    EXPECTED["augment_policies.py"] += [r"^kornia is not installed .*: the RandAugment and AutoAugment rows are skipped$"]


def test_every_benchmark_has_a_smoke_run():
    """A new script in benchmarks/ needs its entry above (``_*.py`` are helpers, not scripts)."""
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED), (f"benchmarks without a smoke test: {sorted(scripts - set(EXPECTED))}; "
                                      f"smoke tests without a script: {sorted(set(EXPECTED) - scripts)}")


def _smoke(script: str, folder: Path) -> subprocess.CompletedProcess:
    # One thread per process (the machine is shared), an empty cache (no download, no user data), and a working
    # directory and temporary folder of its own: whatever a script writes outside them lands in neither the repo nor
    # runs/, and the empty folders afterwards show that it cleaned up after itself.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(folder / "tmp"),
           "CCAR_CACHE": str(folder / "cache")}
    extra = EXTRA_ARGS[script](folder) if script in EXTRA_ARGS else []
    return subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *extra], capture_output=True,
                          text=True, env=env, cwd=folder / "cwd", timeout=240)


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """The smoke runs of the selected scripts, started together when the first is asked for and run two at a time:
    each is one thread (mostly start-up: importing torch, spawning workers), and this machine has two cores."""
    scripts = [item.callspec.params["script"] for item in request.session.items
               if getattr(item, "module", None) is request.module and item.originalname == "test_smoke_run"]
    scripts.sort(key=lambda s: s not in ("gpu_recipe.py", "colour_folders.py"))  # the longest first
    folders = {s: tmp_path_factory.mktemp(s.removesuffix(".py")) for s in scripts}
    for folder in folders.values():
        for d in ("cwd", "tmp", "cache"):
            (folder / d).mkdir()
    with ThreadPoolExecutor(2) as pool:
        yield {s: (pool.submit(_smoke, s, folders[s]), folders[s]) for s in scripts}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_smoke_run(script, smoke_runs):
    future, folder = smoke_runs[script]
    proc = future.result()
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    missing = [p for p in EXPECTED[script] if not re.search(p, proc.stdout, re.MULTILINE)]
    assert not missing, f"{script} --smoke printed no line matching {missing}:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr[-4000:]
    left = [str(p.relative_to(folder)) for d in ("cwd", "tmp", "cache") for p in (folder / d).iterdir()
            if not p.name.startswith("torchinductor_")]  # (torch's compile cache, made when torch._dynamo loads)
    assert not left, f"{script} --smoke left files behind: {left}"


def _gpu_recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its helper module sits beside it
    spec = importlib.util.spec_from_file_location("gpu_recipe", BENCHMARKS / "gpu_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_recipe_schedule_fits_every_epoch_count(monkeypatch):
    """The recipe's warm-up and milestones, scaled to --epochs N, pass the config's checks for every N (the
    unscaled milestones 160, 180 failed for every N < 180)."""
    from ccar.engine.config import load_config

    module = _gpu_recipe(monkeypatch)
    assert doctest.testmod(module).failed == 0  # (benchmarks/ is outside the doctest run of `make test`)
    scaled = module.scaled_schedule
    assert scaled(200) == (5, [160, 180])
    for epochs in list(range(1, 60)) + [100, 179, 180, 199, 200, 400]:
        warmup, milestones = scaled(epochs)
        assert milestones == sorted(set(milestones)) and 1 <= milestones[0] and milestones[-1] <= epochs
        assert len(milestones) == min(2, epochs) and (warmup == 0 or warmup < milestones[0])
        load_config(str(BENCHMARKS.parent / "configs" / "cifar100-lt.yaml"),
                    [f"epochs={epochs}", f"optim.warmup_epochs={warmup}", f"optim.milestones={milestones}"])
