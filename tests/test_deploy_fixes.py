"""Deployment defects found in review, one test each: the web service's answers to odd
requests, `imgcls serve` / `imgcls predict` flags, ONNX opsets and swapped ONNX files."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from imgcls.cli import main
from tests.serving import local_client

pytest.importorskip("fastapi")

from imgcls.serve.app import ServeSettings, create_app  # noqa: E402


# ---------------------------------------------------------------------- the web service
@pytest.mark.parametrize("path", ["/predict", "/explain"])
def test_json_with_a_huge_integer_is_400(client, samples, path):
    """Python refuses to parse an integer of over 4300 digits (ValueError, not a JSONDecodeError):
    it was a 500."""
    image = base64.b64encode(samples[0][0]).decode()
    for field in ("top_k", "target"):
        body = f'{{"image": "{image}", "{field}": 1{"0" * 5000}}}'.encode()
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json") and "JSON" in r.json()["detail"]
    assert client.post("/predict", files={"file": ("i.png", samples[0][0], "image/png")}).status_code == 200


def test_explain_decodes_a_small_jpeg_as_predict_does(tmp_path):
    """A JPEG that /explain does not shrink decodes at the reduced scale /predict uses, so both
    give the same probabilities (it was decoded at full size: 0.618 vs 0.620)."""
    from imgcls.api import Classifier
    from tests.test_serve import photo_jpeg

    clf = Classifier.create("reference_cnn", classes=list("abcde"), in_chans=3, img_size=32, seed=0)
    clf.preprocessing = dataclasses.replace(clf.preprocessing, resize="shorter_side", crop_pct=0.875)
    data = photo_jpeg(tmp_path / "photo.jpg", 600, 400).read_bytes()  # under 768 px: /explain keeps its size
    with local_client(create_app(None, ServeSettings(backend="torch", max_wait_ms=2), classifier=clf)) as c:
        pred = c.post("/predict?top_k=5&target=", files={"file": ("p.jpg", data, "image/jpeg")})
        expl = c.post("/explain?top_k=5", files={"file": ("p.jpg", data, "image/jpeg")})
    assert pred.status_code == 200 and expl.status_code == 200, (pred.text, expl.text)
    want = {t["class"]: t["probability"] for t in pred.json()["top"]}
    got = {t["class"]: t["probability"] for t in json.loads(expl.headers["x-imgcls-top"])}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=2e-6)


def test_unknown_host_gets_one_line_json(trained_run):
    from fastapi.testclient import TestClient

    app = create_app(trained_run, ServeSettings(backend="torch"))
    with TestClient(app, base_url="http://attacker.example:8000") as c:
        for r in (c.get("/health"), c.post("/predict", json={"image": "aGk="})):
            assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
            detail = r.json()["detail"]
            assert "attacker.example" in detail and "--allowed-host" in detail and "\n" not in detail
            assert "localhost" not in detail  # the names it answers to are not told to a stranger
        r = c.get("/health", headers={"host": ""})
        assert r.status_code == 400 and "Host" in r.json()["detail"]
    with local_client(app) as c:
        assert c.get("/health").status_code == 200


def test_health_without_the_key_names_nothing_of_the_model(trained_run):
    app = create_app(trained_run, ServeSettings(api_key="s3cret", backend="torch"))
    with local_client(app) as c:
        bare = c.get("/health")
        wrong = c.get("/health", headers={"Authorization": "Bearer nope"})
        full = c.get("/health", headers={"Authorization": "Bearer s3cret"}).json()
    for r in (bare, wrong):
        assert r.status_code == 200 and r.json() == {"status": "ok", "auth": True}
    assert full["model"] == "reference_cnn" and full["classes"] == 3 and "load" in full
    with local_client(create_app(trained_run, ServeSettings(backend="torch"))) as c:  # no key: all of it
        h = c.get("/health").json()
    assert h["model"] == "reference_cnn" and h["auth"] is False and "batching" in h


# ---------------------------------------------------------------------- the CLI
def test_serve_on_a_port_in_use_is_one_line(trained_run, capsys):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["serve", str(trained_run), "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert "serving" not in out  # nothing announced that is not served
    assert f"port {port}" in err and "--port" in err and err.count("\n") == 1 and "Errno" not in err


def test_serve_top_k_below_one_is_refused(trained_run, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # never serve from a test
    assert main(["serve", str(trained_run), "--top-k", "0"]) == 1
    assert "--top-k" in capsys.readouterr().err


def test_predict_top_k_below_one_is_refused(trained_run, tmp_path, capsys):
    from PIL import Image

    Image.new("L", (16, 16), 100).save(tmp_path / "x.png")
    for k in ("0", "-2"):
        assert main(["predict", str(trained_run), str(tmp_path / "x.png"), "--top-k", k]) == 1
        err = capsys.readouterr().err
        assert f"--top-k {k}" in err and err.count("\n") == 1


# ---------------------------------------------------------------------- ONNX export
onnx_only = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                               reason="needs onnx and onnxruntime")


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@onnx_only
@pytest.mark.parametrize("opset", [13, 7])
def test_export_writes_the_opset_asked_for(trained_run, tmp_path, capsys, opset):
    """Below 18 the torch.export-based exporter converts its graph down and, where no converter
    exists, kept opset 18 without raising (and printed the converter's traceback)."""
    out = tmp_path / "out"
    assert main(["export", str(trained_run), "--opset", str(opset), "--out", str(out), "--parity-images", "30"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Failed to convert" not in err, err
    assert _opset(out / "model.onnx") == opset
    assert json.loads((out / "model.onnx.json").read_text())["opset"] == opset


@onnx_only
def test_export_refuses_an_opset_no_exporter_writes(trained_run, tmp_path, capsys):
    """An opset neither exporter can write for this model is a one-line refusal, never another
    opset (a flip TTA graph: the TorchScript-based exporter writes torch.flip from opset 10 on)."""
    from imgcls.api import Classifier

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    clf = Classifier.load(run)
    clf.card["tta"] = "flip"
    clf.save(run)
    assert main(["export", str(run), "--opset", "9", "--out", str(tmp_path / "out"), "--parity-images", "30"]) == 1
    [line] = [t for t in capsys.readouterr().err.splitlines() if "error" in t]
    assert line.startswith("imgcls export: error: cannot write ONNX opset 9") and "--opset 18" in line, line
    assert not (tmp_path / "out" / "model.onnx").exists()


@onnx_only
def test_swapped_onnx_file_is_stale(trained_run, tmp_path):
    """The description beside model.onnx is not enough: a model.onnx copied in from another run
    (its own metadata names other weights) is not used by auto and refused by --backend onnx."""
    import onnx

    from imgcls.api import Classifier
    from imgcls.engine.backends import export_problem, make_backend
    from imgcls.errors import ImgclsError
    from imgcls.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    export_run(Classifier.load(run), "onnx", parity_images=30, log=lambda m: None)
    clf = Classifier.load(run)
    assert make_backend(clf, "auto", device="cpu").name == "onnx"
    model = onnx.load(str(run / "model.onnx"))  # "another run's" export: other weights, and it says so
    for p in model.metadata_props:
        if p.key == "source_weights_sha256":
            p.value = "0" * 64
    bias = next(t for t in model.graph.initializer if t.dims == [3])
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 5, bias.name))
    onnx.save(model, str(run / "model.onnx"))  # model.onnx.json kept as it was
    assert "other weights" in export_problem(clf, run / "model.onnx")
    assert make_backend(clf, "auto", device="cpu").name == "torch"
    with pytest.raises(ImgclsError, match="no up-to-date model.onnx .*other weights.*imgcls export"):
        make_backend(clf, "onnx")


def test_int8_below_opset_13_is_refused_up_front(trained_run, tmp_path, capsys):
    """ONNX Runtime's per-channel quantization of an opset-7 graph wrote an int8 file it could
    not load itself; now the flags are refused before anything is written."""
    out = tmp_path / "out"
    assert main(["export", str(trained_run), "--opset", "11", "--int8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--int8 needs --opset 13" in err and err.count("\n") == 1 and not out.exists()

