"""The engine's parts on their own, without training a run: a Step on one batch, batch transforms, callbacks."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ccar import TrainingError
from ccar.config import load_config
from ccar.engine.callbacks import Control, LRSchedule, MaxNorm, NonFiniteLoss, StopOnSignal, build_callbacks
from ccar.engine.distributed import DistContext
from ccar.engine.run import Run
from ccar.engine.runtime import Precision
from ccar.engine.step import Batch, PlainStep, SAMStep, StepOutput, build_step
from ccar.engine.sam import SAM
from ccar.engine.transforms import Mix, build_transforms
from ccar.losses import build_loss

COUNTS = [40, 20, 10]


def tiny_run(*overrides, model=None):
    torch.manual_seed(0)
    cfg = load_config(None, ["optim.weight_decay=0", "optim.momentum=0", *overrides])
    data = SimpleNamespace(class_counts=COUNTS, input_shape=(4,), val=(torch.zeros(0, 4), torch.zeros(0)),
                           in_memory=True)
    model = model or nn.Sequential()
    if not hasattr(model, "fc"):
        model.fc = nn.Linear(4, 3)
    return Run(cfg, data, model, torch.device("cpu"), Precision(None, "test"), DistContext(), None, lambda x: x)


def sgd(run, lr=0.1):
    return torch.optim.SGD(run.model.parameters(), lr=lr)


def batch_of(n, index=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), index)


def test_a_plain_step_takes_the_mean_loss_gradient_and_reports_its_loss_and_logits():
    run = tiny_run("loss.name=ce")
    step = build_step(run, sgd(run), build_loss("ce", COUNTS), steps_per_epoch=10)
    assert isinstance(step, PlainStep)
    batch = batch_of(8)
    w = run.model.fc.weight.detach().clone()
    b = run.model.fc.bias.detach().clone()
    logits_ref = batch.x @ w.t() + b
    loss_ref = nn.functional.cross_entropy(logits_ref.requires_grad_(), batch.y)
    (grad,) = torch.autograd.grad(loss_ref, logits_ref)
    out = step(batch)
    assert isinstance(out, StepOutput) and out.stepped
    assert torch.allclose(out.loss, loss_ref.detach()) and torch.allclose(out.logits, logits_ref.detach())
    assert torch.allclose(run.model.fc.weight, w - 0.1 * grad.t() @ batch.x, atol=1e-6)  # one SGD step by hand


def test_accumulating_k_batches_is_one_step_of_the_concatenated_batch():
    whole, parts = tiny_run("loss.name=la"), tiny_run("loss.name=la", "optim.accumulate=2")
    assert torch.equal(whole.model.fc.weight, parts.model.fc.weight)
    one = build_step(whole, sgd(whole), build_loss("la", COUNTS), steps_per_epoch=1)
    two = build_step(parts, sgd(parts), build_loss("la", COUNTS), steps_per_epoch=2)
    a, b = batch_of(6, 0, seed=1), batch_of(6, 1, seed=2)
    start = parts.model.fc.weight.detach().clone()
    one(Batch(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), 0))
    assert not two(a).stepped and torch.equal(parts.model.fc.weight, start)  # no step after the first of two
    assert two(b).stepped
    assert torch.allclose(parts.model.fc.weight, whole.model.fc.weight, atol=1e-6)


def test_a_mixed_batch_carries_its_own_loss():
    loss_fn = build_loss("ccar", COUNTS, base="la", reduction="none")
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y, y_mix, lam = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 0, 1]), torch.tensor([0.3, 1.0, 0.5, 0.0])
    got = Batch(None, y, 0, y_mix, lam).losses(loss_fn, logits)
    want = lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y_mix)
    assert torch.allclose(got, want) and torch.equal(Batch(None, y).losses(loss_fn, logits), loss_fn(logits, y))


def test_a_sam_step_with_a_vanishing_radius_is_a_plain_step():
    plain, sam = tiny_run("loss.name=ce"), tiny_run("loss.name=ce", "optim.sam=1e-9")
    p = build_step(plain, sgd(plain), build_loss("ce", COUNTS), steps_per_epoch=5)
    s = build_step(sam, sgd(sam), build_loss("ce", COUNTS), steps_per_epoch=5)
    assert isinstance(s, SAMStep) and isinstance(s.sam, SAM)
    batch = batch_of(8)
    assert torch.allclose(p(batch).loss, s(batch).loss)
    assert torch.allclose(plain.model.fc.weight, sam.model.fc.weight, atol=1e-6)


def test_mixing_stops_at_mix_until_and_transforms_keep_their_order():
    run = tiny_run("mix=mixup", "mix_until=2", "epochs=4")
    transforms = build_transforms(run)
    assert [type(t).__name__ for t in transforms] == ["ToDevice", "Normalize", "Mix"]
    mix = transforms[-1]
    assert isinstance(mix, Mix)
    torch.manual_seed(0)
    mixed = mix(batch_of(8), epoch=1)
    assert mixed.y_mix is not None and mixed.lam is not None
    assert mix(batch_of(8), epoch=2).y_mix is None  # from epoch mix_until on: plain batches


def fake_trainer(run, steps=4, **state):
    base = dict(epoch=0, step=0, lr=0.0, last_save=0.0, control=Control(), totals=torch.zeros(3, dtype=torch.float64))
    return SimpleNamespace(run=run, steps=steps, state=SimpleNamespace(**{**base, **state}),
                           step=SimpleNamespace(optimizer=sgd(run)))


def test_the_lr_schedule_sets_each_step_lr_times_the_group_scale():
    run = tiny_run("optim.lr=0.4", "optim.warmup_epochs=1", "epochs=2")
    trainer = fake_trainer(run)
    trainer.step.optimizer.param_groups[0]["lr_scale"] = 0.5
    LRSchedule().on_step_start(trainer, 1)  # epoch 0, step 2 of 4: half-way through the warm-up
    assert trainer.state.lr == pytest.approx(0.2) and trainer.step.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_a_likely_cause():
    trainer = fake_trainer(tiny_run(), steps=4, lr=0.5)
    guard = NonFiniteLoss(every=2)
    guard.on_epoch_start(trainer)
    finite = StepOutput(torch.tensor(1.0), torch.zeros(2, 3), True)
    guard.on_step_end(trainer, batch_of(2, 0), StepOutput(torch.tensor(float("nan")), torch.zeros(2, 3), True))
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 1; likely cause: a learning rate too high.*0\.05"):
        guard.on_step_end(trainer, batch_of(2, 1), finite)  # checked every 2 steps: found at the check


def test_max_norm_projects_only_after_an_optimizer_step():
    run = tiny_run()
    with torch.no_grad():
        run.model.fc.weight.mul_(100)
    trainer, cb = fake_trainer(run), MaxNorm(1.0)
    cb.on_step_end(trainer, batch_of(2), StepOutput(torch.tensor(1.0), None, stepped=False))
    assert run.model.fc.weight.norm(dim=1).max() > 1.0
    cb.on_step_end(trainer, batch_of(2), StepOutput(torch.tensor(1.0), None, stepped=True))
    assert run.model.fc.weight.norm(dim=1).max() <= 1.0 + 1e-6


def test_a_stop_signal_asks_the_loop_for_a_checkpoint_then_a_stop_except_at_the_epoch_end():
    trainer, cb = fake_trainer(tiny_run(), steps=4), StopOnSignal(every=1, accumulate=1, minutes=0)
    cb.on_fit_start(trainer)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        cb.on_step_end(trainer, batch_of(2, 1), StepOutput(torch.tensor(1.0), None, True))
        assert trainer.state.control.save and trainer.state.control.stop == signal.SIGUSR1
        trainer.state.control.reset()
        cb.on_step_end(trainer, batch_of(2, 3), StepOutput(torch.tensor(1.0), None, True))  # the last step
        assert not trainer.state.control.save  # the epoch's own checkpoint follows
    finally:
        cb.teardown(trainer)


def test_build_callbacks_fixes_the_order_and_adds_max_norm_only_when_set():
    names = [type(c).__name__ for c in build_callbacks(load_config(None, ["optim.max_norm=1"]), "cpu")]
    assert names == ["LRSchedule", "NonFiniteLoss", "MaxNorm", "BestOnValidation", "Logging", "StopOnSignal",
                     "Checkpointing"]
    assert "MaxNorm" not in [type(c).__name__ for c in build_callbacks(load_config(None, []), "cpu")]


# --- the captured step: what can be checked without a GPU ------------------------------------------------------


class HostReads:
    """Fails on every read of a tensor's value by the host (.item(), bool(), float(), .tolist(), .numpy()): each
    would be a device synchronisation on a GPU, and is illegal while a CUDA graph is captured."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(name):
            def read(t, *a, **k):
                raise AssertionError(f"host read Tensor.{name} inside the step")
            return read

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("loss", [["loss.name=ccar", "loss.base=la"], ["loss.name=ccar", "loss.base=ldam"],
                                  ["loss.name=cb-focal"], ["loss.name=ce", "loss.drw_epoch=1"], ["loss.name=las"],
                                  ["loss.name=ccar", "loss.base=vs", "loss.normalize=batch"]])
def test_the_plain_step_reads_nothing_back_to_the_host_so_a_cuda_graph_can_capture_it(loss):
    run = tiny_run(*loss, "epochs=3")
    loss_fn = build_loss(run.cfg.loss.name, COUNTS, **run.cfg.loss.options())
    loss_fn.validate = False  # (as the engine builds it: labels were checked when the data was loaded)
    step = build_step(run, sgd(run), loss_fn, steps_per_epoch=10)
    with HostReads():
        out = step(batch_of(8))
    assert torch.isfinite(out.loss)


def test_on_the_cpu_compile_auto_runs_eagerly_and_compile_graph_says_why_not():
    from ccar import ConfigError
    from ccar.engine.step import capture_blocker, step_summary, uses_graph

    run = tiny_run()
    assert run.cfg.compile == "auto" and not uses_graph(run)
    assert capture_blocker(run) == "CUDA graphs need a GPU (device cpu)" and step_summary(run) == ""
    assert isinstance(build_step(run, sgd(run), build_loss("ce", COUNTS), 4), PlainStep)
    with pytest.raises(ConfigError, match="compile=graph: this run's step cannot be a CUDA graph: CUDA graphs need"):
        uses_graph(tiny_run("compile=graph"))
    gpu = Run(**{**tiny_run("mix=mixup").__dict__, "device": torch.device("cuda")})  # (no CUDA call is made)
    assert capture_blocker(gpu).startswith("mix=mixup")


def test_a_graph_safe_optimizer_keeps_its_lr_on_the_device_and_steps_like_the_plain_one(tmp_path):
    from ccar.engine import checkpoint as ckpt
    from ccar.engine.train import build_optimizer

    knobs = ("optim.backbone_lr=0.02", "optim.nesterov=true", "optim.momentum=0.9", "optim.weight_decay=0.01")
    plain, safe = tiny_run(*knobs), tiny_run(*knobs)
    a, b = build_optimizer(plain.model, plain.cfg.optim), build_optimizer(safe.model, safe.cfg.optim, graph_safe=True)
    assert all(torch.is_tensor(g["lr"]) and g["fused"] for g in b.param_groups)
    for index in range(3):
        for run, opt in ((plain, a), (safe, b)):
            LRSchedule().on_step_start(SimpleNamespace(run=run, steps=3, state=SimpleNamespace(epoch=0, lr=0.0),
                                                       step=SimpleNamespace(optimizer=opt)), index)
            opt.zero_grad()
            nn.functional.cross_entropy(run.model(batch_of(8, seed=index).x), batch_of(8, seed=index).y).backward()
            opt.step()
    assert [float(g["lr"]) for g in b.param_groups] == pytest.approx([g["lr"] for g in a.param_groups])
    assert torch.allclose(plain.model.fc.weight, safe.model.fc.weight, atol=1e-6)
    path = tmp_path / "c.safetensors"  # a checkpoint stores the lr as a number; a graph-safe optimizer keeps tensors
    ckpt.save_checkpoint(path, safe.model.state_dict(), b, None, {"epoch": 0})
    tensors, _, opt_meta = ckpt.read_checkpoint(path)
    lr_tensor = b.param_groups[0]["lr"]
    lr_tensor.fill_(9.0)
    ckpt.restore_optimizer(b, tensors, opt_meta)
    assert b.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(a.param_groups[0]["lr"])
    assert b.param_groups[0]["fused"]
