"""imgcls train --unlabeled: pseudo-labels from a teacher, FixMatch consistency in the one
training loop, and the --time-budget they are compared at."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from imgcls.cli import main
from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.data.transforms import BatchAugment, Preprocessing, StrongAugment
from imgcls.engine.consistency import FixMatch, confidence_threshold
from imgcls.engine.optim import build_scheduler
from imgcls.engine.trainer import FitSettings, Trainer
from tests.conftest import pattern_images


def _npz(tmp_path, n=12, channels=1, pool=30):
    x, y = pattern_images(n, size=16, channels=channels)
    xt, yt = pattern_images(10, size=16, seed=1, channels=channels)
    np.savez(tmp_path / "lab.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    xu, _ = pattern_images(pool, size=16, seed=2, channels=channels)
    np.savez(tmp_path / "pool.npz", x_unlabeled=xu)
    return tmp_path / "lab.npz", tmp_path / "pool.npz"


def test_unlabeled_pool_adds_confident_pseudo_labels(tmp_path, capsys):
    lab, pool = _npz(tmp_path)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "pseudo",
                 "--epochs", "6", "--batch-size", "8", "--pseudo-threshold", "0.6", "--out", str(tmp_path / "runs"),
                 "--name", "semi"]) == 0
    m = json.loads((tmp_path / "runs" / "semi" / "metrics.json").read_text())
    note = next(n for n in m["training"]["data_notes"] if n.startswith("semi-supervised"))
    n_pseudo = int(note.split()[1])
    labelled = int(note.split()[-3])  # "... joined the 33 labelled ones"
    assert 0 < n_pseudo <= 90 and labelled < 36 and m["training"]["train_images"] == labelled + n_pseudo
    assert "fixmatch" not in m["training"]  # pseudo only: no consistency term
    # the student's recipe line says it trains on more than the labelled images it was chosen for
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("recipe ")]
    assert len(lines) == 2 and f"the student trains on {labelled + n_pseudo:,})" in lines[1], lines


def test_pseudo_rounds_relabel_the_pool_with_each_rounds_student(tmp_path, capsys):
    lab, pool = _npz(tmp_path)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "pseudo", "--pseudo-rounds", "2",
                 "--epochs", "4", "--batch-size", "8", "--pseudo-threshold", "0.6", "--out", str(tmp_path / "runs"),
                 "--name", "r2"]) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "runs" / "r2" / "metrics.json").read_text())
    notes = [n for n in m["training"]["data_notes"] if n.startswith("semi-supervised")]
    assert [" of round 1 " in notes[0], " of round 2 " in notes[1], len(notes)] == [True, True, 2]
    n1, n2 = (int(n.split()[1]) for n in notes)
    labelled = int(notes[0].split()[-3])
    # round 2's teacher is round 1's student: the labelled images and round 1's pseudo-labels
    assert f"teacher of round 2/2 on {labelled + n1} images" in err
    assert f"teacher of round 1/2 on {labelled} images" in err
    assert m["training"]["train_images"] == labelled + n2  # the student learns from the last teacher only
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--pseudo-rounds", "0",
                 "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pseudo-rounds" in err[0] and "1 to 10" in err[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_fixmatch_trains_on_the_pool_in_the_training_loop(tmp_path, capsys, channels):
    lab, pool = _npz(tmp_path, channels=channels)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "fixmatch", "--mu", "3",
                 "--epochs", "3", "--batch-size", "8", "--pseudo-threshold", "0.5", "--out", str(tmp_path / "runs"),
                 "--name", "fm"]) == 0
    run = tmp_path / "runs" / "fm"
    tr = json.loads((run / "metrics.json").read_text())["training"]
    assert tr["train_images"] == 33  # the pool never joins the training split: it trains through the loss
    assert tr["fixmatch"]["unlabeled_images"] == 90 and tr["fixmatch"]["mu"] == 3
    assert 0.0 <= tr["fixmatch"]["last_epoch_mask"] <= 1.0
    assert "unlabeled_mask" in (run / "history.csv").read_text().splitlines()[0]
    assert "FixMatch consistency on 90 unlabelled images, 24 per step" in capsys.readouterr().err


def _tiny_trainer(fixmatch, augment=None, budget=None, epochs=2):
    torch.manual_seed(0)
    x, y = pattern_images(8, size=8)
    split = Split(labels=torch.from_numpy(y), images=torch.from_numpy(x)[:, None])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    model.num_classes = 3
    pre = Preprocessing(img_size=8, in_chans=1, mean=(0.5,), std=(0.25,))
    s = FitSettings(epochs=epochs, lr=0.05, optimizer="sgd", schedule="constant", warmup_epochs=0,
                    time_budget_s=budget)
    tr = Trainer(model, pre, s, torch.device("cpu"), None, batch_augment=augment, channels_last=False,
                 fixmatch=fixmatch)
    state = tr.fit(Batches(split, 6, shuffle=True, seed=0, drop_last=True))
    return model, state


def _pool_fixmatch(threshold):
    xu, _ = pattern_images(10, size=8, seed=3)
    pool = Split(labels=torch.zeros(len(xu), dtype=torch.long), images=torch.from_numpy(xu)[:, None])
    return FixMatch(Batches(pool, 12, shuffle=True, seed=1, drop_last=True), BatchAugment(1, True),
                    StrongAugment("randaugment"), threshold=threshold)


def test_fixmatch_term_is_the_masked_strong_view_loss():
    # never confident (threshold above 1): the unlabelled images add nothing - the weights are
    # those of labelled-only training (a model without BatchNorm; up to float rounding of the larger matmul)
    plain, _ = _tiny_trainer(None)
    masked, state = _tiny_trainer(_pool_fixmatch(1.01))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.state_dict().values(), masked.state_dict().values()))
    assert state.history[-1]["unlabeled_mask"] == 0.0
    # always confident: every strong view trains, the weights move differently
    used, state = _tiny_trainer(_pool_fixmatch(0.0))
    assert state.history[-1]["unlabeled_mask"] == 1.0
    assert (plain[1].weight - used[1].weight).abs().max() > 1e-3
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    label, mask = FixMatch.targets(logits, 0.9)
    assert label.tolist() == [0, 0] and mask.tolist() == [1.0, 0.0]
    # label smoothing 0.2 over 10 classes trains towards 0.82 at most: 0.95 of that is the bar
    assert confidence_threshold(0.95, 0.2, 10) == pytest.approx(0.779) and confidence_threshold(0.95, 0.0, 3) == 0.95


def test_fixmatch_cycles_the_pool_across_epochs():
    fm = _pool_fixmatch(0.5)  # 30 images, 12 per batch: 2 batches per pool epoch
    seen = [fm.next_batch() for _ in range(5)]
    assert all(b.shape == (12, 1, 8, 8) for b in seen) and fm._epoch == 3


def test_strong_augment_keeps_shape_and_cuts_out_a_square():
    x = torch.full((6, 3, 16, 16), 200, dtype=torch.uint8)
    x[:, :, ::2] = 30
    out = StrongAugment("randaugment")(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert all((img == 127).all(0).sum() >= 16 for img in out)  # a grey Cutout square in every image
    gray = StrongAugment("trivialaugment")(x[:, :1], torch.Generator().manual_seed(0))
    assert gray.shape == (6, 1, 16, 16)


def test_time_budget_stops_training_and_drives_the_schedule():
    _, state = _tiny_trainer(None, budget=1e-6, epochs=50)
    assert len(state.history) == 1 and state.stop_reason.startswith("time budget of")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    clock = {"t": 0.0}
    sched = build_scheduler(opt, "linear", total_steps=1000, warmup_steps=0, progress=lambda: clock["t"])
    clock["t"] = 0.75
    opt.step()
    sched.step()  # step 1 of 1000, but three quarters of the budget spent: the lr follows the clock
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_pseudo_labels_share_the_time_budget(tmp_path, capsys):
    lab, pool = _npz(tmp_path)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "pseudo", "--time-budget", "0.2",
                 "--epochs", "3", "--batch-size", "8", "--out", str(tmp_path / "runs"), "--name", "b"]) == 0
    tr = json.loads((tmp_path / "runs" / "b" / "metrics.json").read_text())["training"]
    assert 0.2 * 0.2 <= tr["time_budget_min"] < 0.2  # the student trains for what the teacher left
    assert "min left of the budget" in capsys.readouterr().err


def test_unlabeled_bad_input_is_one_line(tmp_path, capsys):
    x, y = pattern_images(6, size=16)
    np.savez(tmp_path / "lab.npz", x_train=x, y_train=y)
    (tmp_path / "empty").mkdir()
    xu, _ = pattern_images(4, size=20)
    np.savez(tmp_path / "big.npz", x_unlabeled=xu)
    for semi in ("pseudo", "fixmatch"):
        assert main(["train", "--data", str(tmp_path / "lab.npz"), "--unlabeled", str(tmp_path / "empty"),
                     "--semi", semi, "--epochs", "1", "--out", str(tmp_path / "runs")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no images" in err[0]
        assert main(["train", "--data", str(tmp_path / "lab.npz"), "--unlabeled", str(tmp_path / "big.npz"),
                     "--semi", semi, "--epochs", "1", "--out", str(tmp_path / "runs")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "same shape" in err[0]
    assert main(["train", "--data", str(tmp_path / "lab.npz"), "--mu", "0", "--out", str(tmp_path / "runs")]) == 1
    assert "mu" in capsys.readouterr().err


def test_fixmatch_refuses_multi_label_data_in_one_line(tmp_path, capsys):
    x, y = pattern_images(8, size=16)
    multi = np.eye(3, dtype=np.int64)[y]
    multi[::2, (y[::2] + 1) % 3] = 1  # every other image has two labels
    np.savez(tmp_path / "multi.npz", x_train=x, y_train=multi)
    xu, _ = pattern_images(3, size=16, seed=2)
    np.savez(tmp_path / "pool.npz", x_unlabeled=xu)
    assert main(["train", "--data", str(tmp_path / "multi.npz"), "--unlabeled", str(tmp_path / "pool.npz"),
                 "--semi", "fixmatch", "--epochs", "1", "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not train on multi-label data" in err[0] and "--semi pseudo" in err[0]


def test_class_balanced_pseudo_selection_keeps_each_classes_most_confident():
    from imgcls.curation.semi import select_pseudo
    # the teacher predicts class 0 for 5 images (4 above 0.8), class 1 for 3 (none above), class 2 for 2
    probs = np.array([[.95, .03, .02], [.9, .05, .05], [.85, .1, .05], [.82, .1, .08], [.5, .3, .2],
                      [.2, .7, .1], [.1, .6, .3], [.3, .4, .3], [.1, .05, .85], [.2, .1, .7]])
    plain = select_pseudo(probs, 0.8)
    assert np.nonzero(plain)[0].tolist() == [0, 1, 2, 3, 8]
    bal = select_pseudo(probs, 0.8, balance=True)  # 5 in total -> ceil(5 / 3) = 2 per class, most confident
    assert np.nonzero(bal)[0].tolist() == [0, 1, 5, 6, 8, 9]
    assert np.nonzero(select_pseudo(probs, 0.8, balance=True, exclude=[0, 5]))[0].tolist() == [1, 2, 6, 7, 8, 9]
    assert not select_pseudo(probs, 0.99, balance=True).any()  # nothing confident: nothing to balance


def test_pseudo_balance_flag_balances_the_pseudo_labelled_set(tmp_path, capsys):
    lab, pool = _npz(tmp_path)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "pseudo", "--pseudo-balance",
                 "--epochs", "6", "--batch-size", "8", "--pseudo-threshold", "0.6", "--out", str(tmp_path / "runs"),
                 "--name", "bal"]) == 0
    m = json.loads((tmp_path / "runs" / "bal" / "metrics.json").read_text())
    note = next(n for n in m["training"]["data_notes"] if n.startswith("semi-supervised"))
    assert "class-balanced:" in note and "per class at most" in note
    n_pseudo, labelled = int(note.split()[1]), int(note.split()[-3])
    assert m["training"]["train_images"] == labelled + n_pseudo > labelled


@pytest.mark.parametrize("student", ["fresh", "teacher"])
def test_pseudo_student_starts_from_the_teachers_weights_when_asked(tmp_path, capsys, monkeypatch, student):
    from imgcls.api import Classifier
    from imgcls.engine import distributed as D

    seen = []  # (weights at the start of fit, at its end) for the teacher, then the student
    fit = Classifier.fit

    def recording_fit(self, *a, **k):
        start = D.weights_digest(self.model)
        out = fit(self, *a, **k)
        seen.append((start, D.weights_digest(self.model)))
        return out

    monkeypatch.setattr(Classifier, "fit", recording_fit)
    lab, pool = _npz(tmp_path)
    assert main(["train", "--data", str(lab), "--unlabeled", str(pool), "--semi", "pseudo", "--pseudo-student", student,
                 "--epochs", "3", "--batch-size", "8", "--pseudo-threshold", "0.6", "--out", str(tmp_path / "runs"),
                 "--name", student]) == 0
    (_, teacher_end), (student_start, _) = seen
    assert (student_start == teacher_end) == (student == "teacher")
    assert ("the student starts from the teacher's weights" in capsys.readouterr().err) == (student == "teacher")


def test_data_dependent_init_runs_once_per_model():
    from imgcls.engine.model_hooks import INITIALISED, init_from_data

    class Hooked(nn.Module):
        calls = 0

        def init_from_data(self, x):
            Hooked.calls += 1

    class Pre:
        def normalize(self, x):
            return x

    class Batches:
        split = Split(labels=torch.zeros(4).long(), images=torch.zeros(4, 1, 8, 8))

    m = Hooked()
    init_from_data(m, Batches(), Pre(), torch.device("cpu"))
    init_from_data(m, Batches(), Pre(), torch.device("cpu"))  # a second fit keeps what the first set
    warm = Hooked()
    setattr(warm, INITIALISED, True)  # started from trained weights
    init_from_data(warm, Batches(), Pre(), torch.device("cpu"))
    assert Hooked.calls == 1 and getattr(m, INITIALISED)
