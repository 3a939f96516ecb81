"""Trust at prediction time: conformal prediction sets and "unknown" (OOD) rejection, on every
road (API, CLI text/CSV/JSON, evaluate + report, serve). Small generated data, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.engine.conformal import (class_scores, conformal_quantile, fit_conformal, prediction_sets, 
                                     
                                     set_metrics)
from imgcls.engine.decisions import decide
from imgcls.engine.ood import fit_threshold, knn_distance, make_bank, ood_scores
from imgcls.engine.trust import Assessment
from imgcls.errors import ImgclsError
from imgcls.evaluation.trust import ood_metrics
from tests.conftest import pattern_images


# ---------------------------------------------------------------------- conformal: the maths
def _calibrated(n: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a calibrated model: the label is drawn from them."""
    logits = rng.normal(size=(n, k)) * 2.5
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) < rng.random((n, 1))).sum(1).clip(0, k - 1)
    return p, y


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_split_conformal_covers_at_the_promised_rate(method):
    """Averaged over many calibration/test draws, coverage is >= 0.9 and not much more
    (the guarantee: between 1 - alpha and 1 - alpha + 1/(n+1)). APS/RAPS: that holds for the
    randomised sets (a fresh u per test image); the served sets (u = 0) contain them, so they
    cover at least as often, never with an empty set."""
    rng = np.random.default_rng(0)
    covs, served = [], []
    for _ in range(60):
        p, y = _calibrated(700, 6, rng)
        c = fit_conformal(p[:200], y[:200], 0.9, method)
        args = (method, c.get("k_reg"), c.get("lambda", 0.0))
        sets = prediction_sets(p[200:], c["qhat"], *args)
        randomised = class_scores(p[200:], *args, u=rng.random((500, 1))) <= c["qhat"] + 1e-12
        covs.append(randomised[np.arange(500), y[200:]].mean())
        served.append(sets[np.arange(500), y[200:]].mean())
        assert (sets >= randomised).all()  # LAC: the same sets (u plays no part)
        assert method == "lac" or sets.any(1).all()
    assert 0.895 <= np.mean(covs) <= 0.915
    assert 0.895 <= np.mean(served) <= (0.915 if method == "lac" else 0.96)


def test_lac_and_aps_set_logic():
    p = np.array([[0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
    # LAC: every class with p >= 1 - q
    assert prediction_sets(p, 0.75, "lac").tolist() == [[True, True, False], [True, True, True]]
    # APS: the mass ranked above a class plus u times its own (u = 0 at prediction)
    assert np.allclose(class_scores(p, "aps")[0], [0, 0.6, 0.9])
    assert np.allclose(class_scores(p, "aps", u=0.5)[0], [0.3, 0.75, 0.95])
    assert prediction_sets(p, 0.6, "aps")[0].tolist() == [True, True, False]
    assert prediction_sets(p, None, "aps").all()  # too few calibration images: every class
    # the finite-sample quantile: ceil((n+1) 0.9)/n; with 5 scores 0.9 cannot be promised
    assert conformal_quantile(np.arange(1, 11) / 10, 0.8) == 0.9
    assert conformal_quantile(np.arange(5) / 5, 0.9) == float("inf")
    m = set_metrics(prediction_sets(p, 0.5, "aps"), np.array([0, 2]), ["a", "b", "c"])
    assert (m["coverage"], m["mean_set_size"]) == (0.5, 1.5) and m["per_class"]["c"]["coverage"] == 0.0
    with pytest.raises(ImgclsError, match="coverage"):
        fit_conformal(p, np.array([0, 1]), 1.5)


def test_raps_penalises_classes_ranked_below_k_reg_and_tunes_on_a_held_part():
    p = np.array([[0.5, 0.2, 0.2, 0.1]])
    aps = class_scores(p, "aps", u=0.5)[0]
    raps = class_scores(p, "raps", k_reg=2, lam=0.1, u=0.5)[0]
    # ranks 1..4 (ties kept in index order): penalty 0, 0, 0.1, 0.2
    assert np.allclose(raps - aps, [0, 0, 0.1, 0.2]) and np.isclose(aps[0], 0.25)
    rng = np.random.default_rng(3)
    probs, y = _calibrated(1000, 20, rng)
    c = fit_conformal(probs, y, 0.9, "raps")
    assert c["tuned_on_images"] == 300 and c["num_images"] == 700
    assert c["k_reg"] >= 1 and c["lambda"] in (0.001, 0.01, 0.1, 0.2, 0.5)
    ranks = (probs > probs[np.arange(1000), y][:, None]).sum(1) + 1
    assert c["k_reg"] <= np.quantile(ranks, 0.97)  # the 0.9 quantile of the true class's rank (of a 30% part)
    # on a flat-tailed 20-class model the penalty keeps sets no larger than APS's on average
    probs2, y2 = _calibrated(2000, 20, rng)
    a = fit_conformal(probs, y, 0.9, "aps")
    size = {m: prediction_sets(probs2, f["qhat"], m, f.get("k_reg"), f.get("lambda", 0.0)).sum(1).mean()
            for m, f in (("aps", a), ("raps", c))}
    assert size["raps"] <= size["aps"] * 1.05


# ---------------------------------------------------------------------- OOD: the maths
def test_ood_threshold_accepts_the_target_fraction_and_metrics_match_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(0, 1, 2000), rng.normal(1.5, 1, 1000)
    t = fit_threshold(id_s, 0.95)
    assert abs((id_s <= t).mean() - 0.95) < 0.002
    # the same images as the quantile accepts, and none on the threshold (no float-noise ties)
    assert (id_s <= t).sum() == (id_s <= np.quantile(id_s, 0.95, method="inverted_cdf")).sum()
    assert np.abs(id_s - t).min() > 1e-6
    assert fit_threshold(np.array([0.0, 1.0, 1.0, 2.0]), 0.5) == 1.5
    m = ood_metrics(id_s, ood_s, t)
    y = np.r_[np.zeros(2000), np.ones(1000)]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-5)
    # FPR95 by hand: the OOD fraction accepted at the threshold accepting 95% of ID
    assert m["fpr95"] == pytest.approx((ood_s <= np.quantile(id_s, 0.95)).mean(), abs=2e-3)
    fpr, tpr, _ = roc_curve(1 - y, -np.r_[id_s, ood_s])
    assert m["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-9)
    assert m["id_accepted"] >= 0.95 and 0 < m["ood_rejected"] < 1


def test_ood_scores_point_the_same_way():
    logits = np.array([[8.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    for method in ("msp", "energy"):
        s = ood_scores(method, logits)
        assert s[1] > s[0]  # the unsure row is more unusual
    bank = make_bank(np.eye(3)[np.repeat([0, 1], 50)])
    d = knn_distance(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), bank, k=5)
    assert d[0] < 1e-3 and d[1] == pytest.approx(np.sqrt(2), abs=1e-2)
    with pytest.raises(ImgclsError, match="penultimate features"):
        ood_scores("knn", logits)


def test_mahalanobis_and_react_fit_from_training_features():
    import torch

    from imgcls.engine.ood import fit_stats

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    f = (np.abs(rng.normal(size=(600, 8))) + 3 * np.eye(8)[y]).astype(np.float32)

    class Net(torch.nn.Module):  # a linear head with an output scale, as airbench has
        def __init__(self):
            super().__init__()
            self.fc, self.scaling_factor = torch.nn.Linear(8, 3), 0.5

        def get_classifier(self):
            return self.fc

    net = Net()
    z = (net.fc(torch.from_numpy(f)) * 0.5).detach().numpy()
    far = np.full((4, 8), 9.0, np.float32)
    maha = fit_stats("mahalanobis", f, y)
    assert maha["means"].shape == (3, 8) and maha["precision"].shape == (8, 8)
    s_id, s_far = ood_scores("mahalanobis", z[:50], f[:50], maha), ood_scores("mahalanobis", z[:4], far, maha)
    assert s_far.min() > np.quantile(s_id, 0.99)
    react = fit_stats("react", f, y, model=net, logits=z)
    assert float(react["clip"]) == pytest.approx(np.quantile(f, 0.9), rel=1e-3)
    # below the clip value ReAct is the energy of the network's own logits
    low = f.clip(max=float(react["clip"]))
    zl = (net.fc(torch.from_numpy(low)) * 0.5).detach().numpy()
    assert np.allclose(ood_scores("react", zl, low, react), ood_scores("energy", zl), atol=1e-4)
    net.fc = torch.nn.Sequential(net.fc)
    with pytest.raises(ImgclsError, match="react clips the features before a linear classifier"):
        fit_stats("react", f, y, model=net, logits=z)


def test_decide_carries_trust_fields():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    a = Assessment(np.array([0.1, 2.0]), np.array([False, True]), np.array([[True, False, False], [True, True, True]]))
    p1, p2 = decide(["a", "b", "c"], probs, ["x", "y"], 1, assessment=a)
    assert p1.to_dict() == {"source": "x", "label": "a", "top": [{"class": "a", "probability": 0.7}],
                            "ood_score": 0.1, "unknown": False, "guess": "a", "set": ["a"]}
    assert (p2.label, p2.guess, p2.unknown, p2.set) == ("unknown", "a", True, ["a", "b", "c"])


def test_layer_stats_hook_the_early_plain_convolutions():
    import torch

    from imgcls.engine.layer_stats import LayerStats, stat_layers
    from imgcls.models import create_model

    air = create_model("airbench", num_classes=10, in_chans=3, img_size=32)
    convs = [m for m in air.modules() if isinstance(m, torch.nn.Conv2d)]
    assert stat_layers(air) == convs[3:5]  # 7 convolutions (whitening included): those at 1/2 and 2/3 of the depth
    ref = create_model("reference_cnn", num_classes=3, in_chans=1, img_size=16)
    assert stat_layers(ref) == [ref.features[3]]  # two: none in the middle, the one nearest it
    x = torch.rand(5, 1, 16, 16)
    with LayerStats(ref) as hooks:
        ref(x)
        s = hooks.take()
    a = ref.features[3](ref.features[:3](x))
    assert s.shape == (5, 128) and torch.allclose(s[:, :64], a.mean((2, 3)), atol=1e-5)
    assert torch.allclose(s[:, 64:], a.std((2, 3), correction=0), atol=1e-5)
    assert not ref.features[3]._forward_hooks  # removed on leaving


def test_layers_score_flags_images_whose_early_statistics_are_unlike_training():
    """Penultimate kNN cannot tell these apart (same features); the block statistics can."""
    import torch

    from imgcls.engine.ood import fit_stats, layer_scores

    rng = np.random.default_rng(0)
    pen = rng.normal(size=(400, 6)).astype(np.float32)
    st = rng.normal(size=(400, 4)).astype(np.float32) @ np.diag([1.0, 2.0, 0.5, 1.0]).astype(np.float32)

    class Net(torch.nn.Module):  # stat_layers: one conv of 2 channels -> 4 statistics
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

    stats = fit_stats("layers", np.c_[pen, st], model=Net())
    assert stats["dims"].tolist() == [6, 4] and stats["precision0"].shape == (4, 4)
    assert len(stats["features"]) == 200  # one half fits, the other standardises
    id_rows = np.c_[pen[:50], st[:50]]
    odd = np.c_[pen[:50], st[:50] + 6.0]  # same penultimate features, shifted statistics
    s_id = ood_scores("layers", np.zeros((50, 3)), id_rows, stats)
    s_odd = ood_scores("layers", np.zeros((50, 3)), odd, stats)
    assert s_odd.min() > np.quantile(s_id, 0.95)
    assert np.allclose(ood_scores("knn", np.zeros((50, 3)), pen[:50], stats["features"]),
                       ood_scores("knn", np.zeros((50, 3)), odd[:, :6], stats["features"]))
    z = layer_scores(id_rows, stats)  # standardised: about mean 0, spread 1 on training-like rows
    assert z.shape == (50, 2) and float(z.mean().abs()) < 1.0
    with pytest.raises(ImgclsError, match="expects 10 features per image"):
        ood_scores("layers", np.zeros((2, 3)), pen[:2], stats)


# ---------------------------------------------------------------------- every road
def write_trust_data(root):
    """``root/d.npz`` (60 train / 20 test pattern images of classes a, b, c) and ``root/noise.npz``
    (40 noise images, for unknown rejection); returns ``root``."""
    x, y = pattern_images(60, size=16)
    xt, yt = pattern_images(20, size=16, seed=1)
    np.savez(root / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c"]))
    noise = np.random.default_rng(0).integers(0, 256, (40, 16, 16), dtype=np.uint8)
    np.savez(root / "noise.npz", x_test=noise)
    return root


@pytest.fixture(scope="module")
def trust_run(tmp_path_factory):
    """A tiny run trained with --conformal 0.9 --ood-method energy, plus an untouched copy."""
    from imgcls import train

    root = write_trust_data(tmp_path_factory.mktemp("trust"))
    plain = train({"data": str(root / "d.npz"), "epochs": 2, "batch_size": 16, "out": str(root / "runs"),
                   "name": "plain", "seed": 0}, progress=False)
    r = train({"data": str(root / "d.npz"), "epochs": 2, "batch_size": 16, "out": str(root / "runs"),
               "name": "trust", "seed": 0, "conformal": 0.9, "ood_method": "energy"}, progress=False)
    return r.run_dir, plain.run_dir, root


def test_training_step_stores_sets_and_threshold(trust_run):
    run, _, _ = trust_run
    card = json.loads((run / "model.json").read_text())
    assert card["conformal"]["coverage"] == 0.9 and card["conformal"]["method"] == "aps"
    assert card["conformal"]["num_images"] == 15  # 10% of each class of the 162 training images, never trained on
    assert card["ood"]["method"] == "energy" and card["ood"]["fitted_on"] == "val"
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["evaluation"]["conformal"]["coverage"] <= 1


def test_predict_cli_every_format_shows_set_and_unknown(trust_run, tmp_path, capsys):
    from PIL import Image

    run, _, _ = trust_run
    x, _ = pattern_images(1, size=16)
    Image.fromarray(x[0]).save(tmp_path / "ok.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "odd.png")
    assert main(["predict", str(run), str(tmp_path), "--format", "json", "--top-k", "2"]) == 0
    rows = {Path(r["source"]).name: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        assert {"ood_score", "unknown", "guess", "set"} <= set(r) and isinstance(r["set"], list)
        assert r["label"] == ("unknown" if r["unknown"] else r["guess"])
    assert main(["predict", str(run), str(tmp_path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "source,label,probability,guess,unknown,ood_score,set"
    assert main(["predict", str(run), str(tmp_path / "ok.png")]) == 0
    assert "set {" in capsys.readouterr().out
    assert main(["predict", str(run), str(tmp_path / "ok.png"), "--no-sets", "--json"]) == 0
    assert "set" not in json.loads(capsys.readouterr().out)


def test_part_files_honour_the_trust_flags(trust_run, tmp_path, capsys):
    """`predict --output DIR/` (part files) takes --no-sets / --no-reject-unknown / --sets /
    --reject-unknown as the one-file output does (they used to be ignored)."""
    import argparse

    from PIL import Image

    from imgcls.cli.predict import add_arguments
    from imgcls.cli.predict_parts import _argv

    run, plain, _ = trust_run
    x, _ = pattern_images(1, size=16)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(x[0]).save(imgs / "ok.png")

    def rows(out: Path, *flags: str) -> list[dict]:
        assert main(["predict", str(run), str(imgs), "--output", f"{out}/", "--part-format", "jsonl", *flags]) == 0
        return [json.loads(line) for line in next(out.glob("part-*.jsonl")).read_text().splitlines()]

    [full] = rows(tmp_path / "full")
    assert {"set", "unknown", "guess", "ood_score"} <= set(full)
    [bare] = rows(tmp_path / "bare", "--no-sets", "--no-reject-unknown")
    assert "ood_score" in bare and not {"set", "unknown", "guess"} & set(bare)
    [no_sets] = rows(tmp_path / "no_sets", "--no-sets", "--reject-unknown")
    assert "set" not in no_sets and "unknown" in no_sets
    capsys.readouterr()
    assert main(["predict", str(plain), str(imgs), "--output", f"{tmp_path / 'p'}/", "--sets"]) == 1
    assert "conformal prediction sets" in capsys.readouterr().err  # required but missing: refused
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(run), str(imgs), "--output", "o/", "--no-sets", "--reject-unknown"])
    assert {"--no-sets", "--reject-unknown"} <= set(_argv(args))  # what each torchrun process is given
    assert "--sets" not in _argv(parser.parse_args([str(run), str(imgs), "--output", "o/"]))


def test_an_old_model_names_the_command_that_adds_them(trust_run, tmp_path, capsys):
    from PIL import Image

    _, plain, _ = trust_run
    Image.new("L", (16, 16), 30).save(tmp_path / "x.png")
    for flag, what in (("--sets", "conformal prediction sets"), ("--reject-unknown", "unknown threshold")):
        assert main(["predict", str(plain), str(tmp_path / "x.png"), flag]) == 1
        err = capsys.readouterr().err.strip()
        assert what in err and f"imgcls calibrate {plain} --data DATA" in err and err.count("\n") == 0
    assert main(["predict", str(plain), str(tmp_path / "x.png"), "--json"]) == 0  # the score alone is always there
    d = json.loads(capsys.readouterr().out)
    assert "ood_score" in d and "set" not in d and "unknown" not in d


def test_calibrate_cli_adds_sets_and_knn_to_an_old_model(trust_run, tmp_path, capsys):
    import shutil

    from imgcls.api import Classifier

    _, plain, root = trust_run
    run = tmp_path / "old"
    shutil.copytree(plain, run)
    assert main(["calibrate", str(run), "--data", str(root / "d.npz"), "--coverage", "0.8", "--method", "lac",
                 "--ood-method", "knn"]) == 0
    out = capsys.readouterr().out
    assert "conformal sets (lac)" in out and "unknown threshold (knn)" in out
    assert (run / "ood_features.safetensors").is_file()
    clf = Classifier.load(run)
    assert clf.card["conformal"]["coverage"] == 0.8 and clf.card["ood"]["bank_images"] == 162
    [p] = clf.predict(pattern_images(1, size=16)[0][:1])
    assert p.set is not None and p.unknown is not None and p.ood_score >= 0
    # evaluate --ood: metrics.json gets conformal.* and ood.* (every method's AUROC too)
    assert main(["evaluate", str(run), "--data", str(root / "d.npz"), "--ood", str(root / "noise.npz")]) == 0
    assert "AUROC" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert {"coverage", "mean_set_size", "per_class"} <= set(m["conformal"])
    assert m["ood"]["method"] == "knn" and 0 <= m["ood"]["auroc"] <= 1 and "fpr95" in m["ood"]
    assert set(m["ood"]["by_method"]) == {"msp", "energy", "knn"}
    # the report shows both pictures
    assert main(["evaluate", str(run), "--data", str(root / "d.npz"), "--ood", str(root / "noise.npz"),
                 "--report", str(tmp_path / "rep"), "--mistakes", "0"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="conformal"' in page and 'id="ood-histogram"' in page
    # serve batches [logits | features] rows for the kNN score
    from imgcls.serve.app import create_app
    from tests.serving import local_client, png_bytes

    with local_client(create_app(run)) as client:
        body = client.post("/predict", files={"file": ("x.png", png_bytes(pattern_images(1, size=16)[0][0]),
                                                       "image/png")}).json()
    assert body["ood_score"] >= 0 and isinstance(body["set"], list) and "unknown" in body


def test_calibrate_on_a_set_of_its_own_and_knn_needs_training_images(trust_run, tmp_path, capsys):
    import shutil

    _, plain, root = trust_run
    run = tmp_path / "own"
    shutil.copytree(plain, run)
    assert main(["calibrate", str(run), "--data", str(root / "noise.npz"), "--split", "all", "--coverage", "0.9",
                 "--no-temperature"]) == 1  # unlabelled images cannot calibrate
    capsys.readouterr()
    xt, yt = pattern_images(20, size=16, seed=3)
    np.savez(tmp_path / "cal.npz", x_test=xt, y_test=yt, x_train=xt, y_train=yt, class_names=np.array(["a", "b", "c"]))
    assert main(["calibrate", str(run), "--data", str(tmp_path / "cal.npz"), "--split", "all", "--coverage", "0.9"]) == 0
    card = json.loads((run / "model.json").read_text())
    assert card["conformal"]["num_images"] == 60 and card["conformal"]["fitted_on"] == "test"
    np.savez(tmp_path / "folder_like.npz", x_train=xt, y_train=yt, class_names=np.array(["a", "b", "c"]))
    assert main(["calibrate", str(run), "--data", str(tmp_path / "folder_like.npz"), "--split", "all",
                 "--ood-method", "knn"]) == 1  # every image calibrates: none is left to stand for training
    err = capsys.readouterr().err.strip()
    assert "knn stores features of training images" in err and err.count("\n") == 0


def test_layers_score_on_every_road(trust_run, tmp_path, capsys):
    import shutil

    from imgcls.api import Classifier
    from imgcls.serve.app import create_app
    from tests.serving import local_client, png_bytes

    _, plain, root = trust_run
    run = tmp_path / "layers"
    shutil.copytree(plain, run)
    assert main(["calibrate", str(run), "--data", str(root / "d.npz"), "--ood-method", "layers"]) == 0
    assert "unknown threshold (layers)" in capsys.readouterr().out
    clf = Classifier.load(run)
    assert clf.card["ood"]["method"] == "layers" and clf.card["ood"]["layers"] == ["features.3"]
    x = pattern_images(2, size=16)[0]
    noise = np.random.default_rng(5).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    got = clf.predict(np.concatenate([x, noise]))
    assert all(p.unknown is not None for p in got)
    assert min(p.ood_score for p in got[-4:]) > max(p.ood_score for p in got[:6])  # noise is unlike the patterns
    assert main(["evaluate", str(run), "--data", str(root / "d.npz"), "--ood", str(root / "noise.npz")]) == 0
    capsys.readouterr()
    m = json.loads((run / "metrics.json").read_text())
    assert m["ood"]["method"] == "layers" and m["ood"]["auroc"] > 0.9
    assert set(m["ood"]["by_method"]) == {"msp", "energy", "layers"}
    with local_client(create_app(run)) as client:
        body = client.post("/predict", files={"file": ("x.png", png_bytes(noise[0]), "image/png")}).json()
    assert body["ood_score"] == pytest.approx(got[-4].ood_score, rel=1e-3, abs=1e-3) and "unknown" in body


def test_knn_refuses_the_onnx_backend_clearly(trust_run, tmp_path):
    import shutil

    from imgcls.api import Classifier
    from imgcls.engine.predictor import Predictor

    _, plain, root = trust_run
    run = tmp_path / "knn"
    shutil.copytree(plain, run)
    clf = Classifier.load(run)
    clf.calibrate(str(root / "d.npz"), ood_method="knn")

    class Logits:  # an ONNX-like backend: logits only
        name = "onnx"

        def logits(self, x):
            return np.zeros((len(x), 3), np.float32)

        def outputs(self, x):
            from imgcls.engine.backends import OnnxBackend

            return OnnxBackend.outputs(self, x)

        path = Path("model.onnx")

    p = Predictor.over(clf, Logits())
    with pytest.raises(ImgclsError, match="penultimate features") as e:
        p.packed(pattern_images(1, size=16)[0][:1][:, None].repeat(1, 1))
    assert "--backend torch" in str(e.value)


def test_serve_answers_with_set_and_unknown(trust_run):
    from imgcls.serve.app import create_app
    from tests.serving import local_client, png_bytes

    run, _, _ = trust_run
    with local_client(create_app(run)) as client:
        r = client.post("/predict", files={"file": ("x.png", png_bytes(pattern_images(1, size=16)[0][0]), "image/png")})
        body = r.json()
        assert r.status_code == 200 and {"ood_score", "unknown", "guess", "set"} <= set(body)
        page = client.get("/static/app.js").text
        assert "pred.set" in page and "pred.unknown" in page


@pytest.mark.parametrize("tta", ["none", "flip-shift"])
def test_features_come_from_the_same_pass_as_the_logits(tta):
    """The torch backend's (logits, features) give exactly its logits(), TTA included."""
    import torch

    from imgcls.api import Classifier
    from imgcls.engine.backends import TorchBackend

    clf = Classifier.create("reference_cnn", num_classes=3, in_chans=1, img_size=16, seed=0)
    b = TorchBackend(clf.model, clf.preprocessing, "cpu", "fp32", tta)
    x = torch.from_numpy(pattern_images(2, size=16)[0][:, None])
    z, f = b.outputs(x)
    assert np.allclose(z, b.logits(x), atol=1e-5) and f.shape == (6, 64)
    zl, fl = b.outputs(x, layers=True)  # the layers score: block statistics after the same features
    assert np.allclose(zl, z, atol=1e-5) and fl.shape == (6, 64 + 128) and np.allclose(fl[:, :64], f, atol=1e-5)


@pytest.mark.slow
def test_mnist_subset_sets_cover_and_inverted_digits_are_unknown(shared_data, tmp_path):
    """Real digits: a short run with --conformal 0.9 --ood-method knn, evaluated on 2,000 test
    digits against 2,000 inverted ones."""
    from imgcls import train

    d = np.load(shared_data / "mnist.npz", allow_pickle=False)
    np.savez(tmp_path / "m.npz", x_train=d["x_train"][:6000], y_train=d["y_train"][:6000],
             x_test=d["x_test"][:2000], y_test=d["y_test"][:2000])
    np.savez(tmp_path / "inv.npz", x_test=255 - d["x_test"][2000:4000])
    r = train({"data": str(tmp_path / "m.npz"), "model": "reference_cnn", "epochs": 2, "out": str(tmp_path / "runs"),
               "conformal": 0.9, "ood_method": "knn", "seed": 0}, progress=False)
    assert main(["evaluate", str(r.run_dir), "--data", str(tmp_path / "m.npz"), "--ood", str(tmp_path / "inv.npz")]) == 0
    m = json.loads((r.run_dir / "metrics.json").read_text())
    # sets are never empty, so a model more accurate than the target covers at least its accuracy
    assert m["conformal"]["coverage"] >= min(0.9, m["evaluation"]["accuracy"]) - 0.04 and m["conformal"]["empty_sets"] == 0
    assert m["conformal"]["mean_set_size"] < 2
    assert m["ood"]["auroc"] > 0.7 and 0.9 <= m["ood"]["id_accepted"] <= 1
    knn = m["ood"]["auroc"]
    # a bare --ood-method fits the layers score (the best on docs/benchmarks.md): better than kNN here too
    assert main(["calibrate", str(r.run_dir), "--data", str(tmp_path / "m.npz"), "--ood-method"]) == 0
    assert main(["evaluate", str(r.run_dir), "--data", str(tmp_path / "m.npz"), "--ood", str(tmp_path / "inv.npz")]) == 0
    m = json.loads((r.run_dir / "metrics.json").read_text())
    assert m["ood"]["method"] == "layers" and m["ood"]["auroc"] > max(0.95, knn)
