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


def _feature_batches(n=32, d=6, classes=3, seed=0, batch=8):
    import torch

    from imgcls.data.loaders import Batches
    from imgcls.data.records import Split

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1)).long()
    return Batches(Split(labels=y, images=x), batch, shuffle=True, seed=seed), Batches(Split(labels=y, images=x), 64)


def test_one_ema_serves_two_fits_of_different_modules():
    """The transfer recipe hands callbacks from the probe (a Linear head) to another module: the
    EMA must start afresh at each fit, not load the first module's live weights into the second."""
    import torch

    from imgcls.engine.averaging import EMA
    from imgcls.engine.trainer import FitSettings, Trainer

    ema = EMA(0.9)
    train_b, val_b = _feature_batches()
    s = FitSettings(epochs=2, lr=1e-2)
    head = torch.nn.Linear(6, 3)
    Trainer(head, None, s, torch.device("cpu"), None, callbacks=[ema]).fit(train_b, val_b)
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    state = Trainer(other, None, s, torch.device("cpu"), None, callbacks=[ema]).fit(train_b, val_b)
    assert len(state.history) == 2
    # the model ends on the average
    avg = ema.ema.module.state_dict()
    assert all(torch.equal(v, avg[k]) for k, v in other.state_dict().items())


def test_mix_loss_with_one_hot_targets_is_torchs_weighted_cross_entropy():
    import torch
    import torch.nn.functional as F

    from imgcls.engine.mixing import MixLoss

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 3, generator=g), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    w = torch.tensor([0.5, 1.5, 2.0])
    one_hot = F.one_hot(y, 3).float()  # what mixing gives with lam = 1 and no smoothing
    assert torch.allclose(MixLoss.loss(logits, one_hot, w), F.cross_entropy(logits, y, weight=w))
    assert torch.allclose(MixLoss.loss(logits, one_hot), F.cross_entropy(logits, y))
    # a mixed image counts each of its classes at that class's weight
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    assert not torch.allclose(MixLoss.loss(logits, mixed, w), MixLoss.loss(logits, mixed))


def test_balance_weights_apply_under_mixup():
    """--balance weights with --mixup was silently ignored: the soft-target loss never got the weights."""
    import torch

    from imgcls.engine.trainer import FitSettings, Trainer

    def fit(weights):
        torch.manual_seed(0)
        np.random.seed(0)  # timm's Mixup draws lam from numpy
        model = torch.nn.Linear(6, 3)
        model.num_classes = 3  # what the mixing reads for the soft targets
        train_b, _ = _feature_batches()
        s = FitSettings(epochs=1, lr=1e-2, mixup=0.4, seed=0)
        Trainer(model, None, s, torch.device("cpu"), None, class_weights=weights).fit(train_b)
        return model.weight.detach().clone()

    assert not torch.equal(fit(None), fit(torch.tensor([0.2, 1.0, 3.0])))


def test_a_named_run_folder_with_a_trained_model_is_not_overwritten(tiny_npz, tmp_path, capsys):
    """`imgcls train --config runs/X/config.yaml` (which holds name: X) silently replaced runs/X."""
    from imgcls.cli import main

    base = ["train", "--data", str(tiny_npz), "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path)]
    assert main([*base, "--name", "x", "--checkpoint-every", "10"]) == 0
    run = tmp_path / "x"
    weights = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(run / "config.yaml"), "--seed", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "give another --name, or --exist-ok to replace it" in err[0]
    assert (run / "model.safetensors").read_bytes() == weights  # untouched
    assert main(["train", "--resume", str(run)]) == 0  # continuing it is not replacing it
    # --exist-ok replaces it; the saved config asks again next time
    assert main(["train", "--config", str(run / "config.yaml"), "--seed", "1", "--exist-ok"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["exist_ok"] is False
    assert main(["train", "--config", str(run / "config.yaml")]) == 1


def test_a_resumed_time_budget_run_goes_on_with_its_schedule(tmp_path):
    """Resuming a --time-budget run started its clock afresh, winding the LR schedule (which
    follows the clock) back towards the start; the checkpoint now carries the seconds spent."""
    import time

    import torch

    from imgcls.engine.callbacks import Callback
    from imgcls.engine.checkpoint import CHECKPOINT, Checkpoint, TrainingInterrupted, load_checkpoint
    from imgcls.engine.trainer import FitSettings, Trainer

    class Slow(Callback):  # the clock, not the step count, drives the schedule
        def __init__(self, ckpt=None, stop_at=None):
            self.ckpt, self.stop_at = ckpt, stop_at

        def on_batch_end(self, state):
            time.sleep(0.1)
            if state.step == self.stop_at:
                self.ckpt._signal = 15  # as SIGTERM does: checkpoint, then stop

    s = FitSettings(epochs=1000, lr=1e-2, schedule="linear", warmup_epochs=0, time_budget_s=10)

    def trainer(resume=None, stop_at=None):
        torch.manual_seed(0)
        train_b, _ = _feature_batches()  # 4 steps an epoch
        ckpt = Checkpoint(tmp_path, resume=resume, handle_signals=False)
        t = Trainer(torch.nn.Linear(6, 3), None, s, torch.device("cpu"), None, callbacks=[Slow(ckpt, stop_at), ckpt])
        ckpt.attach(t)
        return t, train_b

    t, b = trainer(stop_at=6)
    with pytest.raises(TrainingInterrupted):
        t.fit(b)
    ck = load_checkpoint(tmp_path / CHECKPOINT)
    t, b = trainer(resume=ck, stop_at=9)  # resumed in epoch 2; stopped again early in epoch 3
    with pytest.raises(TrainingInterrupted):
        t.fit(b)
    lrs = [h["lr"] for h in load_checkpoint(tmp_path / CHECKPOINT)["history"]]
    assert len(lrs) == 2 and lrs[1] < lrs[0]  # the schedule went on down, not back up
    assert ck["budget_spent_s"] >= 0.6


@pytest.mark.parametrize("flag,value", [("--momentum", "-1"), ("--patience", "0"), ("--patience", "-2"),
                                        ("--weight-decay", "-1"), ("--warmup-epochs", "-1")])
def test_negative_training_knobs_are_refused_in_one_line(flag, value, capsys):
    from imgcls.cli import main

    assert main(["train", "--data", "digits", "--optimizer", "sgd", flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"({flag})" in err[0] and "Traceback" not in err[0]
    TrainConfig(momentum=0, patience=1, weight_decay=0, warmup_epochs=0)  # the edges are fine
