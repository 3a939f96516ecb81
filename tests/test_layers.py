"""Custom CNNs from a layer list, and the model summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from imgcls import Classifier, train
from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.models import count_params, create_model, model_from_config
from imgcls.models.layers import LayerListNet
from imgcls.models.summary import summarize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reference_cnn.yaml"


def _leaf_types(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


def test_example_yaml_builds_the_reference_network():
    cfg = yaml.safe_load(EXAMPLE.read_text())
    arch, kwargs = model_from_config(cfg["model"])
    net = create_model(arch, num_classes=10, in_chans=1, img_size=28, **kwargs)
    ref = create_model("reference_cnn", num_classes=10, in_chans=1, img_size=28)
    assert count_params(net) == count_params(ref) == 121_930
    # the same layers; the built-in pools before each ReLU (the same function, faster), the
    # layer list keeps the order written in the YAML
    assert sorted(_leaf_types(net)) == sorted(_leaf_types(ref))
    # same shapes in the same order: the reference weights load into the layer-list network
    ref_shapes = [tuple(p.shape) for p in ref.parameters()]
    assert [tuple(p.shape) for p in net.parameters()] == ref_shapes
    with torch.no_grad():
        for p_net, p_ref in zip(net.parameters(), ref.parameters()):
            p_net.copy_(p_ref)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(net.eval()(x), ref.eval()(x), atol=1e-6)


def test_all_layer_kinds_and_shape_inference():
    layers = [{"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}}, "batchnorm",
              {"conv": {"filters": 16, "kernel": 3, "stride": 2, "padding": 1}}, "gelu", {"avgpool": 2},
              {"maxpool": {"size": 3, "stride": 1, "padding": 1}}, {"dropout": 0.1}, "global_avg_pool",
              {"dense": {"units": 32, "activation": "silu"}}, "batchnorm",
              {"dense": {"units": "num_classes", "activation": "softmax"}}]
    net = LayerListNet(layers, num_classes=5, in_chans=3, img_size=32)
    assert net.shapes[0] == (8, 32, 32) and net.shapes[2] == (16, 16, 16) and net.shapes[4] == (16, 8, 8)
    assert net.shapes[5] == (16, 8, 8) and net.shapes[7] == (16,) and net.shapes[-1] == (5,)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert net.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 8, 8)
    assert net.num_features == 32
    net.reset_classifier(7)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("layers, img, match", [
    ([{"conv": {"filters": 8, "kernel": 5}}, {"maxpool": 2}, {"conv": {"filters": 8, "kernel": 5}}, "flatten",
      {"dense": "num_classes"}], 12, r"layers\[2\] \(conv\): kernel 5x5 is larger than its input \(8, 4, 4\)"),
    ([{"conv": {"filters": 4}}, {"dense": "num_classes"}], 16, r"layers\[1\] \(dense\): its input \(4, 14, 14\)"),
    ([{"conv": {"filters": 4}}, "flatten", {"maxpool": 2}, {"dense": "num_classes"}], 16,
     r"layers\[2\] \(maxpool\) needs an image-shaped input"),
    ([{"conv": {"filters": 4}}, "flatten", {"dense": 10}], 16, r"last layer has 10 units but the data has 3"),
    ([{"cnov": {"filters": 4}}, "flatten", {"dense": "num_classes"}], 16, r"unknown layer type 'cnov'.*'conv'"),
    ([{"conv": {"filter": 4}}, "flatten", {"dense": "num_classes"}], 16, r"unknown option 'filter'.*'filters'"),
    ([{"conv": {"filters": 4}}, "flatten"], 16, r"last layer \(layers\[1\]\) must be dense"),
    ([{"conv": {"filters": 4, "activation": "relu6x"}}, "flatten", {"dense": "num_classes"}], 16,
     r"unknown activation 'relu6x'"),
    ([{"maxpool": 4}, {"maxpool": 4}, "flatten", {"dense": "num_classes"}], 8,
     r"layers\[1\] \(maxpool\): pool size 4 is larger than its input \(3, 2, 2\)"),
])
def test_impossible_layer_lists_are_refused_with_index_and_shapes(layers, img, match):
    with pytest.raises(ImgclsError, match=match) as err:
        LayerListNet(layers, num_classes=3, in_chans=3, img_size=img)
    assert "\n" not in str(err.value)


def test_layer_list_trains_and_reloads(tiny_npz, tmp_path):
    layers = [{"conv": {"filters": 8, "kernel": 3, "activation": "relu"}}, {"maxpool": 2}, "flatten",
              {"dense": {"units": 16, "activation": "relu"}}, {"dense": {"units": "num_classes"}}]
    result = train({"data": str(tiny_npz), "model": {"layers": layers}, "epochs": 2, "batch_size": 16,
                    "out": str(tmp_path)}, progress=False)
    card = json.loads((result.run_dir / "model.json").read_text())
    assert card["architecture"] == "layers" and card["model_kwargs"]["layers"] == layers
    loaded = Classifier.load(result.run_dir)
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8).numpy()
    p1, _ = result.classifier.predict_proba(x)
    p2, _ = loaded.predict_proba(x)
    assert p1 == pytest.approx(p2, abs=1e-6)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["model"] == {"layers": layers}


def test_bad_layer_list_stops_train_before_training(tiny_npz, tmp_path):
    with pytest.raises(ImgclsError, match=r"layers\[0\] \(conv\): kernel 20x20"):
        train({"data": str(tiny_npz), "model": {"layers": [{"conv": {"filters": 4, "kernel": 20}}, "flatten",
                                                           {"dense": "num_classes"}]},
               "out": str(tmp_path / "runs")}, progress=False)
    assert not (tmp_path / "runs").exists()  # no run folder for a refused model


def test_model_mapping_with_name_and_options():
    assert model_from_config({"name": "resnet18", "drop_rate": 0.2}) == ("resnet18", {"drop_rate": 0.2})
    with pytest.raises(ImgclsError, match="needs 'layers' or 'name'"):
        model_from_config({"layer": []})


# ---------------------------------------------------------------------- summary
def test_summary_reference_numbers():
    s = summarize(create_model("reference_cnn", 10, 1, 28), (1, 28, 28), depth=2)
    assert s["params"] == 121_930 and s["output_shape"] == [10]
    # conv1: 26*26*32*9 MACs, conv2: 11*11*64*288, dense: 1600*64 + 64*10 -> x2 FLOPs
    macs = 26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 64 + 64 * 10
    assert s["flops_per_image"] == 2 * macs
    rows = {r["name"]: r for r in s["layers"]}
    assert rows["features"]["output_shape"] == [64, 5, 5] and rows["fc"]["params"] == 650


def test_summary_cli_on_config_model_and_run(capsys, trained_run):
    assert main(["summary", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "121,930" in out and "(64, 5, 5)" in out and "FLOPs per image: 5.06 M" in out
    assert main(["summary", "resnet18", "--img-size", "64", "--json", "--depth", "1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["input_shape"] == [3, 64, 64] and s["output_shape"] == [1000] and s["params"] == 11_689_512
    assert [r["name"] for r in s["layers"]][:2] == ["conv1", "bn1"]
    assert main(["summary", str(trained_run)]) == 0
    assert "3 classes" in capsys.readouterr().out
    assert main(["summary", "resnet_18"]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_models_cli_lists_pretrained_architectures(capsys):
    assert main(["models", "lite0", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and "imgcls built-in" not in out
    assert main(["models", "layers"]) == 0
    assert "layers" in capsys.readouterr().out.splitlines()[0]
