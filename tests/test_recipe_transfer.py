"""The auto recipe with pretrained weights: the cached-feature linear probe at an input size
chosen from the data, explained in one line and saved in config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from imgcls.config import TrainConfig
from imgcls.engine.recipes import RecipeContext, choose_recipe, resolve_recipe, transfer_side

ARCH = "mobilenetv3_small_050"  # a small timm model (its default pretrained input: 224 px)


def _ctx(side: int | None, fixed: bool = False, n: int = 245) -> RecipeContext:
    return RecipeContext("photos", n, False, "cpu", pretrained=True, image_side=side, pretrained_side=224,
                         fixed_side=fixed)


def test_input_side_follows_small_photos_and_keeps_the_pretrained_one_otherwise():
    assert transfer_side(_ctx(100)) == 160  # signdigits' 100 px photos: 1.6x, rounded up to 32 px
    assert transfer_side(_ctx(372)) == 224  # hymenoptera: the pretrained side, never upscaled
    assert transfer_side(_ctx(224)) == 224
    assert transfer_side(_ctx(20)) == 96  # never below 96 px
    assert transfer_side(_ctx(100, fixed=True)) == 224  # a ViT takes only its own side
    assert transfer_side(_ctx(None)) == 224  # sizes unreadable: the pretrained side


def test_auto_with_weights_is_the_cached_linear_probe():
    assert choose_recipe(_ctx(100)) == "transfer"
    cfg = resolve_recipe(TrainConfig(data="x", model=ARCH, weights="w.safetensors"), _ctx(100, n=1642))
    assert (cfg.recipe, cfg.freeze, cfg.feature_cache, cfg.epochs, cfg.img_size) == \
        ("transfer", "backbone", "auto", 20, 160)
    assert cfg.recipe_choice == ("recipe auto → linear probe on cached features (with mirror images), then the top "
                                 "blocks where they pay: 1,642 training images, pretrained backbone, 160 px input, "
                                 "photos ~100 px")
    assert cfg.finetune_top == "auto"
    # explicit flags still win
    assert resolve_recipe(TrainConfig(data="x", weights="w", img_size=224, epochs=5), _ctx(100)).img_size == 224


def test_asking_for_the_backbone_to_train_falls_back_to_full_fine_tuning():
    cfg = resolve_recipe(TrainConfig(data="x", weights="w", freeze="none"), _ctx(100))
    assert cfg.recipe == "default" and cfg.freeze == "none" and cfg.epochs == 3
    cfg = resolve_recipe(TrainConfig(data="x", weights="w", freeze="backbone", unfreeze_at=2), _ctx(100))
    assert cfg.recipe == "default" and cfg.unfreeze_at == 2
    # without pretrained weights nothing changes
    assert choose_recipe(RecipeContext("photos", 245, False, "cpu")) == "default"


def test_recipe_choice_is_not_a_flag():
    from imgcls.cli.train import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert "--recipe-choice" not in p.format_help()


def test_train_with_only_weights_runs_the_probe_and_records_the_choice(photo_folder: Path, tmp_path, capsys):
    import timm

    from imgcls import train

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(ARCH, pretrained=False).state_dict().items()}
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    result = train({"data": str(photo_folder), "model": ARCH, "weights": str(weights), "out": str(tmp_path),
                    "name": "run"})
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "recipe auto" in ln)
    assert "linear probe on cached features" in line and "pretrained backbone, 96 px input, photos ~20 px" in line
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "transfer" and saved["freeze"] == "backbone" and saved["img_size"] == 96
    assert saved["recipe_choice"] == line
    assert result.summary["finetune"]["feature_cache"] is True
    # the second stage ran on the probe's cached activations and said what it did
    top = result.summary["finetune"]["top_blocks"]
    assert top["blocks"].startswith("blocks.") and top["kept"] in (True, False)
    said = "top-block fine-tune: " + ("kept" if top["kept"] else "not kept")
    assert any(ln.startswith(said) for ln in err.splitlines())
    # kept: the run's history goes on with the stage's epochs (and the best epoch is one of them)
    assert result.summary["epochs_run"] == (20 + 4 if top["kept"] else 20)
    assert (result.summary["best_epoch"] > 20) == top["kept"]
    assert TrainConfig.from_yaml(result.run_dir / "config.yaml").recipe == "transfer"  # loads back


@pytest.mark.parametrize("flag", ["--freeze", "--img-size"])
def test_flags_the_recipe_sets_are_still_documented(flag):
    from imgcls.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    assert flag in sub.format_help()


def test_ema_and_patience_start_afresh_in_the_top_block_stage(photo_folder: Path, tmp_path, monkeypatch):
    """--ema with the transfer recipe: the probe's EMA (its head's live weights) and early-stopping
    counters were handed to the top-block stage, which loaded the head's weights into the top
    blocks and crashed (Missing key(s) "top.blocks...")."""
    import timm

    import imgcls.engine.finetune_top as FT
    from imgcls import train
    from imgcls.engine.averaging import EMA
    from imgcls.engine.callbacks import EarlyStopping

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(ARCH, pretrained=False).state_dict().items()}
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    import imgcls.engine.session as S

    seen: list[list] = []
    real_top, real_probe = FT.fit_top_cached, S.fit_head_cached

    def spy_top(*a, **k):
        seen.append(list(k["callbacks"]))
        return real_top(*a, **k)

    def spy_probe(*a, **k):
        seen.append(list(a[7]))  # the probe's callbacks
        return real_probe(*a, **k)

    monkeypatch.setattr(FT, "fit_top_cached", spy_top)
    monkeypatch.setattr(S, "fit_head_cached", spy_probe)
    result = train({"data": str(photo_folder), "model": ARCH, "weights": str(weights), "out": str(tmp_path),
                    "name": "run", "ema": 0.99, "patience": 3, "epochs": 3}, progress=False)
    assert len(seen) == 2, "the probe and the top-block stage ran"
    probe, stage = seen
    assert [type(c) for c in stage if isinstance(c, (EMA, EarlyStopping))] == [EMA, EarlyStopping]
    assert not {id(c) for c in probe} & {id(c) for c in stage if isinstance(c, (EMA, EarlyStopping))}
    assert result.summary["finetune"]["top_blocks"]["kept"] in (True, False)


def test_history_csv_holds_the_kept_top_block_stage(photo_folder: Path, tmp_path, monkeypatch):
    """metrics.json and the summary counted the stage's epochs; history.csv stopped at the probe's."""
    import csv

    import timm

    import imgcls.engine.finetune_top as FT
    from imgcls import train

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(ARCH, pretrained=False).state_dict().items()}
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    real = FT.fit_top_cached
    # a probe any stage beats (its accuracy is argument 6), so the stage is kept
    monkeypatch.setattr(FT, "fit_top_cached", lambda *a, **k: real(*a[:6], -1.0, *a[7:], **k))
    result = train({"data": str(photo_folder), "model": ARCH, "weights": str(weights), "out": str(tmp_path),
                    "name": "run", "epochs": 3}, progress=False)
    assert result.summary["finetune"]["top_blocks"]["kept"]
    with open(result.run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result.summary["epochs_run"] == 3 + 4
    assert [r["stage"] for r in rows] == ["probe"] * 3 + ["top_blocks"] * 4
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    assert result.summary["best_epoch"] in {int(r["epoch"]) for r in rows}
