"""Multi-process training, checkpoints and resume, deterministic mode, run-folder checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgcls import Classifier, ImgclsError, train
from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.engine import distributed as D
from imgcls.engine.callbacks import Callback
from imgcls.engine.checkpoint import CHECKPOINT, TrainingInterrupted, load_checkpoint
from tests.conftest import pattern_images

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def npz(tiny_npz: Path) -> Path:
    return tiny_npz  # 3 classes x 40 (108 train after the held-out 10%: 6 steps of 16) + 30 test


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,b,world,drop_last", [(100, 8, 2, True), (100, 8, 2, False), (37, 4, 3, False),
                                                 (5, 4, 4, False)])
def test_shards_rebuild_the_global_batches(n, b, world, drop_last):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    shards = [D.shard_batch_order(order, b, r, world, drop_last) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    steps = -(-len(shards[0]) // b)
    for k in range(steps):
        global_batch = torch.cat([s[k * b:(k + 1) * b] for s in shards])
        if (k + 1) * b * world <= n:  # a full global batch: exactly the single-process batch k
            assert torch.equal(global_batch, order[k * b * world:(k + 1) * b * world])
    covered = set(torch.cat(shards).tolist())
    assert covered == set(order[: (n // (b * world)) * b * world].tolist()) if drop_last else covered == set(range(n))


def test_sharded_batches_lengths_skip_and_eval_share():
    split = Split(labels=torch.arange(50) % 3, images=torch.zeros(50, 1, 4, 4, dtype=torch.uint8))
    parts = []
    for r in range(2):
        ev = Batches(split, 8)
        ev.shard(r, 2, even=False)
        parts.append(torch.cat([y for _, y in ev]))
        tr = Batches(split, 8, shuffle=True, seed=3, drop_last=True)
        tr.shard(r, 2, even=True)
        tr.set_epoch(2)
        assert len(tr) == len(list(tr)) == 50 // 16
        full = [y for _, y in tr]
        tr.skip = 1  # resume after the first batch: the rest, once
        assert [y.tolist() for _, y in tr] == [y.tolist() for y in full[1:]]
        assert len(list(tr)) == len(full)
    assert sorted(torch.cat(parts).tolist()) == sorted(split.labels.tolist())  # every val image exactly once


def test_global_batch_must_divide():
    with pytest.raises(ImgclsError, match="global batch"):
        D.local_batch_size(30, D.DistContext(rank=0, world_size=4))


def test_devices_flag_launches_torchrun(monkeypatch, tmp_path):
    """`imgcls train --devices N` re-runs itself under torch.distributed.run."""
    from imgcls.cli import main

    seen = {}

    class FakePopen:
        def __init__(self, cmd, env):
            seen["cmd"], seen["env"] = cmd, env
            seen["yaml"] = Path(cmd[cmd.index("--config") + 1]).read_text()

        def wait(self):
            return 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(D.subprocess, "Popen", FakePopen)
    assert main(["train", "--data", "digits", "--devices", "3", "--epochs", "2", "--out", str(tmp_path)]) == 0
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=3" in cmd
    assert cmd[cmd.index("-m", 3):][:3] == ["-m", "imgcls", "train"]
    assert "devices: 3" in seen["yaml"] and "epochs: 2" in seen["yaml"]
    # the processes get only what was given, so each fills the rest from the recipe as one process does
    from imgcls.config import TrainConfig
    from imgcls.engine.recipes import RecipeContext, resolve_recipe

    given = TrainConfig.from_dict({"data": "digits", "devices": 3, "epochs": 2, "out": str(tmp_path)})
    (tmp_path / "w.yaml").write_text(seen["yaml"])
    worker = TrainConfig.from_yaml(tmp_path / "w.yaml")
    assert worker.model_fields_set == given.model_fields_set
    ctx = RecipeContext("digits", 54000, True, "cpu")
    assert resolve_recipe(worker, ctx) == resolve_recipe(given, ctx)
    assert resolve_recipe(worker, ctx).lr != TrainConfig().lr  # the fast recipe's, not the default


# ---------------------------------------------------------------------- 2 processes (Gloo)
WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    rank = int(os.environ["RANK"])
    out = sys.argv[2]
    os.chdir(os.path.join(out, f"cwd{rank}"))  # relative --out: a write by rank 1 would land here
    from imgcls.cli import main
    from imgcls.engine import distributed as D
    from imgcls import train
    from imgcls.config import TrainConfig
    res = train(TrainConfig(data=sys.argv[1], epochs=3, batch_size=16, out="runs", seed=5, precision="fp32",
                            deterministic=True), progress=False)
    state = res.classifier.model.state_dict()
    digest = D.weights_digest(res.classifier.model)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": digest, "history": res.summary and [
            {k: h[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")} for h in res.classifier.history],
            "run_dir": str(res.run_dir), "metrics": bool(res.metrics)}, f)
""")


@pytest.mark.slow
def test_two_gloo_processes_agree_and_rank0_alone_writes(npz, tmp_path):
    (tmp_path / "cwd0").mkdir()
    (tmp_path / "cwd1").mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                           str(npz), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["digest"] == r1["digest"]  # identical final weights on both ranks
    assert r0["history"] == r1["history"]  # metrics reduced over ranks: the same numbers everywhere
    assert r0["metrics"] and not r1["metrics"]  # rank 0 evaluates and reports
    run = tmp_path / "cwd0" / r0["run_dir"]
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "model.json", "config.yaml", "metrics.json",
                                               "history.csv", CHECKPOINT}
    assert list((tmp_path / "cwd1").iterdir()) == []  # rank 1 wrote nothing
    card = json.loads((run / "model.json").read_text())
    dist = card["training"]["distributed"]
    assert dist["processes"] == 2 and dist["backend"] == "gloo"
    assert dist["global_batch"] == 16 and dist["per_process_batch"] == 8
    assert dist["weights_sha256_all_ranks"] == r0["digest"]
    saved = Classifier.load(run).model
    assert D.weights_digest(saved) == r0["digest"]
    assert card["metrics"]["test"]["accuracy"] >= 0.9
    assert proc.stdout.count("trained reference_cnn") == 0  # API run: nothing printed by either rank


# ---------------------------------------------------------------------- resume
KILLER = textwrap.dedent("""
    import os, signal, sys
    from imgcls import Classifier
    from imgcls.engine.callbacks import Callback

    class KillAt(Callback):  # SIGKILL in the middle of epoch 2, before that step's checkpoint
        def on_batch_end(self, state):
            if state.step == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)

    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=3)
    clf.fit(sys.argv[1], epochs=3, batch_size=16, seed=3, precision="fp32", run_dir=sys.argv[2],
            checkpoint_every=1e-9, deterministic=True, progress=False, callbacks=[KillAt()])
""")


def _fit(npz, run_dir, resume=None):
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=3)
    clf.fit(npz, epochs=3, batch_size=16, seed=3, precision="fp32", run_dir=run_dir, deterministic=True,
            progress=False, resume=resume)
    return clf


def test_sigkill_mid_epoch_then_resume_gives_bitwise_identical_weights(npz, tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    proc = subprocess.run([PY, "-c", KILLER, str(npz), str(run), "9"], env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = load_checkpoint(run / CHECKPOINT)
    # 6 steps per epoch; killed at step 9 -> last checkpoint at step 8 (epoch 2, 2 batches done)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (2, 2, 8)
    resumed = _fit(npz, run, resume=ckpt)
    straight = _fit(npz, tmp_path / "straight")
    assert _weights_equal(resumed.model.state_dict(), straight.model.state_dict())
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in straight.history]
    assert resumed.card["training"]["resumed_from_epoch"] == 2
    assert load_file(run / "model.safetensors").keys() == load_file(tmp_path / "straight" / "model.safetensors").keys()


def test_ctrl_c_saves_checkpoint_and_stops_cleanly(npz, tmp_path):
    class CtrlCAt(Callback):
        def on_batch_end(self, state):
            if state.step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=3)
    old = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at epoch 1, batch 4/6.*imgcls train --resume") as err:
        clf.fit(npz, epochs=3, batch_size=16, seed=3, run_dir=tmp_path / "r", progress=False, callbacks=[CtrlCAt()])
    assert err.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == old  # handlers restored
    ck = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert (ck["epoch"], ck["batch_in_epoch"]) == (1, 4)


@pytest.mark.slow
def test_cli_sigterm_then_resume_finishes_the_run(npz, tmp_path):
    cmd = [PY, "-m", "imgcls", "train", "--data", str(npz), "--epochs", "12", "--batch-size", "16",
           "--deterministic", "--precision", "fp32", "--out", str(tmp_path), "--name", "run"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run" / CHECKPOINT
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and f"checkpoint saved to {ckpt}" in err
    assert f"imgcls train --resume {tmp_path / 'run'}" in err
    assert err.strip().splitlines()[-1].startswith("imgcls train: training stopped")  # one clean line, no traceback
    stopped_at = load_checkpoint(ckpt)["epoch"]
    assert stopped_at < 12
    res = subprocess.run([PY, "-m", "imgcls", "train", "--resume", str(tmp_path / "run")], env=_env(),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "test accuracy" in res.stdout
    hist = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()
    assert len(hist) == 1 + 12 and [int(r.split(",")[0]) for r in hist[1:]] == list(range(1, 13))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["training"]["resumed_from_epoch"] == stopped_at


def test_resume_keeps_the_runs_config(tmp_path, capsys):
    from imgcls.cli import main

    assert main(["train", "--resume", str(tmp_path), "--epochs", "3"]) == 1
    assert "--epochs cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 1
    assert "is not a run folder" in capsys.readouterr().err


def test_resume_refuses_other_data(npz, tmp_path):
    clf = _fit(npz, tmp_path / "r")
    ck = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    x, y = pattern_images(36, size=16, seed=9)
    other = tmp_path / "other.npz"
    np.savez(other, x_train=x, y_train=y, class_names=np.array(["a", "b", "c"]))
    with pytest.raises(ImgclsError, match="data changed"):
        Classifier.create("reference_cnn", classes=clf.classes, in_chans=1, img_size=16).fit(
            other, epochs=3, batch_size=16, seed=3, run_dir=tmp_path / "r", progress=False, resume=ck)


# ---------------------------------------------------------------------- determinism
def test_deterministic_runs_repeat_exactly_and_record_environment(npz, tmp_path):
    results = [train({"data": str(npz), "epochs": 2, "batch_size": 16, "seed": 11, "deterministic": True,
                      "out": str(tmp_path), "name": f"d{i}"}, progress=False) for i in range(2)]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    h0, h1 = ([[h[k] for k in keys] for h in r.classifier.history] for r in results)
    assert h0 == h1
    assert results[0].metrics["accuracy"] == results[1].metrics["accuracy"]
    assert results[0].metrics["loss"] == results[1].metrics["loss"]
    assert _weights_equal(*(load_file(r.run_dir / "model.safetensors") for r in results))
    card = json.loads((results[0].run_dir / "model.json").read_text())
    rep = card["training"]["reproducibility"]
    assert rep["deterministic"] and rep["seed"] == 11
    assert rep["environment"]["device"] == "cpu" and rep["environment"]["deterministic_algorithms"]
    assert len(rep["data_fingerprint"]["sha256"]) == 64 and rep["data_fingerprint"]["images"]["test"] == 30
    assert card["versions"]["torch"] == torch.__version__
    card1 = json.loads((results[1].run_dir / "model.json").read_text())
    assert card1["training"]["reproducibility"]["data_fingerprint"] == rep["data_fingerprint"]


def test_fingerprint_covers_file_names_and_contents(split_folder):
    from imgcls.data import load_data
    from imgcls.engine.reproducibility import data_fingerprint

    a = data_fingerprint(load_data(str(split_folder)))
    assert a == data_fingerprint(load_data(str(split_folder)))
    victim = next((split_folder / "train" / "cat").glob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, different bytes
    assert data_fingerprint(load_data(str(split_folder)))["sha256"] != a["sha256"]


# ---------------------------------------------------------------------- run folder checks
def test_full_disk_fails_before_training(npz, tmp_path, monkeypatch):
    import shutil

    from imgcls.engine import checkpoint

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(ImgclsError, match=r"not enough disk space for run folder .*MB free.*choose another --out"):
        train({"data": str(npz), "epochs": 1, "out": str(tmp_path), "name": "full"}, progress=False)
    assert not (tmp_path / "full" / "history.csv").exists()


def test_unwritable_output_fails_before_training(npz, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ImgclsError, match="cannot create run folder"):
        train({"data": str(npz), "epochs": 1, "out": str(blocker)}, progress=False)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        (ro / "run").mkdir(parents=True)
        (ro / "run").chmod(0o500)
        with pytest.raises(ImgclsError, match="cannot write to run folder"):
            train({"data": str(npz), "epochs": 1, "out": str(ro), "name": "run"}, progress=False)
