"""CUDA code paths (marked ``cuda``; skipped without a GPU). ``bench/gpu_check.sh`` runs
them on a CUDA machine: training with bf16 autocast and pinned batches, fused Adam, the
predictor on the device, and the recipe's GPU batch. The training check also runs on the
CPU (unmarked), so its own logic is tested everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import pattern_images
from imgcls import Classifier, train
from imgcls.engine.recipes import RECIPES, RecipeContext

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def colour_npz(tmp_path):
    x, y = pattern_images(40, size=16, channels=3)
    xt, yt = pattern_images(10, size=16, channels=3, seed=1)
    path = tmp_path / "colour.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def _train_and_reload(data, out, device: str) -> None:
    res = train({"data": str(data), "model": "reference_cnn", "epochs": 4, "batch_size": 16, "device": device,
                 "out": str(out), "name": device}, progress=False)
    s = res.summary
    assert s["device"].startswith(device)
    assert s["best"]["val_acc"] > 0.6  # 3 classes of bars: chance is 0.33
    assert all(p.device.type == "cpu" for p in res.classifier.model.parameters())  # saved from the CPU
    m = Classifier.load(res.run_dir).evaluate(str(data), device=device)
    assert m["accuracy"] == pytest.approx(res.metrics["accuracy"], abs=0.02)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda), "cpu"])
def test_training_learns_and_saves_cpu_weights(colour_npz, tmp_path, device):
    _train_and_reload(colour_npz, tmp_path, device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adam_and_bf16_on_cuda():
    from imgcls.engine.device import resolve_precision
    from imgcls.engine.optim import build_optimizer

    model = torch.nn.Linear(4, 2).cuda()
    opt = build_optimizer(model, "adam", 1e-3)
    assert opt.defaults.get("fused") is True
    model(torch.randn(3, 4, device="cuda")).sum().backward()
    opt.step()
    assert resolve_precision("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)


def test_gpu_recipe_uses_the_large_batch():
    fast = RECIPES.get("fast")(RecipeContext("small-colour", 50000, True, "cuda"))
    assert fast["batch_size"] == 1024 and fast["epochs"] == 10
