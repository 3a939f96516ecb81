"""Speed recipes, fast networks, EMA / TTA / mixup / compile paths and the LR finder.

Small generated data only; no timing assertions (the benchmarks in bench/ measure speed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcls import TrainConfig, train
from imgcls.api import Classifier
from imgcls.data.transforms import BatchAugment, Preprocessing
from imgcls.engine.callbacks import Callback, TrainState
from imgcls.engine.lr_find import LRFinder
from imgcls.engine.optim import build_optimizer, build_scheduler
from imgcls.engine.recipes import RECIPES, RecipeContext, choose_recipe, resolve_recipe
from imgcls.engine.averaging import EMA, Lookahead
from imgcls.engine.threads import configure_threads
from imgcls.engine.tta import tta_forward
from imgcls.errors import ImgclsError
from imgcls.models import create_model
from tests.conftest import pattern_images


@pytest.fixture
def colour_npz(tmp_path):
    # independent noise per channel: the shared fixture's channels are copies of one another,
    # a degenerate patch covariance that no real colour data set has (airbench whitens it)
    rng = np.random.default_rng(0)
    x, y = pattern_images(48, size=16, channels=3)
    xt, yt = pattern_images(12, size=16, channels=3, seed=1)
    x = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    xt = np.clip(xt.astype(int) + rng.integers(-40, 40, xt.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "colour.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


# ---------------------------------------------------------------- recipes
def test_recipe_fills_only_unset_fields():
    ctx = RecipeContext(kind="digits", num_train=60000, in_memory=True, device_type="cpu")
    cfg = resolve_recipe(TrainConfig(data="x", epochs=7), ctx)
    assert cfg.recipe == "fast"  # auto -> fast for a large in-memory digit set
    assert cfg.epochs == 7  # explicit value wins
    assert cfg.batch_size == RECIPES.get("fast")(ctx)["batch_size"]
    ref = resolve_recipe(TrainConfig(data="x", recipe="reference"), ctx)
    assert (ref.batch_size, ref.lr, ref.epochs, ref.augment) == (32, 1e-3, 10, "none")


def test_auto_recipe_choice():
    assert choose_recipe(RecipeContext("small-colour", 50000, True, "cuda")) == "fast"
    assert choose_recipe(RecipeContext("digits", 100, True, "cpu")) == "default"  # tiny: plain defaults
    assert choose_recipe(RecipeContext("photos", 50000, False, "cpu")) == "default"
    fast_gpu = RECIPES.get("fast")(RecipeContext("small-colour", 50000, True, "cuda"))
    fast_cpu = RECIPES.get("fast")(RecipeContext("small-colour", 50000, True, "cpu"))
    assert fast_gpu["model"] == "airbench"
    assert fast_gpu["lr"] / fast_gpu["batch_size"] == pytest.approx(fast_cpu["lr"] / fast_cpu["batch_size"])


def test_fast_digits_recipe_trains_a_sample_budget_and_keeps_the_warmup_share():
    """One epoch of MNIST's 54,000 images (99.10-99.21% test, docs/benchmarks.md), as many
    epochs of a smaller set as see about as many samples; an explicit --epochs keeps the
    recipe's warm-up share instead of warming up past the end of the run."""
    mnist = resolve_recipe(TrainConfig(data="x"), RecipeContext("digits", 54001, True, "cpu"))
    assert (mnist.epochs, mnist.batch_size, mnist.lr, mnist.label_smoothing) == (1, 128, 1e-2, 0.1)
    assert mnist.warmup_epochs == pytest.approx(0.3) and "1 epoch of reference_cnn" in mnist.recipe_choice
    small_ctx = RecipeContext("digits", 5000, True, "cpu")
    small = resolve_recipe(TrainConfig(data="x"), small_ctx)
    assert (small.epochs, small.warmup_epochs) == (10, 3.0)
    short = resolve_recipe(TrainConfig(data="x", epochs=2), small_ctx)
    assert (short.epochs, short.warmup_epochs) == (2, pytest.approx(0.6))
    kept = resolve_recipe(TrainConfig(data="x", epochs=2, warmup_epochs=1.5), small_ctx)
    assert kept.warmup_epochs == 1.5  # given explicitly: left alone
    cifar = resolve_recipe(TrainConfig(data="x", epochs=6), RecipeContext("small-colour", 50000, True, "cpu"))
    assert cifar.warmup_epochs == pytest.approx(round(0.23 * 12, 2) * 6 / 12, abs=1e-3)


@pytest.mark.parametrize("recipe", ["fast", "accurate"])
def test_recipes_train_correctly(tmp_path, colour_npz, recipe):
    """Each recipe (its model, optimiser and schedule) learns: loss falls, accuracy rises."""
    res = train({"data": str(colour_npz), "recipe": recipe, "epochs": 6, "batch_size": 32,
                 "out": str(tmp_path), "name": recipe, "seed": 0}, progress=False)
    hist = res.classifier.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res.metrics["accuracy"] > 0.6  # 3 classes: chance is 0.33
    saved = TrainConfig.from_yaml(res.run_dir / "config.yaml")
    assert saved.recipe == recipe and saved.model == "airbench"  # resolved values recorded
    assert res.summary["recipe"] == recipe


# ---------------------------------------------------------------- fast networks
def test_airbench_whitening_and_groups():
    torch.manual_seed(0)
    net = create_model("airbench", 10, in_chans=3, img_size=32)
    x = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    net.init_from_data(x)
    w = net.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    # the first half whitens: unit variance along each eigen-direction of the patch covariance
    out = torch.nn.functional.conv2d(x, w[:12])
    var = out.transpose(0, 1).reshape(12, -1).var(dim=1)
    assert torch.allclose(var, torch.ones(12), atol=0.05)
    assert torch.equal(w[12:], -w[:12])
    groups = net.param_groups(1e-3)
    opt = build_optimizer(net, "sgd", 0.1, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(6.4), pytest.approx(0.1)]
    assert len(groups[0]["params"]) == 6  # one trainable bias per BatchNorm
    assert net(x).shape == (64, 10)


def test_airbench_small_on_digit_sizes():
    net = create_model("airbench_small", 10, in_chans=1, img_size=28)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ImgclsError, match="at least 9x9"):
        create_model("airbench_small", 10, in_chans=1, img_size=8)


def test_linear_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "linear", 100, 20)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 + 0.8 / 21)
    assert max(lrs) == pytest.approx(1.0) and lrs[20] == pytest.approx(1.0)
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_eager_optimizer_steps_as_torch_does(name, monkeypatch):
    """build_optimizer's class (torch.optim's, without its torch.compile guards) takes the
    very steps torch's own class takes, and its state dict loads into either; built after
    torch's class has had instances (its step then wrapped twice), it still skips the guard."""
    import torch._dynamo

    import imgcls.engine.optim as optim

    def run(eager):
        if eager:
            monkeypatch.setattr(optim, "_EAGER", {})
            monkeypatch.setattr(torch._dynamo, "graph_break", lambda: pytest.fail("went through the guard"))
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        opt = build_optimizer(net, name, 0.05, weight_decay=0.01, eager=eager)
        sched = build_scheduler(opt, "onecycle", 20, 4)
        for i in range(20):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            sched.step()
        return net, opt

    (net_t, opt_t), (net_e, opt_e) = run(False), run(True)
    monkeypatch.undo()
    assert type(opt_e) is not type(opt_t) and isinstance(opt_e, type(opt_t))
    for a, b in zip(net_e.parameters(), net_t.parameters()):
        assert torch.equal(a, b)
    opt_t.load_state_dict(opt_e.state_dict())
    opt_e.load_state_dict(opt_t.state_dict())
    assert opt_e.state_dict()["param_groups"] == opt_t.state_dict()["param_groups"]


def test_training_process_never_imports_the_compiler():
    """A training run without --compile does not pay torch.compile's 1.2 s import
    (torch._dynamo, first called from torch.optim's guards), checkpoint included."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from imgcls.engine.optim import build_optimizer, build_scheduler\n"
            "net = torch.nn.Linear(4, 2)\n"
            "for name in ('adam', 'adamw', 'sgd'):\n"
            "    opt = build_optimizer(net, name, 1e-3)\n"
            "    sched = build_scheduler(opt, 'onecycle', 10, 2)\n"
            "    net(torch.randn(3, 4)).sum().backward(); opt.step(); sched.step(); opt.zero_grad()\n"
            "    opt.load_state_dict(opt.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------- augmentation
def test_batch_augment_shift_matches_crop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = BatchAugment(translate=2)(x, gen)
    gen = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 5, (2,), generator=gen), torch.randint(0, 5, (2,), generator=gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")  # airbench pads by reflection
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6])


def test_randaugment_batch_and_bad_config():
    x = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    out = BatchAugment(randaugment="rand-m9-n2")(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    gray = BatchAugment(randaugment="rand-m5")(x[:, :1])
    assert gray.shape == (4, 1, 16, 16)
    with pytest.raises(ImgclsError, match="--randaugment"):
        BatchAugment(randaugment="rand-q9")(x)


def test_normalize_fast_path_matches_reference():
    pre = Preprocessing(16, 3, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    x = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    out = pre.normalize(x, channels_last=True)
    assert torch.allclose(out, ref, atol=1e-5) and out.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- EMA, TTA, mixup, compile
def test_ema_swaps_average_in_for_validation_and_back():
    model = torch.nn.Linear(2, 2)
    ema = EMA(decay=0.5)
    state = TrainState(epochs=1, steps_per_epoch=1)
    ema.on_fit_start(state, model)
    with torch.no_grad():
        model.weight.add_(10.0)
    state.step = 100  # past the decay warm-up
    ema.on_batch_end(state)
    live = model.weight.detach().clone()
    ema.on_train_epoch_end(state, model)
    assert not torch.allclose(model.weight, live)  # validation sees the average
    ema.on_epoch_start(state)
    assert torch.equal(model.weight, live)  # training resumes from the live weights


def test_flip_tta_is_mirror_invariant():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    a, b = tta_forward(model, x, "flip"), tta_forward(model, x.flip(-1), "flip")
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(tta_forward(model, x, "none"), tta_forward(model, x.flip(-1), "none"))


def test_lookahead_pulls_live_weights_to_slow_ones():
    model = torch.nn.Linear(2, 2)
    la = Lookahead(every=1, max_decay=0.5)
    state = TrainState(epochs=1, steps_per_epoch=4)
    la.on_fit_start(state, model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    state.step = 4  # the last step: decay = max_decay
    la.on_batch_end(state)
    assert torch.allclose(model.weight, start + 0.5)  # halfway between slow and live


def test_flip_shift_tta_matches_its_definition():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    out = tta_forward(model, x, "flip-shift")
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [tta_forward(model, v, "flip") for v in (p[..., :8, :8], p[..., 2:, 2:])]
    assert torch.allclose(out, tta_forward(model, x, "flip") / 2 + (views[0] + views[1]) / 4, atol=1e-5)


def test_fit_with_ema_mixup_tta(colour_npz):
    clf = Classifier.create("airbench", num_classes=3, in_chans=3, img_size=16, seed=0)
    summary = clf.fit(colour_npz, epochs=4, batch_size=16, lr=0.2, optimizer="sgd", schedule="linear",
                      ema=0.9, mixup=0.2, cutmix=1.0, tta="flip-shift", lookahead=True, progress=False,
                      precision="bf16")
    assert summary["tta"] == "flip-shift" and clf.card["tta"] == "flip-shift"
    assert clf.history[-1]["train_loss"] < clf.history[0]["train_loss"]
    assert clf.evaluate(colour_npz)["accuracy"] > 0.6


@pytest.mark.slow
def test_compile_path_trains(tiny_npz):
    clf = Classifier.create("reference_cnn", num_classes=3, classes=["a", "b", "c"], in_chans=1, img_size=16)
    summary = clf.fit(tiny_npz, epochs=2, batch_size=32, compile=True, progress=False, precision="fp32")
    assert summary["epochs_run"] == 2
    assert clf.evaluate(tiny_npz)["accuracy"] > 0.5


# ---------------------------------------------------------------- LR finder, threads
def test_lr_find_returns_sane_rate(tiny_npz):
    clf = Classifier.create("reference_cnn", num_classes=3, classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    res = clf.find_lr(tiny_npz, batch_size=16, steps=60, precision="fp32")
    assert 1e-5 < res.suggestion < 1.0
    assert res.suggestion == pytest.approx(res.min_loss_lr / 10, rel=0.01)
    assert min(res.losses) < res.losses[0]  # the loss did fall along the sweep
    assert all(torch.equal(v, clf.model.state_dict()[k]) for k, v in before.items())  # model untouched


def test_lr_auto_in_training(tiny_npz):
    clf = Classifier.create("reference_cnn", num_classes=3, classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    summary = clf.fit(tiny_npz, epochs=3, batch_size=16, lr="auto", progress=False, precision="fp32")
    assert summary["lr"] == summary["lr_find"]["suggestion"] > 0
    assert clf.evaluate(tiny_npz)["accuracy"] > 0.6


def test_lr_find_rejects_bad_range():
    with pytest.raises(ValueError):
        LRFinder(start_lr=1.0, end_lr=0.1, steps=10)


def test_configure_threads_explicit_and_bounded(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # e.g. one of two DDP processes on 2 cores
        assert configure_threads(None) == 1
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= configure_threads(None) <= max(1, torch.get_num_threads())
    finally:
        torch.set_num_threads(old)


def test_idle_core_probe_measures_from_an_earlier_sample(monkeypatch):
    """The start-up probe reads /proc/stat since the training modules loaded instead of
    sleeping: this process's own CPU time counts as idle, other processes' as busy; a sample
    too recent or too old is not used."""
    import os

    import imgcls.engine.threads as speed

    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    now = speed.time.monotonic()
    # 2 s on 2 cores = 4 s of core time: 1 s idle, 1 s ours (single-threaded start-up), 2 s another job's
    since = (0, 0, 10.0, now - 2.0)
    monkeypatch.setattr(speed, "_cpu_sample", lambda: (1 * tick, 4 * tick, 11.0, now))
    assert speed.idle_cores(since=since) == pytest.approx(1.0)  # 1 idle + 1 ours of 4 -> 2 x 0.5
    slept = []
    monkeypatch.setattr(speed.time, "sleep", slept.append)
    samples = iter([(0, 0, 0.0, now), (4 * tick, 4 * tick, 0.0, now)])
    monkeypatch.setattr(speed, "_cpu_sample", lambda: next(samples))
    assert speed.idle_cores(since=(0, 0, 0.0, now - 0.01)) == pytest.approx(2.0) and slept == [0.25]
    samples = iter([(0, 0, 0.0, now), (0, 4 * tick, 0.0, now)])
    assert speed.idle_cores(since=(0, 0, 0.0, now - 60)) == 0.0 and slept == [0.25, 0.25]


def test_adaptive_threads_only_after_long_epochs(monkeypatch):
    import imgcls.engine.threads as speed

    calls = []
    monkeypatch.setattr(speed, "configure_threads", lambda threads: calls.append(threads) or 1)
    cb = speed.AdaptiveThreads(min_epoch_s=10)
    state = TrainState(epochs=3, steps_per_epoch=1)
    state.metrics = {"epoch_time": 2.0}
    cb.on_epoch_end(state, None)
    state.epoch = 2
    cb.on_epoch_start(state)
    assert calls == []  # short epochs: no probe
    state.metrics = {"epoch_time": 30.0}
    cb.on_epoch_end(state, None)
    cb.on_epoch_start(state)
    assert calls == [None]


def test_device_batches_match_batches_with_shard_and_skip():
    from imgcls.data.loaders import Batches
    from imgcls.data.records import Split
    from imgcls.engine.device_data import DeviceBatches

    split = Split(labels=torch.arange(50) % 3, images=torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1))
    for shard in (None, (1, 2)):
        ref = Batches(split, 8, shuffle=True, seed=3, drop_last=True)
        dev = DeviceBatches(Batches(split, 8, shuffle=True, seed=3, drop_last=True), torch.device("cpu"))
        for b in (ref, dev):
            if shard:
                b.shard(*shard, even=True)
            b.set_epoch(2)
            b.skip = 1
        got, want = list(dev), list(ref)
        assert len(got) == len(want) > 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
        assert dev.skip == 0  # the offset applies once


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    from imgcls.data.loaders import Batches
    from imgcls.data.records import Split
    from imgcls.engine.device_data import DeviceBatches

    n = 40
    images = torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 1, 4)  # each row: 4 distinct values
    split = Split(labels=torch.arange(n), images=images)
    seen = {}
    for epoch in (1, 2, 3):
        b = Batches(split, 8, shuffle=True, seed=5)
        b.alternate_flips(seed=5)
        b.set_epoch(epoch)
        d = DeviceBatches(b, torch.device("cpu"))
        for (x, y), (xd, yd) in zip(b, d):
            assert torch.equal(x, xd) and torch.equal(y, yd)  # the GPU path flips the same images
            for img, i in zip(x, y.tolist()):
                flipped = torch.equal(img, images[i].flip(-1))
                assert flipped or torch.equal(img, images[i])
                seen[(epoch, i)] = flipped
    first = [seen[(1, i)] for i in range(n)]
    assert 10 <= sum(first) <= 30  # a random half in the first epoch
    assert all(seen[(2, i)] != first[i] and seen[(3, i)] == first[i] for i in range(n))  # then alternating


def test_fit_alternates_flips_for_in_memory_colour_data(colour_npz):
    clf = Classifier.create("reference_cnn", classes=[str(i) for i in range(4)], in_chans=3, img_size=16)
    summary = clf.fit(str(colour_npz), epochs=1, batch_size=16, progress=False, hflip=True)
    assert summary["augment"]["flip_order"] == "alternate"


def test_airbench_whitening_bias_trains_first_epochs_only(colour_npz):
    net = create_model("airbench", 4, in_chans=3, img_size=16)
    assert net.whiten_bias_epochs == 3
    for epoch, trains in ((1, True), (3, True), (4, False)):
        net.on_epoch_start(epoch)
        assert net.whiten.bias.requires_grad is trains
    # through the trainer: the bias moves in epoch 1 and stays put after epoch 1 when frozen after it
    torch.manual_seed(0)
    clf = Classifier.create("airbench", classes=[str(i) for i in range(4)], in_chans=3, img_size=16)
    clf.model.whiten_bias_epochs = 1
    snapshots = []

    class Snap(Callback):
        def on_epoch_end(self, state, model):
            snapshots.append(model.whiten.bias.detach().clone())

    clf.fit(str(colour_npz), epochs=3, batch_size=16, optimizer="sgd", lr=0.05, progress=False, callbacks=[Snap()])
    assert not torch.equal(snapshots[0], torch.zeros_like(snapshots[0]))
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])


def test_cpu_allocator_tuning(monkeypatch):
    import platform

    import imgcls.engine.threads as S

    monkeypatch.setattr(S, "_allocator_tuned", False)
    monkeypatch.setenv("IMGCLS_MALLOC_TUNING", "0")
    assert S.tune_cpu_allocator() is False  # opted out
    monkeypatch.delenv("IMGCLS_MALLOC_TUNING")
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert S.tune_cpu_allocator() is expected


def test_config_lr_auto_and_bool_flags():
    from imgcls.cli import build_parser
    from imgcls.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--lr", "auto", "--compile", "--recipe", "fast", "--ema", "0.99"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.compile, cfg.recipe, cfg.ema) == ("auto", True, "fast", 0.99)
    assert config_from_args(build_parser().parse_args(["train", "--lr", "0.01"])).lr == 0.01
    with pytest.raises(ImgclsError, match="--ema"):
        TrainConfig.from_dict({"ema": 1.5})


def test_lr_find_cli(tiny_npz, capsys):
    from imgcls.cli import main

    assert main(["lr-find", "--data", str(tiny_npz), "--batch-size", "16", "--steps", "30",
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "suggested learning rate" in out


def test_recipe_lr_follows_explicit_batch_size():
    ctx = RecipeContext(kind="small-colour", num_train=50000, in_memory=True, device_type="cpu")
    base = resolve_recipe(TrainConfig(data="x", recipe="fast"), ctx)
    small = resolve_recipe(TrainConfig(data="x", recipe="fast", batch_size=base.batch_size // 4), ctx)
    assert small.lr == pytest.approx(base.lr / 4)  # SGD: linear
    kept = resolve_recipe(TrainConfig(data="x", recipe="fast", batch_size=64, lr=0.1), ctx)
    assert kept.lr == 0.1  # an explicit rate is never changed


def test_cpu_inference_runs_large_images_in_chunks_and_keeps_their_order(monkeypatch):
    """Photos at 224 px go through the network 16 at a time on a CPU (every layer's output of a
    big batch is faulted in afresh there); small images and GPU batches stay whole; the
    chunked logits, features and cached activations are the whole batch's, in order."""
    from imgcls.engine import device as D
    from imgcls.engine.backends import TorchBackend
    from imgcls.engine.finetune import extract_features

    cpu = torch.device("cpu")
    assert [len(c) for c in D.inference_chunks(torch.zeros(40, 3, 224, 224), cpu)] == [16, 16, 8]
    assert len(D.inference_chunks(torch.zeros(40, 3, 224, 224), torch.device("cuda"))) == 1
    assert len(D.inference_chunks(torch.zeros(512, 3, 32, 32), cpu)) == 1  # CIFAR-size: one piece
    clf = Classifier.create("reference_cnn", num_classes=3, in_chans=1, img_size=16, seed=0)
    x = torch.from_numpy(pattern_images(4, size=16)[0][:, None])  # 12 images
    b = TorchBackend(clf.model, clf.preprocessing, "cpu", "fp32", "flip")
    whole, (wz, wf) = b.logits(x), b.outputs(x)
    fw, yw = extract_features(clf.model, [(x, torch.arange(12))], clf.preprocessing, cpu, None, flip=True)
    monkeypatch.setattr(D, "CPU_CHUNK_PIXELS", 5 * 16 * 16)  # chunks of 5 images: 5, 5, 2
    assert [len(c) for c in D.inference_chunks(x, cpu)] == [5, 5, 2]
    assert np.allclose(b.logits(x), whole, atol=1e-5)
    z, f = b.outputs(x)
    assert np.allclose(z, wz, atol=1e-5) and np.allclose(f, wf, atol=1e-5)
    fc, yc = extract_features(clf.model, [(x, torch.arange(12))], clf.preprocessing, cpu, None, flip=True)
    assert torch.equal(yc, yw) and torch.allclose(fc, fw, atol=1e-5)
