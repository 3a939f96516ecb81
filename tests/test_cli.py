import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgcls.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "imgcls", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_train_evaluate_predict_cli(tiny_npz, tmp_path):
    out = tmp_path / "runs"
    r = run_cli("train", "--data", tiny_npz, "--epochs", "3", "--batch-size", "16", "--lr", "0.003",
                "--optimizer", "adamw", "--seed", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and str(out / "train") in r.stdout
    assert "epoch 3/3" in r.stderr
    r2 = run_cli("train", "--data", tiny_npz, "--epochs", "1", "--batch-size", "16", "--out", out)
    assert r2.returncode == 0 and str(out / "train2") in r2.stdout

    r = run_cli("evaluate", out / "train", "--data", tiny_npz)
    assert r.returncode == 0, r.stderr
    assert "precision" in r.stdout and "confusion matrix" in r.stdout
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["evaluation"]["split"] == "test"


def test_predict_cli_json(trained_run, tmp_path):
    from PIL import Image

    from tests.conftest import pattern_images

    x, _ = pattern_images(2, size=16)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
    code = main(["predict", str(trained_run), str(tmp_path), "--top-k", "3", "--json"])
    assert code == 0


def test_predict_cli_output(trained_run, tmp_path, capsys):
    from PIL import Image

    Image.new("L", (16, 16), 30).save(tmp_path / "x.png")
    assert main(["predict", str(trained_run), str(tmp_path / "x.png"), "--top-k", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["source"].endswith("x.png") and len(line["top"]) == 2


def test_predict_skips_unreadable_files_unless_strict(trained_run, tmp_path, capsys):
    from PIL import Image

    from imgcls.api import Classifier

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_text("this is text, not a png")
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(trained_run), str(folder), "--output", str(out), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 4 images" in err and "broken.png" in err
    rows = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["broken.png"]["label"] is None and "broken.png" in rows["broken.png"]["error"]
    assert all(rows[f"ok{i}.png"]["label"] in ("a", "b", "c") and "error" not in rows[f"ok{i}.png"] for i in range(3))
    # the same through the API, the CSV rendering, and --strict
    preds = Classifier.load(trained_run).predict(folder, workers=0)
    assert [p.error is not None for p in preds] == [Path(p.source).name == "broken.png" for p in preds]
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(trained_run), str(folder), "--output", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0].endswith(",error") and len(lines) == 5
    assert main(["predict", str(trained_run), str(folder), "--strict"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "broken.png" in line and "Traceback" not in line


def test_train_from_yaml_config_with_override(tiny_npz, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {tiny_npz}\nepochs: 5\nbatch_size: 16\nout: {tmp_path / 'runs'}\nname: fromyaml\n")
    assert main(["train", "--config", str(cfg), "--epochs", "1"]) == 0
    saved = (tmp_path / "runs" / "fromyaml" / "config.yaml").read_text()
    assert "epochs: 1" in saved


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "/no/such/dir/x"], "data path not found"),
    (["train", "--data", "mnst"], "did you mean 'mnist'"),
    (["train", "--data", "digits", "--model", "resnet_18"], "did you mean 'resnet18'"),
    (["evaluate", "/no/run", "--data", "digits"], "run folder not found"),
    (["predict", "/no/run", "x.png"], "run folder not found"),
])
def test_cli_errors_are_one_line(args, needle, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_cli_error_cases_on_files(tmp_path, capsys, trained_run, tiny_npz):
    (tmp_path / "empty_run").mkdir()
    assert main(["predict", str(tmp_path / "empty_run"), "x.png"]) == 1
    assert "no trained model" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("this is text, not a png")
    assert main(["predict", str(trained_run), str(bad)]) == 1  # nothing readable: an error
    err = capsys.readouterr().err
    assert "bad.png" in err and "none of the 1 images" in err and err.count("\n") == 1
    assert main(["train", "--data", str(tiny_npz), "--epochs", "0"]) == 1
    assert "--epochs" in capsys.readouterr().err
    assert main(["evaluate", str(trained_run), "--data", "digits"]) == 1
    assert "classes" in capsys.readouterr().err


def test_models_command(capsys):
    assert main(["models", "resnet1"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out


def test_debug_flag_shows_traceback():
    r = run_cli("--debug", "train", "--data", "mnst")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_summary_img_size_errors_are_one_line(trained_run, capsys):
    """--img-size below 1 was an internal error (or, 0, silently ignored); a run whose model is
    fixed to its training size (flatten + dense head) was a bare shape RuntimeError."""
    for size in ("0", "-3"):
        assert main(["summary", "resnet18", "--img-size", size]) == 1
        err = capsys.readouterr().err.strip()
        assert f"--img-size {size} must be at least 1" in err and "\n" not in err
    assert main(["summary", str(trained_run), "--img-size", "64"]) == 1
    err = capsys.readouterr().err.strip()
    assert "this run's model takes 16 px inputs" in err and "--img-size 16" in err and "\n" not in err
    assert main(["summary", str(trained_run), "--img-size", "16"]) == 0


def test_cache_dir_that_does_not_exist_is_not_empty(tmp_path, capsys):
    """`imgcls cache --dir /nonexistent` printed 'empty' as if it were a cache with nothing in it."""
    missing = tmp_path / "nonexistent"
    assert main(["cache", "--dir", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--dir {missing} does not exist" in err and "\n" not in err
    assert not missing.exists()
    (tmp_path / "real").mkdir()
    assert main(["cache", "--dir", str(tmp_path / "real")]) == 0
    assert "empty" in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["train", "--data", "digits", "--optimizer", "adamm"],
     "imgcls train: error: argument --optimizer: invalid choice: 'adamm' (choose from 'adam', 'adamw', 'sgd') "
     "(did you mean 'adam'?) (see imgcls train --help)"),
    (["train", "--data", "digits", "--batchsize", "3"],
     "imgcls train: error: unrecognized arguments: --batchsize 3 (did you mean --batch-size?) (see imgcls train --help)"),
    (["trian"], "(did you mean 'train'?) (see imgcls --help)"),
    (["predict"], "imgcls predict: error: the following arguments are required: run, images (see imgcls predict --help)"),
])
def test_a_flag_mistake_is_one_line_with_the_near_miss(argv, said, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and said in err, err  # no usage block before it
