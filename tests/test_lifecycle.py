"""A run's life: `--devices N` stopped by a signal or refused, resumed from elsewhere or under
torchrun, resumed when already complete, and the files it refuses to read (damaged
checkpoints, pickled models given as --weights)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from imgcls.cli import main
from imgcls.config import TrainConfig
from imgcls.engine import distributed as D
from imgcls.engine.checkpoint import CHECKPOINT, Checkpoint, TrainingInterrupted, load_checkpoint
from imgcls.errors import ImgclsError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _stop_at(monkeypatch, step: int | None, sleep: float = 0.0) -> None:
    """Checkpoint callbacks of this process act as if SIGTERM arrived at ``step`` (checkpoint,
    then TrainingInterrupted); each step takes ``sleep`` seconds more."""
    orig = Checkpoint.on_batch_end

    def on_batch_end(self, state):
        time.sleep(sleep)
        if step is not None and state.step == step:
            self._signal = signal.SIGTERM
        orig(self, state)

    monkeypatch.setattr(Checkpoint, "on_batch_end", on_batch_end)


def _no_launch(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("processes were started for a run that should have been refused")

    monkeypatch.setattr(D.subprocess, "Popen", refuse)


# ---------------------------------------------------------------------- --devices N: signals
@pytest.mark.slow
@pytest.mark.parametrize("to,sig", [("group", signal.SIGINT), ("parent", signal.SIGTERM)])
def test_devices_run_stopped_by_a_signal_says_one_line_and_exits_128_plus_signum(tiny_npz, tmp_path, to, sig):
    """Ctrl-C (SIGINT to the whole process group) and a scheduler's SIGTERM (to the command):
    torchrun's agent took them too, raised SignalException (twice for a group signal) and the
    run ended in 36-58 lines of warnings and tracebacks, exit 1."""
    run = tmp_path / "run"
    cmd = [PY, "-m", "imgcls", "train", "--data", str(tiny_npz), "--devices", "2", "--epochs", "400",
           "--batch-size", "16", "--precision", "fp32", "--out", str(tmp_path), "--name", "run"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "history.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    (os.killpg if to == "group" else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + sig, err[-3000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "SignalException" not in err and "torch/distributed" not in err, err
    assert sum("training stopped" in line for line in lines) == 1
    name = signal.Signals(sig).name
    assert lines[-1].startswith(f"imgcls train: training stopped by {name} at epoch ")
    assert f"checkpoint saved to {run / CHECKPOINT}" in lines[-1] and "imgcls train --resume" in lines[-1]
    assert load_checkpoint(run / CHECKPOINT)["world_size"] == 2


# ---------------------------------------------------------------------- --devices N: refusals
def test_devices_refuses_missing_data_and_indivisible_batch_before_starting_processes(monkeypatch, tmp_path,
                                                                                       capsys):
    _no_launch(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = ["--out", str(tmp_path), "--name", "d3"]
    assert main(["train", "--data", "mnst", "--devices", "2", *out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset 'mnst'" in err[0] and "did you mean 'mnist'" in err[0]
    assert main(["train", "--data", str(tmp_path / "nope.npz"), "--devices", "2", *out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data path not found" in err[0]
    assert main(["train", "--data", "digits", "--devices", "3", "--batch-size", "128", *out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must divide evenly over 3 processes" in err[0] and "e.g. 126" in err[0]
    assert not (tmp_path / "d3").exists()


@pytest.mark.slow
def test_devices_user_error_in_the_processes_is_said_once_and_leaves_no_run_folder(tiny_npz, tmp_path):
    """An error only the processes can find (it needs the data: here --loss bce on one label an
    image) was printed once per process, then torchrun's ~40-line ChildFailedError report; and
    the refused run left its config.yaml behind."""
    cmd = [PY, "-m", "imgcls", "train", "--data", str(tiny_npz), "--devices", "2", "--epochs", "1",
           "--loss", "bce", "--out", str(tmp_path / "runs"), "--name", "bce"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("imgcls train: error: --loss bce is for multi-label data")
    assert not (tmp_path / "runs").exists()  # no half-made run folder (nor the --out folder made for it)


# ---------------------------------------------------------------------- resume under torchrun
HOOK = textwrap.dedent("""
    import os
    if os.environ.get("IMGCLS_TEST_STOP_AT_STEP") and "RANK" in os.environ:  # (tests/test_lifecycle.py)
        import signal
        import imgcls.engine.checkpoint as C
        _step, _orig = int(os.environ["IMGCLS_TEST_STOP_AT_STEP"]), C.Checkpoint.on_batch_end
        def on_batch_end(self, state):
            if state.step == _step:
                self._signal = signal.SIGTERM  # as SIGTERM does: checkpoint, then stop
            _orig(self, state)
        C.Checkpoint.on_batch_end = on_batch_end
""")


@pytest.mark.slow
def test_torchrun_run_resumes_with_its_process_count_and_the_same_history(tiny_npz, tmp_path):
    """A run started with torchrun saved `devices: 1`, so `--resume` ran one process and refused
    (its hint named --devices, which --resume does not take); and a resumed DDP epoch's
    train_loss / train_acc were rank 0's partial sums given to every rank."""
    args = ["--data", str(tiny_npz), "--epochs", "3", "--batch-size", "16", "--deterministic", "--precision",
            "fp32", "--seed", "4", "--out", str(tmp_path)]
    straight = subprocess.run([PY, "-m", "imgcls", "train", *args, "--devices", "2", "--name", "straight"],
                              env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert straight.returncode == 0, straight.stderr[-3000:]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = _env(IMGCLS_TEST_STOP_AT_STEP="10")
    env["PYTHONPATH"] = str(hook) + os.pathsep + env["PYTHONPATH"]
    cut = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "imgcls",
                          "train", *args, "--name", "cut"], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert "training stopped by SIGTERM" in cut.stderr, cut.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert ck["world_size"] == 2 and ck["epoch"] == 2 and 0 < ck["batch_in_epoch"] < ck["steps_per_epoch"]
    assert yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())["devices"] == 2  # the real count
    resumed = subprocess.run([PY, "-m", "imgcls", "train", "--resume", str(tmp_path / "cut")], env=_env(),
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def rows(name):
        hist = (tmp_path / name / "history.csv").read_text().strip().splitlines()
        keys = hist[0].split(",")
        return [{k: v for k, v in zip(keys, r.split(",")) if k in ("epoch", "train_loss", "train_acc", "val_loss",
                                                                    "val_acc", "lr")} for r in hist[1:]]

    assert rows("cut") == rows("straight")


def test_process_count_mismatch_hint_names_a_command_that_works(tmp_path):
    class Trainer:
        dist = D.SINGLE

    ck = Checkpoint(tmp_path / "run", resume={"world_size": 2, "steps_per_epoch": 7, "epochs": 3})
    ck.attach(Trainer())
    with pytest.raises(ImgclsError) as err:
        ck._restore(None, None)
    text = str(err.value)
    assert "written by 2 processes, this run has 1" in text
    assert f"torchrun --nproc-per-node 2 -m imgcls train --resume {tmp_path / 'run'}" in text
    assert "--devices" not in text


# ---------------------------------------------------------------------- resume from another folder
def test_resume_from_another_working_folder_finds_the_data(tiny_npz, tmp_path, monkeypatch, capsys):
    """config.yaml kept `data` as typed (relative): resuming from elsewhere said "data path not
    found" with no way out (--data cannot be combined with --resume)."""
    from imgcls import train

    origin, elsewhere = tmp_path / "origin", tmp_path / "elsewhere"
    origin.mkdir()
    elsewhere.mkdir()
    (origin / "tiny.npz").write_bytes(tiny_npz.read_bytes())
    monkeypatch.chdir(origin)
    _stop_at(monkeypatch, 10)
    with pytest.raises(TrainingInterrupted):
        train({"data": "tiny.npz", "epochs": 2, "batch_size": 16, "out": "runs", "name": "r", "seed": 0},
              progress=False)
    run = origin / "runs" / "r"
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.data == str(origin / "tiny.npz") and saved.out == "runs"  # the path absolute; --out as given
    _stop_at(monkeypatch, None)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert "model saved to" in capsys.readouterr().out
    # an older config.yaml, with the path as typed: the refusal names the folder to resume from
    values = yaml.safe_load((run / "config.yaml").read_text())
    values["data"] = "tiny.npz"
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    (run / "metrics.json").unlink()  # (not complete, so there is something to resume)
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data path not found: tiny.npz" in err[0]
    assert f"cd {origin} && imgcls train --resume {run}" in err[0]


def test_dataset_names_stay_names_in_the_saved_config(tmp_path):
    from imgcls.runs import saved_config

    cfg = TrainConfig(data="digits", weights=None, out=str(tmp_path))
    assert saved_config(cfg, D.SINGLE).data == "digits"
    assert saved_config(TrainConfig(data="shards/train-{000000..000009}.tar"), D.SINGLE).data == \
        "shards/train-{000000..000009}.tar"
    assert saved_config(TrainConfig(data="https://host/x.tar"), D.SINGLE).data == "https://host/x.tar"
    assert saved_config(cfg, D.DistContext(rank=0, world_size=4)).devices == 4


# ---------------------------------------------------------------------- time across a resume; a complete run
def test_resumed_run_counts_its_time_before_the_interruption_and_a_complete_run_is_left_alone(
        tiny_npz, tmp_path, monkeypatch, capsys):
    from imgcls import train

    cfg = {"data": str(tiny_npz), "epochs": 2, "batch_size": 16, "out": str(tmp_path), "name": "r", "seed": 0}
    _stop_at(monkeypatch, 10, sleep=0.1)  # (each step 0.1 s more)
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    steps = ck["steps_per_epoch"]
    assert (ck["epoch"], ck["step"]) == (2, 10) and 0 < ck["batch_in_epoch"] < steps
    _stop_at(monkeypatch, None, sleep=0.1)
    res = train(None, progress=False, resume=tmp_path / "r")
    assert res.summary["resumed_from_epoch"] == 2
    assert res.summary["train_time_s"] >= 2 * steps * 0.1  # every step of the run, not those after the resume
    epoch2 = res.classifier.history[1]
    assert epoch2["epoch_time"] >= steps * 0.1  # the resumed epoch's time: its part before the interruption too
    assert epoch2["img_per_s"] <= res.summary["train_images"] / (steps * 0.1)
    card = (tmp_path / "r" / "model.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "is already complete" in err[0] and "nothing to resume" in err[0]
    assert "resuming" not in cap.err + cap.out and "accuracy" not in cap.out
    assert (tmp_path / "r" / "model.json").read_bytes() == card  # not re-evaluated, not rewritten


# ---------------------------------------------------------------------- files refused
def test_truncated_checkpoint_is_said_damaged_with_what_to_do(tiny_npz, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    TrainConfig(data=str(tiny_npz), out=str(tmp_path), name="r").to_yaml(run / "config.yaml")
    torch.save({"format": "imgcls-checkpoint", "format_version": 1, "w": torch.ones(1000)}, run / CHECKPOINT)
    (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:300])
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged or truncated" in err[0]
    assert "--exist-ok" in err[0] and "--name" in err[0] and "intact checkpoint" not in err[0]
    assert "miniz" not in err[0] and "PytorchStreamReader" not in err[0]


def test_pickled_model_as_weights_is_refused_in_one_line_and_plain_pickles_without_torchs_warning(tmp_path):
    from imgcls.models.pretrained import read_state_dict

    full = tmp_path / "full.pt"
    torch.save(torch.nn.Linear(3, 2), full)  # torch.save(model): a pickle of the module object
    with pytest.raises(ImgclsError) as err:
        read_state_dict(full)
    text = str(err.value)
    assert "pickled Python objects" in text and "nothing of it was loaded" in text and "torch.nn.modules" in text
    assert "torch.save(model.state_dict()" in text and ".safetensors" in text
    assert "\x1b" not in text and "weights_only" not in text and "\n" not in text
    plain = tmp_path / "checkpoint.pt"
    plain.write_bytes(pickle.dumps({"format": "imgcls-checkpoint"}, protocol=4))
    for read in (load_checkpoint, read_state_dict):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" UserWarning would raise
            with pytest.raises(ImgclsError, match="refused|pickle"):
                read(plain)
