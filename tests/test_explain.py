"""Explanations: every registered method on a trained CNN, target layers, faithfulness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import Classifier, ImgclsError
from imgcls.data.sources import load_data
from imgcls.explain import EXPLAINERS, explain

FAST_OPTS = {"lime": {"samples": 120}, "shap": {"samples": 200}, "ig": {"steps": 16}}


@pytest.fixture(scope="module")
def clf(digits_run):
    return Classifier.load(digits_run)


@pytest.fixture(scope="module")
def digits_test():
    data = load_data("digits")
    return data.test.images.numpy(), data.test.labels.numpy()


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "shap" else m
                                    for m in EXPLAINERS.names()])
def test_every_explainer_shapes_and_values(clf, digits_test, method):
    # a non-square picture larger than the model's 28x28 input: the heatmap must have its size
    img = Image.fromarray(digits_test[0][3, 0]).resize((40, 34))
    [e] = explain(clf, [img], method=method, **FAST_OPTS.get(method, {}))
    assert e.attribution.shape == (34, 40)
    assert e.input_attribution.shape == (28, 28)
    assert np.isfinite(e.attribution).all() and np.abs(e.attribution).max() > 0
    assert e.overlay.size == (40, 34) and e.overlay.mode == "RGB"
    assert e.method == method and e.target == e.top[0][0]
    assert abs(sum(p for _, p in e.top) - 1) < 0.5 and len(e.top) == 3
    assert e.evaluations >= 1
    if method in ("lime", "shap"):  # model-agnostic: the sample count is the cost
        assert e.evaluations >= FAST_OPTS[method]["samples"] * 0.9
    f = e.faithfulness
    for k in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
        assert 0.0 <= f[k] <= 1.0
    assert len(f["deletion_curve"]) == f["steps"] + 1
    assert f["deletion_curve"][-1] == pytest.approx(f["insertion_curve"][0], abs=1e-4)  # both: all-mean image


def test_cli_methods_match_registry():
    from imgcls.cli.explain import METHODS

    assert sorted(METHODS) == EXPLAINERS.names()


def _mean_faithfulness(clf, x, y, per_class, methods):
    pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(clf.classes))])
    results = {}
    for method in methods:
        f = [e.faithfulness for e in explain(clf, x[pick], method=method, **FAST_OPTS.get(method, {}))]
        results[method] = {k: float(np.mean([r[k] for r in f])) for k in
                           ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")}
    return results


def _assert_beats_random(results, margin):
    for method, r in results.items():
        assert r["deletion_auc"] < r["random_deletion_auc"] - margin, (method, r)
        assert r["insertion_auc"] > r["random_insertion_auc"] + (margin if method != "gradcam" else 0), (method, r)


def test_faithfulness_beats_random_on_trained_network(clf, digits_test):
    """Grad-CAM, IG and occlusion rank pixels better than random orders, on average:
    deleting their top pixels first kills the class probability faster than random, and
    inserting them first restores it faster. (Grad-CAM's 11x11 map is coarse for 28x28
    digits: its insertion margin is the smallest, ~0.04 here, so it gets no extra margin.)"""
    x, y = digits_test
    _assert_beats_random(_mean_faithfulness(clf, x, y, 3, ("gradcam", "ig", "occlusion")), margin=0.05)


@pytest.mark.slow
def test_faithfulness_on_mnist_reference_network(shared_data, tmp_path):
    """The issue's check on real MNIST: the reference CNN after 1 epoch on 5,000 images."""
    from imgcls import train

    d = np.load(shared_data / "mnist.npz")
    npz = tmp_path / "mnist5k.npz"
    np.savez(npz, x_train=d["x_train"][:5000], y_train=d["y_train"][:5000], x_test=d["x_test"][:300],
             y_test=d["y_test"][:300])
    result = train({"data": str(npz), "epochs": 1, "batch_size": 64, "out": str(tmp_path), "name": "m", "seed": 0},
                   progress=False)
    assert result.metrics["accuracy"] > 0.85
    data = load_data(str(npz))
    x, y = data.test.images.numpy(), data.test.labels.numpy()
    _assert_beats_random(_mean_faithfulness(result.classifier, x, y, 2, ("gradcam", "ig", "occlusion")), margin=0.1)


def test_faithfulness_detects_a_bad_explanation(clf, digits_test):
    """The score can fail: the inverted IG map (least important first) is worse than random."""
    from imgcls.explain.base import CountingModel, ExplainContext
    from imgcls.explain.faithfulness import deletion_insertion

    x, _ = digits_test
    exps = explain(clf, x[:10], method="ig", faithfulness=False, steps=16)
    ctx = ExplainContext(CountingModel(clf.model), clf.preprocessing, torch.device("cpu"), clf.classes)
    worse = 0
    for img, e in zip(x[:10], exps):
        inp = ctx.normalize(torch.from_numpy(img[None]).float() / 255)
        f = deletion_insertion(ctx, inp, -e.input_attribution, e.target_index)
        worse += f["deletion_auc"] > f["random_deletion_auc"]
    assert worse >= 8


def test_target_and_options(clf, digits_test):
    img = digits_test[0][0]
    [e] = explain(clf, img[0], method="gradcam", target="3", faithfulness=False)
    assert e.target == "3" and e.faithfulness == {}
    [e] = explain(clf, img[0], method="gradcam", target=5, faithfulness=False)
    assert e.target == "5"
    with pytest.raises(ImgclsError, match="unknown target class 'three'"):
        explain(clf, img[0], target="three")
    with pytest.raises(ImgclsError, match="did you mean 'gradcam'"):
        explain(clf, img[0], method="gradcan")
    with pytest.raises(ImgclsError, match="has no option 'sample'.*samples"):
        explain(clf, img[0], method="lime", sample=10)


def test_layer_choice_and_override(clf, digits_test):
    img = digits_test[0][0][0]
    [auto] = explain(clf, img, faithfulness=False)
    # the last conv's map, before the final max-pool and the ReLU after it (pool -> ReLU)
    assert auto.layer == "features.3" and auto.attribution.shape == (28, 28)
    [e] = explain(clf, img, layer="features.1", faithfulness=False)
    assert e.layer == "features.1" and e.attribution.shape == (28, 28)
    with pytest.raises(ImgclsError, match="no layer 'features.9'"):
        explain(clf, img, layer="features.9")
    with pytest.raises(ImgclsError, match="does not output a feature map"):
        explain(clf, img, layer="fc")


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("vit_tiny_patch16_224", "blocks.11.norm1")])
def test_timm_target_layers(arch, layer):
    """timm CNNs: the last stage; ViTs: the last block's norm, tokens reshaped to the patch grid."""
    clf = Classifier.create(arch, num_classes=3, in_chans=3, img_size=64, seed=0)
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    for method in ("gradcam", "gradcam++"):
        [e] = explain(clf, img, method=method, faithfulness=False)
        assert e.layer == layer
        assert e.attribution.shape == (64, 64) and np.isfinite(e.attribution).all()


def test_explanation_files_and_cli(digits_run, digits_test, tmp_path, capsys):
    from imgcls.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    x, _ = digits_test
    for i in range(2):
        Image.fromarray(x[i, 0]).resize((56, 48)).save(folder / f"d{i}.png")
    out = tmp_path / "out"
    assert main(["explain", str(digits_run), str(folder), "--method", "occlusion", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "deletion AUC" in text and "model evaluations" in text
    for i in range(2):
        png, npy = out / f"d{i}.occlusion.png", out / f"d{i}.occlusion.npy"
        assert Image.open(png).size[0] > 500
        a = np.load(npy)
        assert a.shape == (48, 56) and np.isfinite(a).all()
    assert main(["explain", str(digits_run), str(folder / "d0.png"), "--target", "nine"]) == 1
    assert "unknown target class 'nine'" in capsys.readouterr().err


def test_cli_option_errors(digits_run, tmp_path, capsys):
    from imgcls.cli import main

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    assert main(["explain", str(digits_run), str(img), "--samples", "50"]) == 1
    assert "--samples applies to lime and shap" in capsys.readouterr().err
    assert main(["explain", str(digits_run), str(tmp_path / "missing.png")]) == 1
    assert "image not found" in capsys.readouterr().err
    assert main(["explain", str(digits_run), str(img), "--layer", "feature.4"]) == 1
    assert "did you mean 'features.4'" in capsys.readouterr().err


def test_dollar_signs_in_names_are_text_not_mathtext(digits_run, digits_test, tmp_path, capsys):
    """'$' in a file or class name used to switch matplotlib to mathtext: 'price_$5_$10.png'
    crashed the figure (ParseSyntaxException), 'cost $5 or $6' was mangled."""
    from types import SimpleNamespace

    from imgcls.cli import main
    from imgcls.explain.render import figure

    folder = tmp_path / "dollar"
    folder.mkdir()
    Image.fromarray(digits_test[0][0, 0]).save(folder / "price_$5_$10.png")
    out = tmp_path / "out"
    assert main(["explain", str(digits_run), str(folder / "price_$5_$10.png"), "--method", "occlusion",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "price_$5_$10.occlusion.png").is_file()
    img = Image.new("RGB", (8, 8))
    e = SimpleNamespace(image=img, overlay=img, source="cost $5 or $6.png", method="gradcam", target="$5_$10",
                        top=[("$5_$10", 0.9), ("a $x^$", 0.1)], faithfulness={}, evaluations=1, seconds=0.1, layer="")
    assert figure(e).size[0] > 500
