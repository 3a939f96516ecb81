"""Export: ONNX / int8 ONNX / TorchScript files, their metadata, parity, and the backends
that run them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.cli import main
from tests.conftest import pattern_images, write_folder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported_run(trained_run: Path) -> Path:
    """The shared trained run, exported once to ONNX fp32 + int8 (through the CLI)."""
    assert main(["export", str(trained_run), "--format", "onnx", "--int8", "--calib-images", "64"]) == 0
    return trained_run


def _images(folder: Path, n: int = 6, seed: int = 3) -> tuple[Path, np.ndarray]:
    x, y = pattern_images(n // 3, size=16, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder, y


def test_onnx_metadata_dynamic_batch_and_parity(exported_run):
    from imgcls.api import Classifier

    path = exported_run / "model.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    card = json.loads((exported_run / "model.json").read_text())
    assert json.loads(props["classes"]) == ["a", "b", "c"]
    assert int(props["img_size"]) == 16 and int(props["in_chans"]) == 1
    assert json.loads(props["mean"]) == card["preprocessing"]["mean"]
    assert props["resize"] == "squash" and props["source_weights_sha256"] == card["weights_sha256"]
    side = json.loads((exported_run / "model.onnx.json").read_text())
    assert side["classes"] == ["a", "b", "c"] and side["parity"]["passed"]
    assert side["parity"]["top1_agreement"] >= 0.999 and side["parity"]["max_prob_diff"] < 1e-3
    assert json.loads(props["imgcls"])["parity"]["passed"]  # the result travels inside the file too

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    clf = Classifier.load(exported_run)
    x, _ = pattern_images(3, size=16, seed=7)  # 9 images
    xt = clf.preprocessing.normalize(__import__("torch").from_numpy(x)[:, None])
    for n in (1, 9):  # any batch size runs
        out = sess.run(None, {"input": xt[:n].numpy()})[0]
        ref = clf.model(xt[:n]).detach().numpy()
        assert out.shape == (n, 3) and np.allclose(out, ref, atol=1e-4)


def test_int8_export_reports_accuracy_change(exported_run):
    side = json.loads((exported_run / "model.int8.onnx.json").read_text())
    assert side["precision"] == "int8" and side["parity"]["passed"]
    assert side["parity"]["accuracy_change_points"] >= -1.0 and side["calibration_images"] == 64
    assert (exported_run / "model.int8.onnx").stat().st_size < (exported_run / "model.onnx").stat().st_size


def test_predict_backends_agree_and_auto_uses_onnx(exported_run, tmp_path, capsys):
    from imgcls.api import Classifier
    from imgcls.engine.backends import make_backend

    folder, y = _images(tmp_path / "imgs", 9)
    clf = Classifier.load(exported_run)
    assert make_backend(clf, "auto", device="cpu").name == "onnx"
    p_torch = clf.predict_proba(folder, backend="torch", precision="fp32")[0]
    p_onnx = clf.predict_proba(folder, backend="onnx")[0]
    p_int8 = clf.predict_proba(folder, backend="onnx-int8")[0]
    assert (p_torch.argmax(1) == p_onnx.argmax(1)).all() and np.abs(p_torch - p_onnx).max() < 1e-4
    assert (p_int8.argmax(1) == y).mean() >= 0.9

    out = tmp_path / "preds.csv"
    assert main(["predict", str(exported_run), str(folder), "--top-k", "2", "-o", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "source,label,probability,class_2,probability_2,ood_score" and len(rows) == 10
    assert [r.split(",")[1] for r in rows[1:]] == [clf.classes[i] for i in p_torch.argmax(1)]
    assert main(["predict", str(exported_run), str(folder), "--backend", "onnx", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc) == 9 and {"source", "label", "top"} <= set(doc[0])


def test_stale_export_is_not_used(exported_run, tmp_path):
    """auto falls back to torch (and --backend onnx refuses) when the weights changed."""
    import shutil

    from imgcls.api import Classifier
    from imgcls.errors import ImgclsError
    from imgcls.engine.backends import make_backend

    run = tmp_path / "copy"
    shutil.copytree(exported_run, run)
    clf = Classifier.load(run)
    clf.model.fc.bias.data += 1.0
    clf.save(run)  # new weights, new sha256: the old model.onnx no longer matches
    clf = Classifier.load(run)
    assert make_backend(clf, "auto", device="cpu").name == "torch"
    with pytest.raises(ImgclsError, match="no up-to-date model.onnx"):
        make_backend(clf, "onnx")


def test_export_is_stale_once_calibrate_changes_the_temperature(exported_run, tmp_path, capsys):
    """The export carries the temperature it was made with: after `imgcls calibrate` it no
    longer matches model.json, so auto uses torch, --backend onnx says why, calibrate says
    to re-export, and re-exporting makes it current again."""
    import shutil

    from imgcls.api import Classifier
    from imgcls.engine.backends import make_backend
    from imgcls.errors import ImgclsError

    run = tmp_path / "copy"
    shutil.copytree(exported_run, run)
    x, y = pattern_images(20, size=16, seed=5)
    np.savez(tmp_path / "cal.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["a", "b", "c"]))
    capsys.readouterr()
    assert main(["calibrate", str(run), "--data", str(tmp_path / "cal.npz"), "--split", "all"]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'model.onnx'} is stale (it carries temperature 1" in err and "model.int8.onnx is stale" in err
    clf = Classifier.load(run)
    assert abs(clf.temperature - 1.0) > 1e-3
    assert make_backend(clf, "auto", device="cpu").name == "torch"
    with pytest.raises(ImgclsError, match="no up-to-date model.onnx .*temperature"):
        make_backend(clf, "onnx")
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert make_backend(Classifier.load(run), "auto", device="cpu").name == "onnx"


def test_export_is_stale_once_multi_label_thresholds_change(tmp_path):
    """A multi-label export carries its per-class thresholds: new ones (`imgcls thresholds`)
    make it stale, as a new temperature does."""
    from imgcls.api import Classifier
    from imgcls.artifact import write_sidecar
    from imgcls.engine.backends import export_problem
    from imgcls.export.metadata import export_metadata

    clf = Classifier.create("reference_cnn", classes=["a", "b"], in_chans=1, img_size=16, seed=0)
    clf.card.update(task="multi", thresholds={"values": {"a": 0.3, "b": 0.6}})
    path = tmp_path / "model.onnx"
    write_sidecar(path, {**export_metadata(clf, "onnx", "fp32"), "parity": {"passed": True}})
    assert export_problem(clf, path) is None
    clf.card["thresholds"] = {"values": {"a": 0.3, "b": 0.7}}
    assert "thresholds" in export_problem(clf, path)
    clf.card["thresholds"] = {"values": {"a": 0.3, "b": 0.6}}
    clf.temperature = 0.5
    assert "temperature" in export_problem(clf, path)


def test_torchscript_export(trained_run, tmp_path):
    from imgcls.export.torchscript import read_metadata

    out = tmp_path / "ts"
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(out)]) == 0
    meta = read_metadata(out / "model.torchscript.pt")
    assert meta["classes"] == ["a", "b", "c"] and meta["format"] == "torchscript"
    assert json.loads((out / "model.torchscript.pt.json").read_text())["parity"]["passed"]


def test_int8_refused_when_accuracy_drops(trained_run, tmp_path, capsys):
    """Calibrating on black images (bad calibration data) saturates int8 activations on
    real ones; the export must refuse and keep no int8 file."""
    data = tmp_path / "data"
    x, y = pattern_images(6, size=16, seed=2)
    for i, (img, label) in enumerate(zip(x, y)):
        c = "abc"[label]
        for split in ("train", "val"):
            (data / split / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / "val" / c / f"{i}.png")
        Image.new("L", (16, 16), 0).save(data / "train" / c / f"{i}.png")
    out = tmp_path / "out"
    code = main(["export", str(trained_run), "--int8", "--data", str(data), "--out", str(out), "--max-drop", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "int8 loses" in err and "--max-drop" in err and "Traceback" not in err
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("mobilenetv3_small_050", marks=pytest.mark.slow),
                                  pytest.param("tf_efficientnet_lite0", marks=pytest.mark.slow)])
def test_timm_cnn_exports_with_parity(arch, tmp_path):
    from imgcls.api import Classifier
    from imgcls.export import export_run

    folder = write_folder(tmp_path / "photos", n_per_class=4, size=24)
    clf = Classifier.create(arch, classes=["cat", "dog", "fox"], in_chans=3, img_size=32, seed=0)
    clf.model.eval()
    clf.save(tmp_path / "run")
    clf = Classifier.load(tmp_path / "run")
    results = export_run(clf, "onnx", data=str(folder), log=lambda m: None)
    report = results[0].meta["parity"]
    assert report["passed"] and report["top1_agreement"] >= 0.999 and report["images"] > 0


def test_export_errors_are_one_line(trained_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    from imgcls.api import Classifier

    clf = Classifier.load(trained_run)
    clf.card.pop("training", None)
    clf.save(bare)  # no config.yaml, no training record: nothing says where the data is
    assert main(["export", str(bare)]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and err.count("\n") == 1
    assert main(["export", str(trained_run), "--format", "torchscript", "--int8"]) == 1
    assert "--int8 is for --format onnx" in capsys.readouterr().err


def test_any_module_exports(tiny_npz, tmp_path):
    """A plain nn.Sequential (what a layer-list builder produces) exports like the rest:
    export needs nothing but (N, C, S, S) -> (N, K)."""
    import torch
    from torch import nn

    from imgcls.api import Classifier
    from imgcls.data.transforms import Preprocessing
    from imgcls.export import export_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    pre = Preprocessing(img_size=16, in_chans=1, mean=(0.3,), std=(0.3,))
    clf = Classifier(model, architecture="layers", classes=["a", "b", "c"], preprocessing=pre)
    [res] = export_run(clf, "onnx", out=tmp_path, data=str(tiny_npz), log=lambda m: None)
    assert res.meta["parity"]["passed"] and res.meta["architecture"] == "layers"
    assert json.loads(onnx_meta(res.path)["classes"]) == ["a", "b", "c"]


def onnx_meta(path: Path) -> dict[str, str]:
    from imgcls.export.onnx import read_metadata

    return read_metadata(path)


def test_layer_list_cnn_exports(tiny_npz, tmp_path):
    """The layer-list builder's network (models/layers.py), as a YAML config would give it."""
    from imgcls.api import Classifier
    from imgcls.export import export_run

    layers = [{"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}}, {"batchnorm": {}},
              {"maxpool": 2}, {"conv": {"filters": 16, "kernel": 3, "activation": "relu"}},
              "global_avg_pool", {"dense": {"units": "num_classes"}}]
    clf = Classifier.create("layers", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0, layers=layers)
    clf.model.eval()
    [res] = export_run(clf, "onnx", out=tmp_path, data=str(tiny_npz), log=lambda m: None)
    assert res.meta["parity"]["passed"] and res.meta["architecture"] == "layers"
