"""The compiled CPU kernel of CCAR: it builds where a compiler exists, matches the PyTorch path, and failing to build
falls back cleanly. Value and gradient equivalence for every base and option is in test_losses.py (`path`)."""

import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

from ccar import LossError
from ccar.cli import main
from ccar.losses import CCARLoss, build_loss, native

COUNTS = [500, 200, 80, 30, 12, 5]


def needs_kernel():
    if native.kernel() is None:
        pytest.skip(f"compiled kernel unavailable here: {native.status()}")


@pytest.fixture
def fresh_state(monkeypatch):
    """Let a test change CCAR_NATIVE or the build step, then restore the process's loaded kernel."""
    saved = dict(native._state)
    native.reset()
    yield monkeypatch
    native.reset()
    native._state.update(saved)


def both_paths(fn):
    needs_kernel()
    got = fn()
    with native.disabled():
        want = fn()
    return got, want


def needs_compiler():
    if native.mode() == "off":
        pytest.skip("CCAR_NATIVE=off in this environment")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler on this machine")


def test_kernel_builds_where_a_compiler_exists():
    needs_compiler()
    assert native.kernel() is not None, native.status()
    assert "compiled kernel" in native.status()


def test_off_and_bad_settings(fresh_state):
    fresh_state.setenv(native.ENV, "off")
    assert native.kernel() is None
    assert "CCAR_NATIVE=off" in native.status()
    loss = build_loss("ccar", COUNTS)(torch.zeros(2, 6), torch.tensor([0, 5]))  # the PyTorch path serves
    assert torch.isfinite(loss)
    native.reset()
    fresh_state.setenv(native.ENV, "sometimes")
    with pytest.raises(LossError, match="CCAR_NATIVE='sometimes' is not a valid setting; use auto, on or off"):
        native.kernel()


def test_build_failure_warns_once_and_falls_back(fresh_state):
    def broken(verbose=False):
        raise RuntimeError("Error building extension 'ccar_cpu'\nc++: command not found")

    fresh_state.setenv(native.ENV, "auto")
    fresh_state.setattr(native, "build", broken)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel unavailable .*command not found"):
        assert native.kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor retries
        assert native.kernel() is None
        x, y = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 1, 2, 5])
        build_loss("ccar", COUNTS)(x, y).backward()
    assert "command not found" in native.status()
    native.reset()
    fresh_state.setenv(native.ENV, "on")
    with pytest.raises(LossError, match="CCAR_NATIVE=on but the compiled CCAR kernel could not be built"):
        native.kernel()


def test_kernel_name_tracks_source_torch_and_python(monkeypatch, tmp_path):
    name = native.build_name()
    assert name.startswith("ccar_cpu_") and len(name) == len("ccar_cpu_") + 12
    assert native.build_dir().name == name
    edited = tmp_path / "ccar_cpu.cpp"
    edited.write_bytes(native.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.build_name() != name  # an edited kernel gets a fresh build
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-env" / "torch" / "__init__.py"))
    assert native.build_name() != name  # so does another environment's torch


def test_cli_reports_the_path(capsys):
    assert main(["kernel"]) == 0
    out = capsys.readouterr().out
    assert "ccar CCAR kernel" in out and ("compiled kernel" in out or "pure-PyTorch path" in out)


def test_bitwise_deterministic_and_retain_graph():
    needs_kernel()
    loss_fn = build_loss("ccar", COUNTS, base="ldam")
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = torch.randint(0, 6, (32,), generator=torch.Generator().manual_seed(1))
    a = loss_fn(x, y)
    (g1,) = torch.autograd.grad(a, x, retain_graph=True)
    (g2,) = torch.autograd.grad(a, x)  # the saved state survives a first backward with retain_graph
    (g3,) = torch.autograd.grad(loss_fn(x, y), x)
    assert torch.equal(g1, g2) and torch.equal(g1, g3)
    assert torch.equal(a, loss_fn(x, y))


@pytest.mark.parametrize("base", ["ce", "ldam", "la", "cb-focal"])
def test_odd_layouts_and_dtypes(base):
    """Transposed logits, int32 targets, a logits tensor the LDAM margin must not modify in place."""
    loss_fn = build_loss("ccar", COUNTS, base=base)
    g = torch.Generator().manual_seed(2)
    base_x = torch.randn(6, 9, generator=g)
    y = torch.randint(0, 6, (9,), generator=g)
    for x, t in [(base_x.t(), y), (base_x.t().contiguous(), y.int())]:
        x = x.detach().requires_grad_()
        before = x.detach().clone()
        got, want = both_paths(lambda x=x, t=t: (loss_fn(x, t), torch.autograd.grad(loss_fn(x, t), x)[0]))
        assert torch.equal(x.detach(), before)
        assert torch.allclose(got[0], want[0], rtol=1e-5) and torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-7)


def test_no_grad_and_inference_mode():
    needs_kernel()
    loss_fn = CCARLoss(COUNTS, base="la")
    x, y = torch.randn(8, 6), torch.randint(0, 6, (8,))
    with torch.no_grad():
        a = loss_fn(x, y)
    with torch.inference_mode():
        b = loss_fn(x, y)
    assert a.item() == pytest.approx(b.item()) and not a.requires_grad
    with native.disabled():
        assert a.item() == pytest.approx(loss_fn(x, y).item(), rel=1e-6)


def test_kernel_errors_are_loss_errors():
    needs_kernel()
    loss_fn = build_loss("ccar", COUNTS)
    x = torch.randn(3, 6)
    with pytest.raises(LossError, match="target value 7 is out of range for 6 classes"):
        loss_fn(x, torch.tensor([0, 7, 1]))
    with pytest.raises(LossError, match="target value -2"):
        loss_fn(x, torch.tensor([0, -2, 1]))
    with pytest.raises(LossError, match="class_counts has 6 entries but logits have 4 classes"):
        loss_fn(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(LossError, match="shape"):
        loss_fn(x, torch.tensor([0, 1]))
    with pytest.raises(LossError, match="integer"):
        loss_fn(x, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.slow
def test_concurrent_first_builds_share_one_compile(tmp_path):
    """Two processes that need the kernel at once in an empty cache: one compiles, the other waits and loads it."""
    needs_compiler()
    code = "from ccar.losses import native; m = native.kernel(); assert m is not None; print(m.__file__)"
    env = {**os.environ, "CCAR_CACHE": str(tmp_path), "CCAR_NATIVE": "on"}
    stale = tmp_path / "kernels" / native.build_name() / "lock"  # as if an earlier build had been SIGKILLed
    stale.parent.mkdir(parents=True)
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith(str(tmp_path / "kernels"))
    assert [d.name for d in (tmp_path / "kernels").iterdir()] == [native.build_name()]
    assert (stale.parent / "ok").exists() and not stale.exists()


def test_finished_builds_import_directly_and_damaged_ones_rebuild(monkeypatch, tmp_path):
    """No lock and no ninja run once a build has finished; a build is trusted only after it loaded ('ok')."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("CCAR_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["name"]) or "built")
    directory = native.build_dir()
    assert native.build() == "built" and (directory / "ok").exists() and len(calls) == 1
    monkeypatch.setattr(native, "_import", lambda path: f"imported {path.name}")
    assert native.build().startswith(f"imported {directory.name}") and len(calls) == 1

    def damaged(path):
        raise ImportError("file too short")

    monkeypatch.setattr(native, "_import", damaged)
    young = directory / "lock"
    young.touch()  # a build in progress elsewhere: left alone
    assert native.build() == "built" and len(calls) == 2 and young.exists()


def test_implementation_names_the_path():
    loss_fn = CCARLoss(COUNTS)
    assert CCARLoss(COUNTS, normalize="batch").implementation() == "composed autograd ops (batch-normalised weights)"
    assert loss_fn.implementation("cuda") == "PyTorch autograd function"
    with native.disabled():
        assert loss_fn.implementation("cpu") == "PyTorch autograd function"
    if native.kernel() is not None:
        assert loss_fn.implementation("cpu") == "compiled CPU kernel"
