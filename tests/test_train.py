import csv
import json

import numpy as np
import pytest
import yaml

from imgcls import Classifier, ImgclsError, TrainConfig, train
from tests.conftest import pattern_images


def test_fit_learns_tiny_data(tiny_npz):
    clf = Classifier.create("reference_cnn", num_classes=3, classes=["a", "b", "c"], in_chans=1, img_size=16)
    summary = clf.fit(tiny_npz, epochs=5, batch_size=16, lr=3e-3, progress=False)
    hist = clf.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.7
    assert summary["best"]["val_acc"] >= 0.9
    m = clf.evaluate(tiny_npz)
    assert m["split"] == "test" and m["accuracy"] >= 0.9
    assert np.array(m["confusion_matrix"]).sum() == 30


def test_fit_rejects_mismatched_classes(tiny_npz):
    clf = Classifier.create("reference_cnn", num_classes=4, in_chans=1, img_size=16)
    with pytest.raises(ImgclsError, match="classes"):
        clf.fit(tiny_npz, epochs=1, progress=False)


def test_same_seed_same_history(tiny_npz):
    runs = []
    for _ in range(2):
        clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=7)
        clf.fit(tiny_npz, epochs=2, batch_size=16, seed=7, precision="fp32", progress=False)
        runs.append([(h["train_loss"], h["val_acc"]) for h in clf.history])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("schedule,optimizer", [("cosine", "sgd"), ("constant", "adamw")])
def test_schedules_and_optimizers_train(tiny_npz, schedule, optimizer):
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16)
    clf.fit(tiny_npz, epochs=4, batch_size=16, lr=0.05 if optimizer == "sgd" else 3e-3, optimizer=optimizer,
            schedule=schedule, label_smoothing=0.1, progress=False)
    assert clf.history[-1]["train_loss"] < clf.history[0]["train_loss"]


def test_early_stopping(tiny_npz):
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16)
    summary = clf.fit(tiny_npz, epochs=30, batch_size=16, lr=1e-7, schedule="constant", patience=2, progress=False)
    assert summary["epochs_run"] < 30 and "early stopping" in summary["stopped_early"]


def test_photo_folder_trains_with_timm_model(photo_folder, tmp_path):
    result = train({"data": str(photo_folder), "model": "resnet18", "img_size": 32, "epochs": 2,
                    "batch_size": 8, "workers": 0, "out": str(tmp_path / "runs")}, progress=False)
    card = json.loads((result.run_dir / "model.json").read_text())
    assert card["preprocessing"]["resize"] == "shorter_side" and card["in_chans"] == 3
    assert card["classes"] == ["cat", "dog", "fox"]
    assert result.metrics["split"] == "val"


def test_run_folder_contents(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"model.safetensors", "model.json", "config.yaml", "metrics.json", "history.csv"} <= files
    card = json.loads((trained_run / "model.json").read_text())
    for key in ("architecture", "num_classes", "classes", "in_chans", "img_size", "preprocessing",
                "versions", "metrics", "weights_sha256", "training"):
        assert key in card, key
    assert card["metrics"]["test"]["accuracy"] > 0.8
    rows = list(csv.DictReader(open(trained_run / "history.csv")))
    assert len(rows) == 4 and {"epoch", "train_loss", "val_acc"} <= set(rows[0])
    cfg = TrainConfig.from_yaml(trained_run / "config.yaml")  # the resolved config loads back
    assert cfg.img_size == 16 and cfg.in_chans == 1 and cfg.epochs == 4


def test_save_load_round_trip_predictions_equal(trained_run, tmp_path):
    clf = Classifier.load(trained_run)
    x, _ = pattern_images(5, size=16, seed=9)
    p1, _ = clf.predict_proba(x, precision="fp32")
    clf.save(tmp_path / "copy")
    p2, _ = Classifier.load(tmp_path / "copy").predict_proba(x, precision="fp32")
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (15, 3) and np.allclose(p1.sum(1), 1, atol=1e-5)


def test_predict_inputs(trained_run, tmp_path):
    from PIL import Image

    clf = Classifier.load(trained_run)
    x, y = pattern_images(3, size=16, seed=4)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    preds = clf.predict(tmp_path, top_k=2)
    assert len(preds) == 9 and len(preds[0].top) == 2
    acc = np.mean([p.label == "abc"[y[int(p.source.split('/')[-1][:-4])]] for p in preds])
    assert acc >= 0.8
    assert clf.predict(Image.fromarray(x[0]))[0].label == clf.predict(tmp_path / "0.png")[0].label
    with pytest.raises(ImgclsError, match="5 channels"):
        clf.predict(np.zeros((2, 16, 16, 5), np.uint8))


def test_load_errors(tmp_path, trained_run):
    with pytest.raises(ImgclsError, match="not found"):
        Classifier.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclsError, match="no trained model"):
        Classifier.load(tmp_path / "empty")
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ImgclsError, match="sha256"):
        Classifier.load(bad)


def test_config_rejects_unknown_keys_with_hint(tmp_path):
    with pytest.raises(ImgclsError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"epochs": 0}))
    with pytest.raises(ImgclsError, match="epochs"):
        TrainConfig.from_yaml(p)
    p.write_text("epochs: [")
    with pytest.raises(ImgclsError, match="not valid YAML"):
        TrainConfig.from_yaml(p)


def test_corrupt_image_in_folder_is_skipped_and_reported_or_strict_error(photo_folder, tmp_path, capsys):
    (photo_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = {"data": str(photo_folder), "img_size": 16, "epochs": 1, "workers": 0, "out": str(tmp_path / "r")}
    result = train(cfg, progress=False)
    csv_path = result.run_dir / "skipped.csv"
    assert f"skipped 1 of 37 files: 1 truncated or corrupt (see {csv_path})" in capsys.readouterr().err
    assert "broken.jpg" in csv_path.read_text()
    assert result.summary["files"]["skipped"] == 1 and result.summary["train_images"] + result.summary["val_images"] == 36
    with pytest.raises(ImgclsError, match=r"1 of 37 files cannot be used, e.g. .*broken.jpg.*drop --strict"):
        train(cfg | {"strict": True}, progress=False)


@pytest.mark.slow
@pytest.mark.shared_data
def test_mnist_reference_one_epoch(shared_data, tmp_path):
    result = train({"data": str(shared_data / "mnist.npz"), "epochs": 1, "out": str(tmp_path)}, progress=False)
    assert result.metrics["accuracy"] > 0.97
