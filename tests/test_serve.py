"""The web service: every endpoint and every kind of bad input in-process (TestClient), a
bounded load test on loopback, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving import LiveServer, local_client

pytest.importorskip("fastapi")

from imgcls.serve.app import ServeSettings, create_app  # noqa: E402


def bomb_png(side: int = 50_000) -> bytes:
    """A valid PNG header claiming side x side pixels (2.5 Gpx) with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_predict_multipart_and_json(client, samples):
    classes = ["a", "b", "c"]
    for data, label in samples:
        r = client.post("/predict", files={"file": ("img.png", data, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == classes[label] and len(body["top"]) == 3
        assert abs(sum(t["probability"] for t in body["top"]) - 1) < 1e-3
    data, label = samples[1]
    r = client.post("/predict", json={"image": base64.b64encode(data).decode(), "top_k": 2})
    assert r.status_code == 200 and r.json()["label"] == classes[label] and len(r.json()["top"]) == 2
    r = client.post("/predict?top_k=1", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()})
    assert r.status_code == 200 and len(r.json()["top"]) == 1


def test_explain_returns_overlay_png(client, samples):
    data, label = samples[0]
    r = client.post("/explain", files={"file": ("img.png", data, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.width >= 320
    assert r.headers["x-imgcls-target"] == "abc"[label]
    assert json.loads(r.headers["x-imgcls-top"])[0]["class"] == "abc"[label]
    r = client.post("/explain?target=c", files={"file": ("img.png", data, "image/png")})
    assert r.status_code == 200 and r.headers["x-imgcls-target"] == "c"
    assert client.post("/explain?target=zebra", files={"file": ("i.png", data, "image/png")}).status_code == 400


def test_health_model_docs_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "reference_cnn" and "batching" in h
    card = client.get("/model").json()
    assert card["classes"] == ["a", "b", "c"] and card["serving"]["backend"] == "torch"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/explain", "/health", "/model"}
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    js = client.get("/static/app.js").text
    css = client.get("/static/style.css")
    assert 'id="file"' in page and "fetch(\"/predict" in js and css.status_code == 200
    for text in (page, js, css.text):  # no CDN, no external network
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert client.get("/static/../app.py").status_code == 404


@pytest.mark.parametrize("kind,status,needle", [
    ("text", 415, "not an image"),
    ("content_type", 415, "unsupported content type"),
    ("truncated", 422, "corrupt or truncated"),
    ("garbage_png", 422, "corrupt"),
    ("bomb", 422, "decompression bomb"),
    ("too_big_declared", 413, "limit"),
    ("too_big_file", 413, "MiB"),
    ("bad_base64", 422, "base64"),
    ("bad_json", 400, "JSON"),
    ("no_file", 400, "file"),
    ("empty", 400, "empty"),
    ("bad_top_k", 400, "top_k"),
])
def test_bad_input_gets_json_error_and_server_keeps_serving(client, samples, kind, status, needle):
    good = samples[0][0]
    post = {
        "text": lambda: client.post("/predict", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}),
        "content_type": lambda: client.post("/predict", content=good, headers={"content-type": "image/png"}),
        "truncated": lambda: client.post("/predict", files={"file": ("t.png", good[: len(good) // 2], "image/png")}),
        "garbage_png": lambda: client.post("/predict", files={"file": ("g.png", good[:33] + b"\x07" * 300, "image/png")}),
        "bomb": lambda: client.post("/predict", files={"file": ("bomb.png", bomb_png(), "image/png")}),
        "too_big_declared": lambda: client.post("/predict", files={"file": ("big.png", b"\0" * (2 * 2**20), "image/png")}),
        # over --max-upload-mb but under the body cap (which allows for base64/multipart overhead)
        "too_big_file": lambda: client.post("/predict", files={"file": ("big.png", b"\0" * (600 * 1024), "image/png")}),
        "bad_base64": lambda: client.post("/predict", json={"image": "%%%not base64%%%"}),
        "bad_json": lambda: client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}),
        "no_file": lambda: client.post("/predict", data={"top_k": "2"}, files={"other": ("x.png", good, "image/png")}),
        "empty": lambda: client.post("/predict", files={"file": ("e.png", b"", "image/png")}),
        "bad_top_k": lambda: client.post("/predict?top_k=zero", files={"file": ("x.png", good, "image/png")}),
    }[kind]
    r = post()
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json") and needle in r.json()["detail"]
    ok = client.post("/predict", files={"file": ("img.png", good, "image/png")})
    assert ok.status_code == 200  # the process is unharmed


def test_streamed_body_over_limit_is_refused(client):
    """A chunked upload declares no length: the cap applies while it streams in."""
    def chunks():
        for _ in range(40):
            yield b"\0" * 64 * 1024
    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(trained_run, samples):
    app = create_app(trained_run, ServeSettings(api_key="s3cret", backend="torch"))
    data = samples[0][0]
    with local_client(app) as c:
        assert c.get("/health").status_code == 200
        for method, path, kw in [("post", "/predict", {"files": {"file": ("i.png", data, "image/png")}}),
                                 ("post", "/explain", {"files": {"file": ("i.png", data, "image/png")}}),
                                 ("get", "/model", {})]:
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}, **kw)
            assert r.status_code == 401
            r = getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **kw)
            assert r.status_code == 200, (path, r.text)


# ---------------------------------------------------------------------- a real server on loopback
def test_load_on_loopback_batches_requests(exported_for_serving, samples, capsys):
    """500 requests from 16 concurrent clients, bounded in time: no errors; the p50/p99
    latencies are reported (not asserted: the machine is shared)."""
    import httpx

    app = create_app(exported_for_serving, ServeSettings(max_batch=32, max_wait_ms=5))
    total, concurrency = 500, 16
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(base: str, ids: list[int]) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            for i in ids:
                data, label = samples[i % len(samples)]
                t0 = time.perf_counter()
                r = await c.post("/predict", files={"file": ("i.png", data, "image/png")})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["label"] != "abc"[label]:
                    errors.append(f"{r.status_code} {r.text[:100]}")

    async def main(base: str) -> None:
        ids = list(range(total))
        await asyncio.wait_for(asyncio.gather(*(worker(base, ids[k::concurrency]) for k in range(concurrency))),
                               timeout=120)

    with LiveServer(app) as base:
        t0 = time.perf_counter()
        asyncio.run(main(base))
        wall = time.perf_counter() - t0
        health = httpx.get(base + "/health").json()
    stats = health["batching"]
    assert not errors, errors[:3]
    assert health["backend"] == "onnx"  # auto picked the up-to-date export
    assert len(latencies) == total and stats["requests"] >= total
    assert stats["largest_batch"] > 1  # concurrent requests did share forward passes
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    with capsys.disabled():
        print(f"\nload test: {total} requests, {concurrency} clients, {wall:.1f}s, {total / wall:.0f} req/s, "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean batch {stats['mean_batch']}, "
              f"largest {stats['largest_batch']}, backend {health['backend']}")


@pytest.fixture(scope="module")
def exported_for_serving(trained_run, tmp_path_factory) -> Path:
    """A copy of the trained run with an ONNX export, so auto serves through ONNX Runtime."""
    import shutil

    pytest.importorskip("onnxruntime")
    from imgcls.api import Classifier
    from imgcls.export import export_run

    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(trained_run, run)
    export_run(Classifier.load(run), "onnx", log=lambda m: None)
    return run


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_page_in_headless_chromium(trained_run, tmp_path, samples):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    data, label = samples[4]
    upload = tmp_path / "digit.png"
    upload.write_bytes(data)
    app = create_app(trained_run, ServeSettings(backend="torch"))
    with LiveServer(app) as base, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            external = []
            page.on("request", lambda req: None if req.url.startswith(base) or req.url.startswith("blob:")
                    else external.append(req.url))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('classes')",
                                   timeout=20_000)
            page.set_input_files("#file", str(upload))
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            assert page.inner_text("#label") == "abc"[label]
            assert page.locator("#bars li").count() == 3
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert not external, external  # nothing but this server
        finally:
            browser.close()


def test_serve_cli_rejects_bad_flags(trained_run, capsys):
    from imgcls.cli import main

    assert main(["serve", str(trained_run), "--port", "70000"]) == 1
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", "/no/such/run"]) == 1
    assert "run folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- file and upload: the same pixels
def photo_jpeg(path: Path, w: int = 600, h: int = 400, seed: int = 0) -> Path:
    """A photo-like JPEG (gradients and noise, quality 90), large enough that prediction
    decodes it at reduced scale (Pillow's draft)."""
    rng = np.random.default_rng(seed)
    gx, gy = np.linspace(0, 255, w)[None, :, None], np.linspace(0, 255, h)[:, None, None]
    px = (0.5 * gx + 0.3 * gy * np.array([1.0, 0.4, 0.1]) + rng.integers(0, 70, (h, w, 3))).clip(0, 255)
    Image.fromarray(px.astype(np.uint8)).save(path, quality=90)
    return path


def test_uploaded_jpeg_gets_the_probabilities_of_the_same_file(tmp_path):
    """/predict decodes an uploaded JPEG as `imgcls predict` decodes the file (the reduced-scale
    decode eval_batches uses for photo models): multipart and base64 JSON give the file's
    probabilities (a full-size decode of uploads flipped 5 of 153 hymenoptera labels)."""
    import dataclasses

    from imgcls.api import Classifier

    clf = Classifier.create("reference_cnn", classes=list("abcde"), in_chans=3, img_size=32, seed=0)
    clf.preprocessing = dataclasses.replace(clf.preprocessing, resize="shorter_side", crop_pct=0.875)
    path = photo_jpeg(tmp_path / "photo.jpg")
    [want] = clf.predict(str(path), top_k=5, device="cpu", workers=0)
    want = {c: p for c, p in want.top}
    data = path.read_bytes()
    with local_client(create_app(None, ServeSettings(backend="torch", max_wait_ms=2), classifier=clf)) as c:
        answers = [c.post("/predict?top_k=5", files={"file": ("photo.jpg", data, "image/jpeg")}),
                   c.post("/predict?top_k=5", json={"image": base64.b64encode(data).decode()})]
    for r in answers:
        assert r.status_code == 200, r.text
        got = {t["class"]: t["probability"] for t in r.json()["top"]}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=1e-6)


def test_uploaded_16bit_colour_png_is_read_at_full_depth(tmp_path):
    """A 16-bit RGB PNG upload gets the probabilities of the same file given to predict
    (Pillow alone decodes it at 8 bits: values 1000..3000 became 3..11, near black)."""
    pytest.importorskip("imagecodecs")
    from imgcls.api import Classifier
    from imgcls.data.decode import load_image

    rgb = np.linspace(1000, 3000, 24 * 24 * 3).reshape(24, 24, 3).astype(np.uint16)
    rgb[..., 2] = 3000 - rgb[..., 2] + 1000
    path = tmp_path / "deep.png"
    import imagecodecs

    path.write_bytes(imagecodecs.png_encode(rgb))
    assert np.asarray(load_image(path, 3)).max() > 200  # full depth, mapped by --intensity auto
    clf = Classifier.create("reference_cnn", classes=list("abc"), in_chans=3, img_size=24, seed=0)
    [want] = clf.predict(str(path), top_k=3, device="cpu", workers=0)
    with local_client(create_app(None, ServeSettings(backend="torch", max_wait_ms=2), classifier=clf)) as c:
        r = c.post("/predict?top_k=3", files={"file": ("deep.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    got = {t["class"]: t["probability"] for t in r.json()["top"]}
    np.testing.assert_allclose([got[c] for c, _ in want.top], [p for _, p in want.top], atol=1e-6)
