"""Multi-label classification on tiny generated data: manifests and npz, training, per-class
thresholds in model.json, the label set on every road (API, CLI, serve, ONNX), metrics and
the refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.api import Classifier
from imgcls.cli import main
from imgcls.data.sources import load_data
from imgcls.engine.decisions import decide
from imgcls.engine.multilabel import tune_thresholds
from imgcls.errors import ImgclsError
from imgcls.evaluation.multilabel import multilabel_metrics
from tests.conftest import SHARED

NAMES = ["tl", "tr", "bl", "br"]


def quadrants(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Label k = a bright square in quadrant k (each present with probability 0.4)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.4).astype(np.uint8)
    x = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    h = size // 2
    for k, (r, c) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        x[y[:, k] == 1, r + 2:r + h - 2, c + 2:c + h - 2] = 255
    return x, y


@pytest.fixture(scope="module")
def quad_npz(tmp_path_factory) -> Path:
    (x, y), (xt, yt) = quadrants(320, 0), quadrants(80, 1)
    path = tmp_path_factory.mktemp("ml") / "quad.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(NAMES))
    return path


@pytest.fixture(scope="module")
def quad_run(quad_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", str(quad_npz), "--epochs", "3", "--batch-size", "32", "--out", str(out),
                 "--name", "q", "--precision", "fp32"]) == 0
    return out / "q"


def _files(tmp_path: Path, n: int = 9) -> list[str]:
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


# ---------------------------------------------------------------------- data
def test_manifest_label_sets_and_01_columns(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "sets.csv").write_text("path,labels\n" + "".join(
        f"{f},{['cat;dog', 'cat', 'bird'][i % 3]}\n" for i, f in enumerate(files)))
    d = load_data(tmp_path / "sets.csv", val_split=0.0)
    assert d.multi_label and d.classes == ["bird", "cat", "dog"]
    assert d.train.labels.tolist()[0] == [0.0, 1.0, 1.0] and d.train.class_counts(3) == [3, 6, 3]
    (tmp_path / "cols.tsv").write_text("path\tcat\tdog\tsplit\n" + "".join(
        f"{f}\t{i % 2}\t1\t{'val' if i < 3 else ''}\n" for i, f in enumerate(files)))
    d = load_data(tmp_path / "cols.tsv")
    assert d.multi_label and d.classes == ["cat", "dog"] and len(d.val) == 3 and d.val.labels.shape == (3, 2)
    # a label column where every row holds several labels is multi-label; --task single refuses it
    (tmp_path / "all.csv").write_text("".join(f"{f},a;b\n" for f in files))
    assert load_data(tmp_path / "all.csv", val_split=0.0).multi_label
    with pytest.raises(ImgclsError, match="line 1: 'a;b' holds 2 labels but --task single"):
        load_data(tmp_path / "all.csv", task="single")


@pytest.mark.parametrize("body, needle", [
    ("path,labels\n{0},cat\n{1},\n", "line 3: empty label cell"),
    ("path,label\n{0},cat\n{1},cat;dog\n{2},dog\n", "line 3: 'cat;dog' holds 2 labels in a label column whose other"),
    ("path,cat,dog\n{0},1,0\n{1},1,yes\n", "line 3: column 'dog' holds 'yes'"),
])
def test_manifest_errors_name_the_row(tmp_path, body, needle):
    files = _files(tmp_path, 3)
    (tmp_path / "m.csv").write_text(body.format(*files))
    with pytest.raises(ImgclsError) as e:
        load_data(tmp_path / "m.csv")
    assert needle in e.value.oneline() and "m.csv" in e.value.oneline() and "\n" not in e.value.oneline()


def test_manifest_unknown_label_names_the_row(tmp_path):
    files = _files(tmp_path, 3)
    (tmp_path / "m.csv").write_text(f"path,labels\n{files[0]},cat\n{files[1]},cat;owl\n")
    with pytest.raises(ImgclsError, match="line 3: unknown label 'owl'"):
        load_data(tmp_path / "m.csv", classes=["cat", "dog"])
    # a mixed label column is multi-label when asked for
    (tmp_path / "mix.csv").write_text(f"path,label\n{files[0]},cat\n{files[1]},cat;dog\n")
    assert load_data(tmp_path / "mix.csv", task="multi", val_split=0.0).multi_label


def test_npz_2d_labels_multi_hot_and_one_hot(tmp_path, quad_npz):
    d = load_data(quad_npz)
    assert d.multi_label and d.classes == NAMES and d.train.labels.dtype == torch.float32
    assert d.train.labels.shape[1] == 4 and len(d.val) + len(d.train) == 320
    assert (d.val.labels.sum(0) > 0).all()  # stratified on the rarest label: every label in val
    x, y = quadrants(40, 3)
    onehot = np.eye(3, dtype=np.uint8)[np.arange(40) % 3]
    np.savez(tmp_path / "oh.npz", x_train=x, y_train=onehot)
    assert not load_data(tmp_path / "oh.npz").multi_label  # Keras to_categorical: one class per image
    forced = load_data(tmp_path / "oh.npz", task="multi")
    assert forced.multi_label and forced.train.labels.shape[1] == 3
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.where(y == 1, 2, 0))
    assert not load_data(tmp_path / "bad.npz").multi_label  # not 0/1: argmax (the one-hot reading)


# ---------------------------------------------------------------------- training + thresholds
def test_training_writes_task_thresholds_and_multilabel_metrics(quad_run):
    card = json.loads((quad_run / "model.json").read_text())
    assert card["task"] == "multi"
    t = card["thresholds"]
    assert t["target"] == "f1" and t["fitted_on"] == "val" and set(t["values"]) == set(NAMES)
    assert all(0.0 < v < 1.0 for v in t["values"].values())
    m = json.loads((quad_run / "metrics.json").read_text())["evaluation"]
    assert m["task"] == "multi" and m["map_macro"] > 0.9
    for key in ("map_micro", "cf1", "of1", "exact_match", "hamming_loss", "per_class", "pr_curves"):
        assert key in m
    assert set(m["per_class"]["tl"]) >= {"ap", "precision", "recall", "f1", "threshold", "support"}
    assert "val_map" in json.dumps(card["metrics"]["best_val"])


def test_losses_pos_weight_asl_mixup_and_smoothing(quad_npz):
    for kw in ({"loss": "asl"}, {"pos_weight": "auto", "label_smoothing": 0.1},
               {"mixup": 0.2, "balance": "weights"}, {"balance": "sampler"}):
        clf = Classifier.create("reference_cnn", classes=NAMES, in_chans=1, img_size=16, seed=0)
        s = clf.fit(str(quad_npz), epochs=1, batch_size=64, progress=False, precision="fp32", **kw)
        assert np.isfinite(s["best"]["val_loss"]) and clf.multi_label, kw
        assert clf.card["thresholds"]["values"].keys() == set(NAMES)


def test_loss_task_mismatch_and_calibration_refused(quad_npz, tiny_npz, quad_run):
    clf = Classifier.create("reference_cnn", classes=NAMES, in_chans=1, img_size=16)
    with pytest.raises(ImgclsError, match="--loss ce is for one class per image"):
        clf.fit(str(quad_npz), epochs=1, loss="ce", progress=False)
    single = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16)
    with pytest.raises(ImgclsError, match="--loss asl is for multi-label data"):
        single.fit(str(tiny_npz), epochs=1, loss="asl", progress=False)
    with pytest.raises(ImgclsError, match="temperature calibration is for single-label models"):
        Classifier.load(quad_run).calibrate(str(quad_npz))


def test_threshold_tuning_targets():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 2)) < 0.3).astype(int)
    p = y * 0.4 + rng.random((400, 2)) * 0.6  # overlapping scores in [0.4, 0.6]
    f1 = tune_thresholds(y, p, ["a", "b"], "f1")
    prec = tune_thresholds(y, p, ["a", "b"], "precision:0.99")
    rec = tune_thresholds(y, p, ["a", "b"], "recall:0.99")
    for c in "ab":
        assert prec["val"][c]["precision"] >= 0.99 and rec["val"][c]["recall"] >= 0.99
        assert rec["values"][c] <= f1["values"][c] <= prec["values"][c]
    m = multilabel_metrics(p, y, ["a", "b"], [prec["values"]["a"], prec["values"]["b"]])
    assert m["per_class"]["a"]["precision"] >= 0.99


def test_decide_label_sets():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.3, 0.1]])
    a, b = decide(["x", "y", "z"], probs, ["one", "two"], 1, thresholds=[0.5, 0.7, 0.5])
    assert a.labels == [("x", 0.9)] and a.to_dict()["labels"] == [{"label": "x", "p": 0.9}]
    assert b.labels == [] and b.to_dict()["labels"] == []
    [single] = decide(["x", "y", "z"], probs[:1], ["one"], 1)
    assert single.labels is None and "labels" not in single.to_dict()


# ---------------------------------------------------------------------- every road
def test_predict_api_cli_json_csv_and_retune(quad_run, quad_npz, tmp_path, capsys):
    x, y = quadrants(4, 7)
    files = []
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    preds = Classifier.load(quad_run).predict(files)
    assert all(p.labels is not None for p in preds)
    right = sum({c for c, _ in p.labels} == {NAMES[k] for k in np.nonzero(t)[0]} for p, t in zip(preds, y))
    assert right >= 3
    capsys.readouterr()
    assert main(["predict", str(quad_run), *files, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(isinstance(r["labels"], list) and all(set(e) == {"label", "p"} for e in r["labels"]) for r in rows)
    assert main(["predict", str(quad_run), files[0], "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("labels,labels_p,ood_score")  # per-label energy
    assert main(["thresholds", str(quad_run), "--data", str(quad_npz), "--target", "precision:0.9"]) == 0
    assert json.loads((quad_run / "model.json").read_text())["thresholds"]["target"] == "precision:0.9"
    assert main(["evaluate", str(quad_run), "--data", str(quad_npz), "--report", str(tmp_path / "rep")]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="pr-curves"' in html and "precision:0.9" in html


def test_serve_answers_label_set(quad_run):
    pytest.importorskip("fastapi")
    from imgcls.serve.app import create_app
    from tests.serving import local_client, png_bytes

    x, _ = quadrants(1, 9)
    with local_client(create_app(quad_run)) as client:
        r = client.post("/predict", files={"file": ("a.png", png_bytes(x[0]), "image/png")})
        assert r.status_code == 200 and isinstance(r.json()["labels"], list)
        assert client.get("/health").json()["task"] == "multi"


def test_onnx_export_parity_on_label_sets(quad_run, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", str(quad_run)]) == 0
    meta = json.loads((quad_run / "model.onnx.json").read_text())
    assert meta["task"] == "multi" and set(meta["thresholds"]) == set(NAMES)
    assert meta["parity"]["top1_agreement"] >= 0.999 and meta["parity"]["accuracy_is"] == "exact match"
    preds = Classifier.load(quad_run).predict(quadrants(3, 5)[0], backend="onnx")
    assert all(p.labels is not None for p in preds)


def test_explain_target_label(quad_run):
    x, _ = quadrants(1, 4)
    [e] = Classifier.load(quad_run).explain(x, target="br", faithfulness=False)
    assert e.target == "br" and e.attribution.shape == (16, 16)


def test_multilabel_model_without_thresholds_says_how(quad_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(quad_run, run)
    card = json.loads((run / "model.json").read_text())
    del card["thresholds"]
    (run / "model.json").write_text(json.dumps(card))
    preds = Classifier.load(run).predict(quadrants(1, 2)[0])
    assert preds[0].labels is not None
    assert "imgcls thresholds" in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_mosaics_learn(tmp_path):
    if not (SHARED / "mnist.npz").is_file():
        pytest.skip("shared data not present")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mosaics", Path(__file__).resolve().parents[1] / "bench"
                                                  / "multilabel_mosaics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.build(SHARED / "mnist.npz", tmp_path / "m.npz", 3000, 500)
    clf = Classifier.create("reference_cnn", classes=[str(i) for i in range(10)], in_chans=1, img_size=56, seed=0)
    clf.fit(str(path), epochs=6, batch_size=64, progress=False)
    assert clf.evaluate(str(path))["map_macro"] > 0.8


def test_single_label_only_features_refuse(quad_npz):
    from imgcls.data.audit import audit

    with pytest.raises(ImgclsError, match="imgcls audit checks single-label data"):
        audit(load_data(quad_npz, val_split=0.0))
    single = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16)
    with pytest.raises(ImgclsError, match="per-class thresholds are for multi-label models"):
        single.tune_thresholds(str(quad_npz))


# ---------------------------------------------------------------------- unknown rejection (per-label energy)
def test_joint_energy_is_the_sum_of_per_label_softplus():
    from imgcls.engine.ood import ood_scores

    z = np.array([[2.0, -1.0, 0.0], [-5.0, -5.0, -5.0]])
    s = ood_scores("energy", z, multi_label=True)
    assert np.allclose(s, -np.log1p(np.exp(z)).sum(1), atol=1e-6)
    assert s[1] > s[0]  # no label fits: more unusual
    with pytest.raises(ImgclsError, match="msp is a softmax score"):
        ood_scores("msp", z, multi_label=True)


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory) -> tuple[Path, Path]:
    """Quadrant data where every image holds at least one label (as in the mosaics), trained
    with --ood-method energy: an image with no bright square is out of distribution."""
    def nonempty(n, seed):
        x, y = quadrants(n, seed)
        empty = np.flatnonzero(y.sum(1) == 0)
        x2, y2 = quadrants(4 * len(empty) + 40, seed + 100)
        full = np.flatnonzero(y2.sum(1) > 0)[: len(empty)]
        x[empty], y[empty] = x2[full], y2[full]
        return x, y

    (x, y), (xt, yt) = nonempty(400, 20), nonempty(80, 21)
    root = tmp_path_factory.mktemp("mlood")
    np.savez(root / "quad1.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(NAMES))
    assert main(["train", "--data", str(root / "quad1.npz"), "--epochs", "3", "--batch-size", "32", "--out", str(root),
                 "--name", "o", "--precision", "fp32", "--ood-method", "energy"]) == 0
    return root / "o", root / "quad1.npz"


def test_per_label_unknown_on_every_road(ood_run, tmp_path, capsys):
    """calibrate --ood-method (alone: per-label energy) fits the threshold on val; API, CLI
    text/CSV/JSON, serve, part files and evaluate --ood all carry ood_score / unknown, with
    the label set kept as the guess; conformal sets stay refused."""
    import shutil

    trained, quad_npz = ood_run
    assert json.loads((trained / "model.json").read_text())["ood"]["method"] == "energy"  # train --ood-method
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["calibrate", str(run), "--data", str(quad_npz), "--ood-method"]) == 0
    ood = json.loads((run / "model.json").read_text())["ood"]
    assert ood["method"] == "energy" and "joint energy" in ood["score"] and ood["fitted_on"] == "val"
    clf = Classifier.load(run)
    _, _, val, _ = clf.eval_data(str(quad_npz), "val")
    with clf.predictor() as p:
        z, _ = p.run(val)
    accepted = (p.trust.scores(z) <= ood["threshold"]).mean()
    assert 0.9 <= accepted <= 1.0
    # out of distribution: no square at all (dim noise)
    (x, _), dim = quadrants(6, 11), np.random.default_rng(5).integers(0, 60, (6, 16, 16), dtype=np.uint8)
    files = []
    for i, img in enumerate([*x, *dim]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    preds = clf.predict(files, workers=0)
    assert all(p.ood_score is not None and p.unknown is not None and p.labels is not None for p in preds)
    assert all(p.unknown == (p.ood_score > ood["threshold"]) for p in preds)
    assert sum(p.unknown for p in preds[6:]) >= 4 and sum(p.unknown for p in preds[:6]) <= 2
    rejected = next(p for p in preds if p.unknown)
    d = rejected.to_dict()
    assert d["label"] == "unknown" and d["guess"] == rejected.guess and isinstance(d["labels"], list)
    capsys.readouterr()
    assert main(["predict", str(run), *files, "--json", "--workers", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["unknown"] for r in rows] == [p.unknown for p in preds] and all("labels" in r for r in rows)
    assert main(["predict", str(run), *files, "--format", "csv", "--workers", "0"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"labels", "guess", "unknown", "ood_score"} <= set(head)
    assert main(["predict", str(run), files[-1], "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert ("unknown (guess: " in text) == preds[-1].unknown and "ood " in text
    assert main(["predict", str(run), *files, "--output", str(tmp_path / "parts") + "/", "--part-format",
                 "jsonl", "--workers", "0"]) == 0
    part = [json.loads(line) for line in (tmp_path / "parts" / "part-00000-of-00001.jsonl").read_text().splitlines()]
    assert [r["unknown"] for r in part] == [p.unknown for p in preds] and all("labels" in r for r in part)
    capsys.readouterr()
    # evaluate --ood: AUROC of the per-label energy against the dim images
    np.savez(tmp_path / "dim.npz", x_test=np.random.default_rng(6).integers(0, 60, (60, 16, 16), dtype=np.uint8))
    assert main(["evaluate", str(run), "--data", str(quad_npz), "--ood", str(tmp_path / "dim.npz")]) == 0
    m = json.loads((run / "metrics.json").read_text())["ood"]
    assert m["method"] == "energy" and m["auroc"] > 0.8 and set(m["by_method"]) == {"energy"}
    assert "unknown vs dim" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(quad_npz), "--ood", str(tmp_path / "dim.npz"), "--report",
                 str(tmp_path / "rep")]) == 0
    assert 'id="ood-histogram"' in (tmp_path / "rep" / "report.html").read_text()
    if importlib.util.find_spec("pyarrow"):  # parquet part files carry the same columns
        import pyarrow.parquet as pq

        assert main(["predict", str(run), *files, "--output", str(tmp_path / "pq") + "/", "--workers", "0"]) == 0
        t = pq.read_table(tmp_path / "pq" / "part-00000-of-00001.parquet").to_pylist()
        assert [r["unknown"] for r in t] == [p.unknown for p in preds] and isinstance(t[0]["labels"], list)
    with pytest.raises(ImgclsError, match="conformal prediction sets .* single-label"):
        clf.calibrate(str(quad_npz), coverage=0.9, ood_method="energy")
    with pytest.raises(ImgclsError, match="msp is a softmax score"):
        clf.calibrate(str(quad_npz), ood_method="msp")
    with pytest.raises(ImgclsError, match=r"conformal prediction sets \(--sets\) is for single-label"):
        clf.predict(files[:1], sets=True, workers=0)


def test_layers_score_for_a_multi_label_model(ood_run, tmp_path, capsys):
    """The class-agnostic layers score fits a multi-label model too: noise images unknown."""
    import shutil

    trained, quad_npz = ood_run
    run = tmp_path / "layers"
    shutil.copytree(trained, run)
    assert main(["calibrate", str(run), "--data", str(quad_npz), "--ood-method", "layers"]) == 0
    assert "unknown threshold (layers)" in capsys.readouterr().out
    clf = Classifier.load(run)
    x, _ = quadrants(6, 11)
    noise = np.random.default_rng(5).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    preds = clf.predict(np.concatenate([x, noise]))
    assert all(p.labels is not None and p.unknown is not None for p in preds)
    assert sum(p.unknown for p in preds[6:]) >= 5 and sum(p.unknown for p in preds[:6]) <= 1


def test_serve_gives_multilabel_unknowns_and_train_refuses_sets(ood_run, quad_npz, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from imgcls.serve.app import create_app
    from tests.serving import local_client, png_bytes

    with local_client(create_app(ood_run[0])) as client:
        r = client.post("/predict", files={"file": ("a.png", png_bytes(np.full((16, 16), 20, np.uint8)), "image/png")})
        body = r.json()
        assert r.status_code == 200 and isinstance(body["labels"], list)
        assert isinstance(body["ood_score"], float) and body["unknown"] is True and body["label"] == "unknown"
        assert body["guess"] in NAMES
    assert main(["train", "--data", str(quad_npz), "--epochs", "1", "--out", str(tmp_path), "--name", "c",
                 "--conformal", "0.9"]) != 0
    assert "--conformal is for single-label data" in capsys.readouterr().err


def test_cf1_and_of1_are_the_literatures_not_the_mean_of_per_class_f1():
    """CF1 = 2 CP CR / (CP + CR) over the per-class averages (ML-GCN); the mean of the per-class
    F1 scores, which used to be reported as CF1, is macro_f1."""
    labels = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])
    probs = np.array([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1], [0.1, 0.1]])  # a: P 1, R 1/2; b: P 1/2, R 1
    m = multilabel_metrics(probs, labels, ["a", "b"], thresholds=[0.5, 0.5])
    assert m["cp"] == pytest.approx(0.75) and m["cr"] == pytest.approx(0.75)
    assert m["cf1"] == pytest.approx(0.75) and m["macro_f1"] == pytest.approx(2 / 3)
    assert m["op"] == pytest.approx(2 / 3) and m["or"] == pytest.approx(2 / 3) and m["of1"] == pytest.approx(2 / 3)
    none = multilabel_metrics(np.zeros((2, 2)), np.array([[1, 0], [0, 1]]), ["a", "b"])
    assert none["cf1"] == 0.0 and none["of1"] == 0.0 and none["macro_f1"] == 0.0


def test_pr_curves_with_dollar_class_names():
    """The legend's class names are text: '$5_$10' used to be parsed as mathtext and raise."""
    import io

    from imgcls.evaluation.multilabel import pr_curves_png

    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.8, 0.3], [0.2, 0.7], [0.6, 0.9], [0.1, 0.2]])
    png = pr_curves_png(multilabel_metrics(probs, labels, ["$5_$10", "cost $5 or $6"]))
    assert Image.open(io.BytesIO(png)).size[0] > 100
