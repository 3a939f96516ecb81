"""Explain, evaluate and report fixes: explain follows the predictor (TTA, temperature), skips
unreadable files, the report fits a temperature only on the run's own validation split,
single-class evaluation data, macro averages over the classes present, split hints."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import Classifier, ImgclsError
from imgcls.bundle import ModelBundle
from imgcls.data.sources import load_data
from imgcls.explain import explain
from tests.conftest import pattern_images, write_folder
from tests.imagefiles import write_bad_files


@pytest.fixture(scope="module")
def tta_clf(digits_run):
    """The digits run as if trained with ``--tta flip-shift`` and calibrated (T = 2): the
    plain view and the TTA prediction disagree on many digits (they are not mirror-symmetric)."""
    clf = Classifier.load(digits_run)
    clf.card["tta"] = "flip-shift"
    clf.temperature = 2.0
    return clf


def _disagreeing(clf, x: np.ndarray) -> int:
    """The first image whose plain-view class differs from the TTA prediction."""
    tta = clf.predict_proba(x, device="cpu")[0].argmax(1)
    clf.card["tta"] = "none"
    try:
        plain = clf.predict_proba(x, device="cpu")[0].argmax(1)
    finally:
        clf.card["tta"] = "flip-shift"
    differ = np.flatnonzero(tta != plain)
    assert len(differ), "the test needs an image the TTA views change the class of"
    return int(differ[0])


# ---------------------------------------------------------------------- 1: explain uses the predictor
def test_explain_target_and_top_k_are_the_predictors(tta_clf):
    """explain used the plain view at T = 1 for the class it explained and the top-k it showed,
    while predict uses the run's TTA and temperature: it explained another class than predicted."""
    x = load_data("digits").test.images.numpy()[:120]
    i = _disagreeing(tta_clf, x)
    [pred] = tta_clf.predict(x[i:i + 1], top_k=3, device="cpu")
    [e] = explain(tta_clf, x[i:i + 1], method="gradcam", top_k=3, faithfulness=False)
    assert e.target == pred.guess
    assert [c for c, _ in e.top] == [c for c, _ in pred.top]
    assert [p for _, p in e.top] == pytest.approx([p for _, p in pred.top], abs=1e-4)
    assert np.abs(e.attribution).max() > 0  # still an explanation (of the plain view)


def test_server_overlay_explains_what_predict_predicts(tta_clf):
    from imgcls.serve.explain import gradcam_overlay

    x = load_data("digits").test.images.numpy()[:120]
    i = _disagreeing(tta_clf, x)
    img = Image.fromarray(x[i, 0])
    [pred] = tta_clf.predict([img], top_k=5, device="cpu")
    ov = gradcam_overlay(tta_clf, img)
    assert ov.target == pred.guess and [c for c, _ in ov.top] == [c for c, _ in pred.top]


# ---------------------------------------------------------------------- 5: unreadable files skipped
def test_explain_folder_skips_unreadable_files_with_a_reason(digits_run, tmp_path, capsys):
    clf = Classifier.load(digits_run)
    folder = tmp_path / "imgs"
    reasons = write_bad_files(folder)
    x = load_data("digits").test.images.numpy()
    for k in range(2):
        Image.fromarray(x[k, 0]).save(folder / f"good{k}.png")
    exps = explain(clf, [folder], faithfulness=False)
    assert sorted(e.source.rsplit("/", 1)[-1] for e in exps) == ["good0.png", "good1.png"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgcls: skipped")]
    assert len(lines) == len(reasons)
    for name in reasons:
        assert sum(name in ln for ln in lines) == 1


def test_explain_single_unreadable_file_is_still_an_error(digits_run, tmp_path):
    clf = Classifier.load(digits_run)
    write_bad_files(tmp_path / "bad")
    with pytest.raises(ImgclsError, match="truncated"):
        explain(clf, str(tmp_path / "bad" / "truncated.jpg"), faithfulness=False)
    with pytest.raises(ImgclsError, match="none of the 4 images could be read"):
        explain(clf, tmp_path / "bad", faithfulness=False)


# ---------------------------------------------------------------------- 2: the report's temperature
def _digits_npz(path, n_train: int = 60, n_test: int = 40):
    """A subset of digits' own training images as another .npz (the model trained on them)."""
    d = load_data("digits", val_split=0.0)
    x, y = d.train.images.numpy()[:, 0], d.train.labels.numpy()
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:n_train + n_test],
             y_test=y[n_train:n_train + n_test], class_names=np.array(d.classes))
    return path


def test_report_on_other_data_leaves_the_temperature_alone(digits_run, tmp_path):
    """evaluate --report on data other than the training data fitted a temperature on a 10%
    hold-out of that data (here: images the model trained on) and saved it into model.json."""
    from imgcls.evaluation.report import build_report

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = json.loads((run / "model.json").read_text())
    r = build_report(run, str(_digits_npz(tmp_path / "sub.npz")), out_dir=tmp_path / "rep", mistakes=0)
    after = json.loads((run / "model.json").read_text())
    assert after["temperature"] == before["temperature"] and after.get("calibration") == before.get("calibration")
    assert r.calibration["fitted_on"] is None and r.calibration["temperature"] == before["temperature"]
    assert "temperature left as it was" in r.calibration["note"] and "imgcls calibrate" in r.calibration["note"]
    assert "temperature left as it was" in r.html_path.read_text()


def test_report_on_the_training_data_still_fits_and_notes_optimism(digits_run, tmp_path):
    """The run's own data: fitted on its validation split; evaluated on that split (and on
    'all' of a folder, which holds it) the 'after' ECE carries the optimistic note."""
    from imgcls.evaluation.report import build_report

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    r = build_report(run, "digits", split="val", out_dir=tmp_path / "rep", mistakes=0)
    assert r.calibration["fitted_on"] == "val" and "optimistic" in r.calibration["note"]
    assert json.loads((run / "model.json").read_text())["temperature"] == pytest.approx(r.calibration["temperature"],
                                                                                       rel=1e-3)
    r = build_report(run, "digits", out_dir=tmp_path / "rep2", mistakes=0)  # the test split: held out
    assert r.calibration["fitted_on"] == "val" and "note" not in r.calibration


def test_report_notes_optimism_when_all_images_include_the_fitting_ones(tmp_path):
    from imgcls import train
    from imgcls.evaluation.report import build_report

    folder = write_folder(tmp_path / "photos", n_per_class=10)
    r = train({"data": str(folder), "epochs": 1, "img_size": 20, "batch_size": 8, "out": str(tmp_path),
               "name": "p"}, progress=False)
    rep = build_report(r.run_dir, str(folder), out_dir=tmp_path / "rep", mistakes=0)
    assert rep.metrics["split"] == "all" and rep.calibration["fitted_on"] == "val"
    assert "optimistic" in rep.calibration["note"]


# ---------------------------------------------------------------------- 3: one class of the model's
def _one_class_sources(root, n: int = 6):
    """Images of class 'a' only (trained_run's classes: a, b, c) as a folder, a manifest and an .npz."""
    x, y = pattern_images(n, size=16)
    x = x[y == 0]
    (root / "sub" / "a").mkdir(parents=True)
    rows = ["path,label"]
    for i, img in enumerate(x):
        Image.fromarray(img).save(root / "sub" / "a" / f"{i}.png")
        rows.append(f"sub/a/{i}.png,a")
    (root / "one.csv").write_text("\n".join(rows) + "\n")
    np.savez(root / "one.npz", x_train=x, y_train=np.zeros(len(x), np.int64), class_names=np.array(["a"]))
    return [root / "sub", root / "one.csv", root / "one.npz"], len(x)


def test_evaluate_on_images_of_a_single_class(trained_run, tmp_path):
    """Evaluating on images of one class was refused ('a classifier needs at least two class
    folders'): the model brings the other classes. Training still refuses one class."""
    from imgcls.cli import main

    clf = Classifier.load(trained_run)
    specs, n = _one_class_sources(tmp_path)
    for spec in specs:
        m = clf.evaluate(str(spec), device="cpu", announce=False)
        assert m["num_images"] == n and m["per_class"]["a"]["support"] == n, spec
        assert m["per_class"]["b"]["support"] == 0 and len(m["confusion_matrix"]) == 3
    assert main(["evaluate", str(trained_run), "--data", str(specs[0])]) == 0
    assert Classifier.load(trained_run).calibrate(str(specs[0]), device="cpu")["num_images"] >= 1
    for spec in specs:
        with pytest.raises(ImgclsError, match="single class|only one class"):
            load_data(str(spec))  # what training reads the data with: still two classes at least


# ---------------------------------------------------------------------- 4: macro over present classes
def test_macro_averages_leave_out_classes_with_no_images_nor_predictions():
    """Digits 0-4 only, of 10 classes, nearly all right: macro F1 was ~0.49 (five absent classes
    at 0); it is the mean over the five present, as scikit-learn's without ``labels=``."""
    from sklearn.metrics import precision_recall_fscore_support

    from imgcls.evaluation.metrics import classification_metrics, format_metrics
    from imgcls.evaluation.report import render_html

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.95, y, (y + 1) % 5)
    logits = torch.full((200, 10), -5.0)
    logits[np.arange(200), pred] = 5.0
    classes = [str(i) for i in range(10)]
    m = classification_metrics(logits, torch.from_numpy(y), classes)
    want = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)[:3]
    got = m["macro_avg"]
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(want) and got["f1"] > 0.9
    assert got["classes"] == 5
    assert m["per_class"]["7"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    json.dumps(m)  # null in metrics.json
    text = format_metrics(m)
    row7 = next(ln for ln in text.splitlines() if ln.startswith("7 "))
    assert row7.split() == ["7", "—", "—", "—", "0"] and "over the 5 of 10 classes" in text
    cal = {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.1, "nll_before": 1.0, "nll_after": 1.0}
    m.update(split="test", data="d")
    clf = ModelBundle(torch.nn.Identity(), architecture="x", classes=classes, preprocessing=None)
    page = render_html(clf, Path("run"), m, cal, [], _pictures(), [])
    assert "<td>7</td><td>—</td><td>—</td><td>—</td><td>0</td>" in page and "over the 5 of 10 classes" in page


def _pictures() -> dict[str, bytes]:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    return {k: buf.getvalue() for k in ("confusion_counts", "confusion_normalized", "reliability")}


# ---------------------------------------------------------------------- 6: hints name only real splits
def test_missing_split_error_names_the_splits_the_data_has(trained_run, tmp_path):
    """'the data has no test split (use --split train, val or test)' listed test again."""
    np.savez(tmp_path / "notest.npz", x_train=pattern_images(8, size=16)[0], y_train=pattern_images(8, size=16)[1],
             class_names=np.array(["a", "b", "c"]))
    clf = Classifier.load(trained_run)
    with pytest.raises(ImgclsError) as err:
        clf.eval_data(str(tmp_path / "notest.npz"), "test", announce=False)
    assert str(err.value) == "the data has no 'test' split (it has train, val: use --split train or val)"


def test_held_in_note_suggests_only_a_split_the_data_has():
    from imgcls.evaluation.trust import held_in_note

    for splits, want, unwanted in ((["train", "val"], "no other split", "--split"),
                                   (["train", "val", "test"], "--split test", "no other split"),
                                   (None, "not fitted on", "--split")):
        section: dict = {}
        held_in_note(section, "val", "val", "unknown threshold was", splits)
        assert want in section["note"] and unwanted not in section["note"], (splits, section)
    section = {}
    held_in_note(section, "test", "test", "sets were", ["train", "val", "test"])
    assert "--split val" in section["note"]
    section = {}
    held_in_note(section, "val", "test", "sets were", ["train", "val", "test"])
    assert section == {}  # held out: no note


@pytest.mark.parametrize("shape", [(30, 50, 3), (37, 37, 3), (18, 18, 3)])  # a photo; square; the stored size
def test_explain_of_an_array_sees_what_predict_sees_in_shorter_side_mode(shape):
    """explain squashed a whole array to the input size where predict resizes its shorter side
    and crops the centre, so its top classes were not predict's."""
    import dataclasses

    from imgcls import Classifier

    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=3, img_size=16, seed=0)
    clf.preprocessing = dataclasses.replace(clf.preprocessing, resize="shorter_side", crop_pct=0.875)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=shape, dtype=np.uint8)
    arr[: shape[0] // 2] = 255  # not symmetric: a squash and a crop see different things
    [e] = clf.explain(arr, method="gradcam", faithfulness=False)
    [p] = clf.predict(arr, top_k=3)
    assert [c for c, _ in e.top] == [c for c, _ in p.top]
    np.testing.assert_allclose([v for _, v in e.top], [v for _, v in p.top], atol=1e-5)
