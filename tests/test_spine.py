"""The one spine: every road to a prediction gives the same answer, and the defects the
old copies caused stay fixed (issue "One spine"): TTA on every road, a folder given to
evaluate is evaluated whole, lr-find measures fit's pipeline, export parity against
relabelled data, deterministic crops in loader workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import Classifier, train
from imgcls.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")

CLASSES = ("cat", "dog", "fox")


def hard_images(n_per_class: int, size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Colour images whose class shows faintly (a weak bar in noise, not mirror-symmetric):
    a one-epoch model is unsure of many of them, so test-time augmentation changes its
    answers - the roads that drop TTA disagree with those that keep it."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(len(CLASSES)):
        for _ in range(n_per_class):
            img = rng.integers(0, 140, size=(size, size, 3)).astype(np.float32)
            img[:, c * size // 4:(c + 1) * size // 4, c] += 45  # a faint vertical bar, left of centre
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys)


def write_split(root: Path, n_per_class: int, seed: int) -> list[tuple[Path, int]]:
    x, y = hard_images(n_per_class, seed=seed)
    files = []
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
        files.append((d / f"{i:03d}.png", int(label)))
    return files


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    """A reference CNN trained one epoch on photos with tta=flip-shift, exported to ONNX."""
    from imgcls.export import export_run

    root = tmp_path_factory.mktemp("tta")
    write_split(root / "data" / "train", 40, seed=0)
    test_files = write_split(root / "data" / "test", 20, seed=1)
    result = train({"data": str(root / "data"), "model": "reference_cnn", "img_size": 24, "epochs": 1,
                    "batch_size": 16, "tta": "flip-shift", "workers": 0, "out": str(root / "runs"), "seed": 0},
                   progress=False)
    clf = Classifier.load(result.run_dir)
    export_run(clf, "onnx", data=str(root / "data"), log=lambda _m: None)
    return result.run_dir, root / "data", test_files


def _onnx_direct(run_dir: Path, files: list[Path]) -> np.ndarray:
    """The exported file in ONNX Runtime, its input built from the description beside it
    (Pillow + numpy, none of imgcls' own inference code)."""
    import onnxruntime as ort

    meta = json.loads((run_dir / "model.onnx.json").read_text())
    assert meta["tta"] == "flip-shift"
    s, crop = meta["img_size"], meta["crop_pct"]
    mean, std = np.array(meta["mean"]).reshape(1, 3, 1, 1), np.array(meta["std"]).reshape(1, 3, 1, 1)
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(int(round(s / crop)), antialias=True), v2.CenterCrop(s)])
    x = np.stack([tf(Image.open(f).convert("RGB")).numpy() for f in files]).astype(np.float32) / 255.0
    x = ((x - mean) / std).astype(np.float32)
    sess = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def _cli_labels(run_dir: Path, folder: Path, backend: str, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(folder), "--backend", backend, "--format", "json"]) == 0
    return [d["label"] for d in json.loads(capsys.readouterr().out)]


def test_tta_same_answer_on_every_road(tta_run, capsys):
    from fastapi.testclient import TestClient

    from imgcls.serve.app import ServeSettings, create_app

    run_dir, data, test_files = tta_run
    clf = Classifier.load(run_dir)
    assert clf.tta == "flip-shift"
    files = sorted(f for f, _ in test_files)  # the order predict lists a folder in
    labels = np.array([dict((str(f), y) for f, y in test_files)[str(f)] for f in files])
    idx = {c: i for i, c in enumerate(clf.classes)}

    roads: dict[str, np.ndarray] = {}
    roads["Classifier.predict"] = np.array([idx[p.label] for p in clf.predict(files, precision="fp32")])
    roads["predict --backend torch"] = np.array([idx[c] for c in _cli_labels(run_dir, data / "test", "torch",
                                                                              capsys)])
    roads["predict --backend onnx"] = np.array([idx[c] for c in _cli_labels(run_dir, data / "test", "onnx",
                                                                             capsys)])
    with TestClient(create_app(run_dir, ServeSettings(backend="auto", max_wait_ms=1)),
                    base_url="http://127.0.0.1") as client:
        assert client.get("/health").json()["backend"] == "onnx"  # auto picks the up-to-date export
        roads["POST /predict"] = np.array([idx[client.post("/predict", files={"file": (f.name, f.read_bytes(),
                                                                                        "image/png")}).json()["label"]]
                                           for f in files])
    roads["ONNX Runtime directly"] = _onnx_direct(run_dir, files)
    # without TTA the answers differ: the data is hard enough that the check below means something
    no_tta = Classifier.load(run_dir)
    no_tta.card["tta"] = "none"
    plain = np.array([idx[p.label] for p in no_tta.predict(files, precision="fp32")])
    assert (plain != roads["Classifier.predict"]).any()

    m = clf.evaluate(data, precision="fp32")
    assert (m["split"], m["num_images"]) == ("test", len(files))
    reference = roads["Classifier.predict"]
    for road, pred in roads.items():
        assert (pred == reference).mean() >= 0.999, road
        assert (pred == labels).mean() == pytest.approx(m["accuracy"]), road


def test_export_parity_compares_like_with_like(tta_run):
    run_dir, _, _ = tta_run
    meta = json.loads((run_dir / "model.onnx.json").read_text())
    assert meta["parity"]["passed"] and meta["parity"]["top1_agreement"] >= 0.999
    # the reference of the check runs TTA: its accuracy is the TTA model's on that split
    clf = Classifier.load(run_dir)
    m = clf.evaluate(run_dir.parent.parent / "data", split="val", precision="fp32")
    assert meta["parity"]["accuracy_torch"] == pytest.approx(m["accuracy"], abs=1e-6)


def test_stale_tta_export_is_not_used(tta_run, tmp_path):
    """An export made with other TTA than the run's is not up to date."""
    import shutil

    from imgcls.engine.backends import make_backend
    from imgcls.errors import ImgclsError

    run_dir, _, _ = tta_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    side = json.loads((run / "model.onnx.json").read_text())
    side["tta"] = "none"
    (run / "model.onnx.json").write_text(json.dumps(side))
    clf = Classifier.load(run)
    assert make_backend(clf, "auto", device="cpu").name == "torch"
    with pytest.raises(ImgclsError, match="no up-to-date"):
        make_backend(clf, "onnx")


# ---------------------------------------------------------------------- evaluate a folder whole
def test_evaluate_plain_folder_uses_every_image(tmp_path, capsys):
    write_split(tmp_path / "train", 10, seed=0)
    res = train({"data": str(tmp_path / "train"), "img_size": 24, "epochs": 1, "batch_size": 8, "workers": 0,
                 "out": str(tmp_path / "runs")}, progress=False)
    plain = tmp_path / "plain"  # 3 classes x 20, no train/ or test/ inside
    write_split(plain, 20, seed=3)
    m = res.classifier.evaluate(plain)
    assert (m["split"], m["num_images"]) == ("all", 60)
    assert sum(sum(row) for row in m["confusion_matrix"]) == 60
    capsys.readouterr()
    assert main(["evaluate", str(res.run_dir), "--data", str(plain)]) == 0
    assert "all 60 images" in capsys.readouterr().out
    # a folder with train/ + test/: the test split, named
    write_split(tmp_path / "both" / "train", 4, seed=4)
    write_split(tmp_path / "both" / "test", 5, seed=5)
    m = res.classifier.evaluate(tmp_path / "both")
    assert (m["split"], m["num_images"]) == ("test", 15)


# ---------------------------------------------------------------------- lr-find = fit's pipeline
def test_lr_find_uses_fits_pipeline(tmp_path, monkeypatch):
    import imgcls.engine.session as session

    write_split(tmp_path / "photos", 12, seed=0)
    clf = Classifier.create("resnet18", classes=list(CLASSES), in_chans=3, img_size=32, seed=0)
    clf.card["pretrained"] = {"source": "test"}  # as from_pretrained: its own crop must be kept
    clf.preprocessing.crop_pct = 0.95
    before = clf.preprocessing.to_dict()
    seen = {}
    real = session.lr_find

    def spy(model, pre, batches, *a, **k):
        seen.update(in_memory=batches.split.in_memory, pre=pre.to_dict(), augment=k.get("batch_augment"),
                    workers_transform=getattr(batches, "_loader", None) is not None)
        return real(model, pre, batches, *a, **k)

    monkeypatch.setattr(session, "lr_find", spy)
    res = clf.find_lr(tmp_path / "photos", batch_size=8, steps=8, workers=0, precision="fp32")
    assert res.lrs and clf.preprocessing.to_dict() == before  # nothing mutated
    assert seen["pre"]["crop_pct"] == 0.95  # the pretrained crop, as fit trains with
    assert seen["in_memory"]  # from the decode pass (cache), as fit
    # fit's photo augmentation: random resized crops of decoded images (in workers on a CPU,
    # or on the device), not a per-file PIL pipeline
    assert seen["workers_transform"] or seen["augment"] is not None


def test_lr_find_in_memory_gets_alternating_flips(monkeypatch):
    import imgcls.engine.session as session
    from tests.conftest import pattern_images

    x, y = pattern_images(30, size=16, channels=3)
    clf = Classifier.create("reference_cnn", num_classes=3, in_chans=3, img_size=16, seed=0)
    seen = {}
    real = session.lr_find

    def spy(model, pre, batches, *a, **k):
        seen["flips"] = batches.flip_first is not None
        return real(model, pre, batches, *a, **k)

    monkeypatch.setattr(session, "lr_find", spy)
    clf.find_lr((x, y), batch_size=16, steps=5, precision="fp32")
    assert seen["flips"]  # colour in-memory data trains with airbench's alternating flips: so does the finder


# ---------------------------------------------------------------------- export parity, relabelled
def test_export_parity_uses_the_models_class_order(tmp_path):
    from imgcls.export import export_run

    write_split(tmp_path / "data", 30, seed=0)  # folder order: cat, dog, fox
    res = train({"data": str(tmp_path / "data"), "classes": "fox,cat,dog", "img_size": 24, "epochs": 3,
                 "batch_size": 16, "workers": 0, "out": str(tmp_path / "runs"), "seed": 0}, progress=False)
    clf = Classifier.load(res.run_dir)
    assert clf.classes == ["fox", "cat", "dog"]
    [fp32, int8] = export_run(clf, "onnx", int8=True, data=str(tmp_path / "data"), max_drop=5.0,
                              log=lambda _m: None)
    acc = clf.evaluate(tmp_path / "data", split="val", precision="fp32")["accuracy"]
    assert acc > 0.6
    assert fp32.meta["parity"]["accuracy_torch"] == pytest.approx(acc, abs=1e-6)
    assert int8.meta["parity"]["accuracy_torch"] == pytest.approx(acc, abs=1e-6)


# ---------------------------------------------------------------------- reproducible crops in workers
def test_worker_crops_do_not_depend_on_the_worker_or_a_restart():
    from imgcls.data.loaders import Batches
    from imgcls.data.records import Split
    from imgcls.data.transforms import BatchResizedCrop

    imgs = torch.randint(0, 256, (40, 3, 36, 36), dtype=torch.uint8)
    split = Split(labels=torch.arange(40) % 3, images=imgs)

    def epoch(workers: int, e: int, skip: int = 0) -> list[torch.Tensor]:
        b = Batches(split, 8, shuffle=True, seed=3, drop_last=True, workers=workers,
                    transform=BatchResizedCrop(32, (0.25, 1.0), hflip=True))
        b.set_epoch(e)
        b.skip = skip
        return [x.clone() for x, _ in b]

    one, two = epoch(1, 2), epoch(2, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # whichever worker ran a batch
    resumed = epoch(2, 2, skip=2)  # a new loader after a restart, two batches in
    assert len(resumed) == len(one) - 2 and all(torch.equal(a, b) for a, b in zip(one[2:], resumed))
    assert not torch.equal(epoch(1, 3)[0], one[0])  # another epoch, other crops


# ---------------------------------------------------------------------- the API's shape
def test_fit_takes_a_config_and_overrides(tiny_npz):
    from imgcls.config import TrainConfig
    from imgcls.errors import ImgclsError

    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    summary = clf.fit(tiny_npz, TrainConfig(epochs=2, batch_size=16, precision="fp32"), epochs=1, progress=False)
    assert summary["epochs_run"] == 1 and summary["batch_size"] == 16  # the override wins, the rest stays
    with pytest.raises(ImgclsError, match="unknown key 'epoch'.*") as err:
        clf.fit(tiny_npz, epoch=3)
    assert "epochs" in err.value.hint


def test_run_dir_updates_metrics_and_card(trained_run, tmp_path):
    import shutil

    from imgcls.rundir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(trained_run, run.path)
    before = run.read_metrics()
    run.update_metrics(extra={"x": 1})
    after = run.read_metrics()
    assert after["extra"] == {"x": 1} and after["training"] == before["training"]  # other sections kept
    run.update_card(temperature=1.5)
    assert Classifier.load(run.path).temperature == 1.5  # weights untouched: the sha256 still holds
    assert (run.read_config().epochs, run.read_config().batch_size) == (4, 16)  # as trained_run was trained
    assert not list(run.path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_folder_of_only_test_images_is_evaluated_and_refused_for_training(tmp_path, capsys):
    write_split(tmp_path / "train", 10, seed=0)
    res = train({"data": str(tmp_path / "train"), "img_size": 24, "epochs": 1, "batch_size": 8, "workers": 0,
                 "out": str(tmp_path / "runs")}, progress=False)
    write_split(tmp_path / "held" / "test", 7, seed=2)  # test/ only, as users keep a test set
    m = res.classifier.evaluate(tmp_path / "held")
    assert (m["split"], m["num_images"]) == ("test", 21)
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "held"), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert "has no training images (it has test/ but no train/ folder)" in err and err.count("\n") == 1
    assert not (tmp_path / "r2").exists()  # refused before a run folder was made


def test_decide_is_the_one_decision_rule():
    """Classifier.predict, imgcls predict and serve answer through engine/decisions.decide."""
    import numpy as np

    from imgcls.engine.decisions import decide

    probs = np.array([[0.1, 0.7, 0.2], [0.0, 0.0, 0.0], [0.5, 0.2, 0.3]])
    preds = decide(["a", "b", "c"], probs, ["x.png", "bad.png", "z.png"], top_k=2, skipped={1: "bad.png: truncated"})
    assert [p.label for p in preds] == ["b", None, "a"]
    assert preds[0].top == [("b", 0.7), ("c", 0.2)]
    assert preds[1].to_dict() == {"source": "bad.png", "label": None, "top": [], "error": "bad.png: truncated"}
    assert len(decide(["a", "b", "c"], probs, ["1", "2", "3"], top_k=9)[0].top) == 3


def test_top_k_below_one_is_refused_on_every_road(trained_run, tmp_path):
    """The server answered 400 for top_k 0; Classifier.predict silently gave the top class."""
    from imgcls import Classifier
    from imgcls.errors import ImgclsError

    clf = Classifier.load(trained_run)
    x = np.zeros((2, 16, 16), dtype=np.uint8)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ImgclsError, match="top_k must be a whole number >= 1"):
            clf.predict(x, top_k=k)
    with pytest.raises(ImgclsError, match="top_k must be"):
        clf.predict_parts(x, tmp_path / "parts", top_k=0)
    assert [len(p.top) for p in clf.predict(x, top_k=np.int64(2))] == [2, 2]


def test_a_prediction_pass_stops_its_decode_workers(tmp_path):
    """Persistent decode workers outlived a pass (Batches sits in a reference cycle), so the next
    pass's workers were forked with a copy of the old iterator and printed "AssertionError: can
    only test a child process" when they dropped it (imgcls rank --strategy hybrid)."""
    import gc
    import multiprocessing

    from imgcls.data.loaders import Batches
    from imgcls.data.sources import load_data
    from imgcls.engine.predictor import Predictor
    from tests.conftest import write_folder

    folder = write_folder(tmp_path / "d", n_per_class=6)
    r = train({"data": str(folder), "epochs": 1, "img_size": 16, "batch_size": 8, "out": str(tmp_path / "runs"),
               "name": "w", "val_split": 0.0}, progress=False)
    split = load_data(str(folder), val_split=0.0).train
    gc.collect()  # workers of earlier tests' loaders that only garbage held
    before = set(multiprocessing.active_children())
    new = lambda: set(multiprocessing.active_children()) - before  # noqa: E731
    with Predictor(r.classifier, batch_size=4, workers=1) as p:
        for _ in range(2):
            logits, _ = p.run(split)
            assert len(logits) == 18 and not new()
    b = Batches(split, 4, transform=r.classifier.preprocessing.pil_transform(), channels=3, size=16, workers=1)
    assert len(list(b)) == 5 and new()  # a training loader keeps its workers
    b.close()
    assert not new() and len(list(b)) == 5  # ... until closed; it can go on
    b.close()


def test_evaluate_on_the_fitted_split_names_only_splits_the_data_has(tmp_path):
    """Data without a test split: the in-sample note on val sent the user to --split test."""
    from tests.conftest import pattern_images

    x, y = pattern_images(40, size=16)
    npz = tmp_path / "notest.npz"
    np.savez(npz, x_train=x, y_train=y, class_names=np.array(["a", "b", "c"]))
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    clf.fit(str(npz), epochs=1, batch_size=16, progress=False)
    clf.calibrate(str(npz), coverage=0.9)
    note = clf.evaluate(str(npz), split="val", announce=False)["conformal"]["note"]
    assert "fitted on (val)" in note and "--split" not in note and "no other split" in note


def test_evaluate_report_says_why_the_temperature_was_not_refitted(trained_run, tmp_path, capsys):
    import shutil

    other = tmp_path / "other.npz"  # the same images at another path: not the data the run trained on
    shutil.copy(trained_run.parent.parent / "tiny.npz", other)
    before = json.loads((trained_run / "model.json").read_text()).get("calibration")
    assert main(["evaluate", str(trained_run), "--data", str(other), "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "not refitted" in out and "note: other is not the data the run trained on" in out
    assert json.loads((trained_run / "model.json").read_text()).get("calibration") == before
