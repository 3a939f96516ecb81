"""The transfer recipe's second stage: the top blocks fine-tuned on cached activations
(engine/finetune_top.py)."""

import pytest
import timm
import torch

from imgcls.config import TrainConfig
from imgcls.engine.finetune_top import split_top
from imgcls.engine.recipes import RecipeContext, resolve_recipe


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_small_050", "resnet18"])
def test_the_cut_computes_what_the_whole_network_does(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3).eval()
    split = split_top(model, n_blocks=2)
    assert split is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        h = split.bottom(x)
        assert torch.allclose(split.top(h), whole, atol=1e-5)
        assert torch.allclose(split.top(h, pre_logits=True),
                              model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)
    top_ids = {id(p) for p in split.top.parameters()}
    assert {id(p) for p in model.get_classifier().parameters()} <= top_ids
    assert len(top_ids) < len(list(model.parameters()))  # the bottom stays out of the optimizer


def test_unknown_families_have_no_cut():
    assert split_top(timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)) is None


def test_the_transfer_recipe_asks_for_the_stage_and_says_so():
    ctx = RecipeContext(kind="photos", num_train=245, in_memory=False, device_type="cpu", pretrained=True,
                        image_side=372)
    cfg = resolve_recipe(TrainConfig(model="tf_efficientnet_lite0", recipe="auto", pretrained=True), ctx)
    assert cfg.finetune_top == "auto" and "then the top blocks where they pay" in cfg.recipe_choice
    off = resolve_recipe(TrainConfig(model="tf_efficientnet_lite0", recipe="auto", pretrained=True,
                                     finetune_top="off"), ctx)
    assert off.finetune_top == "off" and "top blocks" not in off.recipe_choice


def _stage_inputs(n=48, seed=0):
    from imgcls.engine.trainer import FitSettings

    torch.manual_seed(seed)
    model = timm.create_model("mobilenetv3_small_050", num_classes=2).eval()
    split = split_top(model, n_blocks=1)
    x = torch.randn(n, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable rule
    with torch.no_grad():
        h = split.bottom(x).half()
    settings = FitSettings(epochs=1, lr=1e-3, optimizer="adam", seed=seed)
    return model, split, (h[:32], y[:32]), (h[32:], y[32:]), settings


def _top_weights(split):
    return {k: v.clone() for k, v in split.top.state_dict().items()}


def test_the_stage_is_kept_only_where_it_beats_the_probe():
    from imgcls.engine.finetune_top import fit_top_cached

    model, split, tr, va, settings = _stage_inputs()
    before = _top_weights(split)
    top_ids = {id(q) for q in split.top.parameters()}
    bottom_before = [p.detach().clone() for p in model.parameters() if id(p) not in top_ids]
    # a probe that was already better than anything the stage reaches: the probe's weights come back
    res = fit_top_cached(split, tr, va, settings, torch.device("cpu"), None, probe_val_acc=0.99, epochs=2)
    assert not res.kept and res.why.startswith("not kept") and res.val_acc is not None and res.val_acc <= 0.99
    after = _top_weights(split)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a probe it beats: the fine-tuned weights stay, with the stage's history
    res = fit_top_cached(split, tr, va, settings, torch.device("cpu"), None, probe_val_acc=0.0, epochs=2)
    assert res.kept and res.val_acc > 0 and len(res.state.history) == 2
    after = _top_weights(split)
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    # BatchNorm in the top kept its pretrained statistics
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)
    # the bottom never trains
    top_ids = {id(q) for q in split.top.parameters()}
    bottom = [p for p in model.parameters() if id(p) not in top_ids]
    assert bottom and all(torch.equal(p, q) for p, q in zip(bottom, bottom_before))


def test_a_probe_that_leaves_nothing_to_gain_skips_the_stage():
    from imgcls.engine.finetune_top import fit_top_cached

    _, split, tr, va, settings = _stage_inputs()
    res = fit_top_cached(split, tr, va, settings, torch.device("cpu"), None, probe_val_acc=1.0)
    assert not res.kept and res.state is None and "already reaches 100.0%" in res.why


def test_plan_says_why_the_stage_does_not_run():
    from imgcls.data.transforms import Preprocessing
    from imgcls.engine.finetune_top import plan_top_stage

    pre = Preprocessing(img_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = timm.create_model("mobilenetv3_small_050", num_classes=2)
    cpu = torch.device("cpu")
    assert plan_top_stage(model, pre, cpu, None, 100, False, False)[1] == "no validation split to tell whether it pays"
    assert "multi-label" in plan_top_stage(model, pre, cpu, None, 100, True, True)[1]
    assert "50,000 training images" in plan_top_stage(model, pre, cpu, None, 50_000, True, False)[1]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32)
    assert "not available for VisionTransformer" in plan_top_stage(vit, pre, cpu, None, 100, True, False)[1]
    split, why = plan_top_stage(model, pre, cpu, None, 100, True, False)
    assert split is not None and why == ""
