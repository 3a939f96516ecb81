"""Calibration, the HTML report and its metrics.json."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import Classifier
from imgcls.evaluation.calibration import calibration_summary, expected_calibration_error, fit_temperature


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(20000, 5)) * 1.5).float()
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=torch.Generator().manual_seed(0))[:, 0]
    honest = expected_calibration_error(torch.softmax(z, 1).numpy(), labels.numpy())
    over = expected_calibration_error(torch.softmax(3 * z, 1).numpy(), labels.numpy())
    assert honest < 0.02 and over > 0.1
    # labels were drawn from softmax(z): for logits 3z the fitted temperature must be ~3
    assert fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.08)
    assert fit_temperature(z / 2, labels) == pytest.approx(0.5, rel=0.08)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.gallery_imgs = 0
        self.scripts = 0
        self.external: list[str] = []
        self._table = None
        self._row = None
        self._cell = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            src = a.get("src", "")
            if not src.startswith("data:image/png;base64,"):
                self.external.append(src)
            if a.get("id"):
                self.imgs[a["id"]] = src
            if a.get("alt", "").endswith(tuple(f"Grad-CAM for {c}" for c in "0123456789")):
                self.gallery_imgs += 1
        if tag in ("script", "link"):
            self.scripts += 1
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        if tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        if tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        self.text.append(data)


def _png(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture
def report_run(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    return run


def test_report_contents(report_run, capsys):
    from imgcls.cli import main

    assert main(["evaluate", str(report_run), "--data", "digits", "--report"]) == 0
    out = capsys.readouterr().out
    assert "report written to" in out and "calibration: temperature" in out
    page = _Page()
    page.feed((report_run / "report.html").read_text())
    metrics = json.loads((report_run / "metrics.json").read_text())
    m, cal = metrics["evaluation"], metrics["calibration"]

    # self-contained: every picture embedded, nothing fetched, no scripts
    assert page.external == [] and page.scripts == 0
    for ident in ("confusion-matrix", "confusion-matrix-normalized", "reliability-diagram", "training-curves"):
        img = _png(page.imgs[ident])
        assert img.format == "PNG" and img.width > 200
    # per-class table: one row per class + header + 2 averages, numbers as in metrics.json
    rows = page.tables["per-class"]
    assert len(rows) == 1 + 10 + 2
    for row in rows[1:11]:
        pc = m["per_class"][row[0]]
        assert float(row[3]) == pytest.approx(pc["f1"], abs=1e-4) and int(row[4]) == pc["support"]
    assert f"{m['accuracy']:.2%}" in "".join(page.text)
    assert m["split"] == "test" and m["num_images"] == 359 and len(m["confusion_matrix"]) == 10
    assert {"top3_accuracy", "top5_accuracy", "macro_avg", "weighted_avg"} <= set(m)

    # calibration: fitted on validation, stored in model.json and used by the loaded classifier
    assert cal["fitted_on"] == "val" and cal["temperature"] > 0
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-6
    card = json.loads((report_run / "model.json").read_text())
    assert card["temperature"] == pytest.approx(cal["temperature"], rel=1e-3)
    assert Classifier.load(report_run).temperature == pytest.approx(cal["temperature"], rel=1e-3)
    assert len(cal["reliability_after"]["count"]) == 15 and sum(cal["reliability_after"]["count"]) == 359

    # gallery: the most confident mistakes, sorted, each with a Grad-CAM picture
    wrong = int(round((1 - m["accuracy"]) * m["num_images"]))
    assert len(metrics["mistakes"]) == min(8, wrong) == page.gallery_imgs
    conf = [g["confidence"] for g in metrics["mistakes"]]
    assert conf == sorted(conf, reverse=True)
    assert all(g["true"] != g["predicted"] for g in metrics["mistakes"])


def test_temperature_scaling_fixes_an_overconfident_model(digits_run, tmp_path):
    """Scale the last layer by 20: same predictions, far too sure. The report's temperature
    fit must bring ECE (and NLL) down on the held-out test split."""
    from imgcls.evaluation.report import build_report

    clf = Classifier.load(digits_run)
    with torch.no_grad():
        clf.model.fc.weight.mul_(20.0)
        clf.model.fc.bias.mul_(20.0)
    run = tmp_path / "overconfident"
    clf.save(run)
    shutil.copy(digits_run / "history.csv", run / "history.csv")
    r = build_report(run, "digits", mistakes=0)
    cal = r.calibration
    assert cal["temperature"] > 5.0
    # over-confident: ECE ~ the error rate (confidence ~1); the fit takes a quarter off it on
    # test images it never saw, and most of the excess negative log-likelihood
    assert cal["ece_before"] > 0.03 and cal["ece_after"] < 0.8 * cal["ece_before"]
    assert cal["val_ece_after"] < 0.8 * cal["val_ece_before"]
    assert cal["nll_after"] < 0.5 * cal["nll_before"]
    before = calibration_summary(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    assert before["ece"] == pytest.approx(0.5)  # a 50/50 guess that is right: confidence .5, accuracy 1


def test_report_without_validation_split(trained_run, tmp_path):
    """The run's own data with its own test split and val_split=0 in training still reports;
    the temperature is left alone and the page says why. (Other data is never fitted on:
    tests/test_explain_fixes.py.)"""
    from imgcls.evaluation.report import build_report
    from imgcls.rundir import RunDir

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    card = json.loads((run / "model.json").read_text())
    card["training"]["val_split"] = 0.0
    (run / "model.json").write_text(json.dumps(card))
    r = build_report(run, str(RunDir(run).config_values()["data"]), out_dir=tmp_path / "rep")
    assert r.calibration["fitted_on"] is None and "no validation split" in r.calibration["note"]
    assert (tmp_path / "rep" / "report.html").is_file()


def test_mistake_gallery_for_image_files(split_folder, tmp_path):
    """Photo folders: the gallery explains the files themselves (centre-cropped like predict)."""
    from imgcls import train
    from imgcls.data.sources import load_data
    from imgcls.evaluation.report import confident_mistakes

    r = train({"data": str(split_folder), "epochs": 1, "img_size": 24, "batch_size": 8, "out": str(tmp_path),
               "name": "p"}, progress=False)
    part = load_data(str(split_folder)).test
    labels = part.labels.numpy()
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), (labels + 1) % 3] = 0.8  # every prediction wrong, equally sure
    probs[0, (labels[0] + 1) % 3] = 0.9  # ... except the first, which is surest
    gallery = confident_mistakes(r.classifier, part, probs, labels, n=3)
    assert [g["index"] for g in gallery][0] == 0 and len(gallery) == 3
    for g in gallery:
        assert g["source"] == str(part.paths[g["index"]])
        pic = Image.open(io.BytesIO(g["png"]))
        assert pic.height == 128 and pic.width > 2 * 128
        assert 0 <= g["faithfulness"]["deletion_auc"] <= 1


def test_classifier_calibrate_api(digits_run, tmp_path):
    clf = Classifier.load(digits_run)
    with torch.no_grad():
        clf.model.fc.weight.mul_(20.0)
        clf.model.fc.bias.mul_(20.0)
    p_before = clf.predict_proba(np.zeros((28, 28), np.uint8))[0]
    info = clf.calibrate("digits")
    assert clf.temperature == pytest.approx(info["temperature"], rel=1e-3) and clf.temperature > 5
    assert info["val_ece_after"] < info["val_ece_before"]
    p_after = clf.predict_proba(np.zeros((28, 28), np.uint8))[0]
    assert p_after.argmax() == p_before.argmax() and p_after.max() < p_before.max()
    clf.save(tmp_path / "c")
    assert Classifier.load(tmp_path / "c").temperature == pytest.approx(clf.temperature)


def test_report_gallery_names_the_files_with_an_unreadable_one(split_folder, tmp_path):
    """evaluate --report on a folder: the decoded split has no paths and leaves the unreadable
    file out, yet every mistake is named by its own file (not 'all image #i')."""
    from imgcls import train
    from imgcls.evaluation.report import build_report
    from tests.conftest import write_folder

    r = train({"data": str(split_folder), "epochs": 1, "img_size": 24, "batch_size": 8, "out": str(tmp_path),
               "name": "p"}, progress=False)
    clf = Classifier.load(r.run_dir)
    head = [m for m in clf.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # always "fox": every cat and dog is a mistake, all equally sure
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    clf.save(tmp_path / "fox")
    folder = write_folder(tmp_path / "eval", n_per_class=6)
    (folder / "cat" / "000_broken.png").write_bytes(b"not an image")
    rep = build_report(tmp_path / "fox", str(folder), out_dir=tmp_path / "rep", mistakes=100,
                       calibrate_on_val=False)
    gallery = rep.mistakes
    assert len(gallery) == 12 and {g["true"] for g in gallery} == {"cat", "dog"}
    for g in gallery:
        src = Path(g["source"])
        assert src.is_file() and src.name != "000_broken.png" and src.parent.name == g["true"], g
        assert "png" in g
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())["mistakes"]
    assert [m["source"] for m in saved] == [g["source"] for g in gallery]
    assert str(folder / "dog") in rep.html_path.read_text()


def test_confusion_matrix_with_dollar_class_names():
    """Class names are text: '$5_$10' used to be parsed as mathtext and raise."""
    from imgcls.evaluation.plots import confusion_matrix_png

    png = confusion_matrix_png(np.array([[3, 1], [0, 2]]), ["$5_$10", "cost $5 or $6"])
    assert Image.open(io.BytesIO(png)).size[0] > 100
