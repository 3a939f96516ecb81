"""The web service against hostile or excessive use: huge images for Grad-CAM, formats it does
not document, floods, crafted requests and foreign pages. Each answer is a quick 4xx or a
503 with Retry-After, never a 500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import tracemalloc

import pytest
from PIL import Image

from tests.imagefiles import bomb_png
from tests.serving import LiveServer, local_client, png_bytes

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from imgcls import Classifier  # noqa: E402
from imgcls.serve.app import ServeSettings, create_app, uvicorn_config  # noqa: E402
from imgcls.serve.uploads import UploadError, decode_upload  # noqa: E402


def solid_png(w: int, h: int) -> bytes:
    """A single-colour PNG: w x h pixels in a few kB (the shape of the 7000x7000 report)."""
    return png_bytes(Image.new("RGB", (w, h), (40, 160, 90)))


def ico_around(png: bytes, w: int = 16, h: int = 16) -> bytes:
    """An ICO file whose directory says w x h but whose one frame is ``png`` (any size)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", w, h, 0, 0, 1, 32, len(png), 22) + png


def slow(infer, seconds: float):
    def run(x):
        time.sleep(seconds)
        return infer(x)
    return run


class BlockedExplain:
    """gradcam_overlay that waits until released (at most 20 s): a slow Grad-CAM on demand."""

    def __init__(self, monkeypatch):
        import imgcls.serve.explain as ex

        self.real = ex.gradcam_overlay
        self.entered, self.release = threading.Event(), threading.Event()
        monkeypatch.setattr(ex, "gradcam_overlay", self)

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(20)
        return self.real(*args, **kwargs)


def post_in_thread(url: str, data: bytes, out: list) -> threading.Thread:
    def go():
        out.append(httpx.post(url, files={"file": ("x.png", data, "image/png")}, timeout=30))
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------- 6: /explain of huge images
def test_explain_shrinks_a_huge_upload_before_explaining(client, monkeypatch):
    import imgcls.explain

    real, seen = imgcls.explain.explain, []

    def spy(clf, images, **kw):
        seen.extend(im.size for im in images)
        return real(clf, images, **kw)

    monkeypatch.setattr(imgcls.explain, "explain", spy)
    warm = client.post("/explain", files={"file": ("small.png", solid_png(20, 20), "image/png")})
    assert warm.status_code == 200 and seen.pop() == (20, 20)  # imports done: the peak below is the request's
    data = solid_png(2500, 2500)  # 6.25 Mpx in ~20 kB
    tracemalloc.start()
    try:
        r = client.post("/explain", files={"file": ("big.png", data, "image/png")})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert seen == [(768, 768)]  # explained at the overlay's size, not at 2500 x 2500
    assert Image.open(io.BytesIO(r.content)).size == (768, 768)
    # numpy's colour maps at full size took 200+ MB here (6.4 GB for 7000 x 7000)
    assert peak < 60 * 2**20, f"{peak / 2**20:.0f} MiB traced"


def test_explain_does_not_stall_predict(trained_run, samples, monkeypatch):
    blocked = BlockedExplain(monkeypatch)
    app = create_app(trained_run, ServeSettings(backend="torch", max_wait_ms=2))
    # Grad-CAM hooks its module: with the torch backend it gets a copy of its own
    assert app.state.service.explain_clf.model is not app.state.classifier.model
    data, label = samples[0]
    with LiveServer(app) as base:
        out: list = []
        t = post_in_thread(base + "/explain", data, out)
        try:
            assert blocked.entered.wait(15), "the explain request never started"
            t0 = time.perf_counter()
            r = httpx.post(base + "/predict", files={"file": ("x.png", data, "image/png")}, timeout=5)
            waited = time.perf_counter() - t0
            assert r.status_code == 200 and r.json()["label"] == "abc"[label]
            assert waited < 3, f"/predict waited {waited:.1f} s behind /explain"
        finally:
            blocked.release.set()
            t.join(30)
    assert out and out[0].status_code == 200


def test_pending_explains_are_capped(trained_run, samples, monkeypatch):
    import imgcls.serve.app as serve_app

    blocked = BlockedExplain(monkeypatch)
    decodes: list = []
    real_decode = serve_app.decode_upload
    monkeypatch.setattr(serve_app, "decode_upload", lambda *a, **kw: decodes.append(1) or real_decode(*a, **kw))
    app = create_app(trained_run, ServeSettings(backend="torch", max_explain=2))
    data = samples[0][0]
    with LiveServer(app) as base:
        out: list = []
        threads = [post_in_thread(base + "/explain", data, out)]
        try:
            assert blocked.entered.wait(15)
            threads.append(post_in_thread(base + "/explain", data, out))  # admitted: waits its turn
            deadline = time.time() + 10
            while httpx.get(base + "/health").json()["load"]["explain_admitted"] < 2 and time.time() < deadline:
                time.sleep(0.02)
            t0 = time.perf_counter()
            r = httpx.post(base + "/explain", files={"file": ("x.png", data, "image/png")}, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "explain" in r.json()["detail"] and time.perf_counter() - t0 < 2
            assert len(decodes) == 2  # the refused one was refused before its upload was decoded
        finally:
            blocked.release.set()
            for t in threads:
                t.join(30)
    assert [r.status_code for r in out] == [200, 200]


def test_server_has_its_own_lower_pixel_limit(client, trained_run):
    from imgcls.cli import build_parser

    assert ServeSettings().max_pixels == 40_000_000
    r = client.post("/predict", files={"file": ("b.png", bomb_png(7000, 7000), "image/png")})  # 49 Mpx header
    assert r.status_code == 422 and "40.0 Mpx allowed (--max-pixels" in r.json()["detail"]
    args = build_parser().parse_args(["serve", str(trained_run), "--max-pixels", "1000000"])
    assert args.max_pixels == 1_000_000


def test_serve_cli_refuses_a_pixel_limit_above_pillows(trained_run, capsys):
    from imgcls.cli import main

    assert main(["serve", str(trained_run), "--max-pixels", "200000000"]) == 1
    assert "over Pillow's limit" in capsys.readouterr().err


# ---------------------------------------------------------------------- 7: formats and pixel checks
def test_only_documented_formats_are_read(client):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "ICO", sizes=[(16, 16)])
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"
    for name, data in [("i.ico", buf.getvalue()), ("e.eps", eps), ("big.ico", ico_around(solid_png(3000, 3000)))]:
        r = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == 415, (name, r.text)
        assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in r.json()["detail"]


def test_a_container_is_judged_by_its_image_not_its_directory():
    """An ICO whose directory says 16x16 but whose one frame is a 3000x3000 PNG is refused at
    its real size (and ICO itself only where a caller allows it: the service does not)."""
    data = ico_around(solid_png(3000, 3000))
    with pytest.raises(UploadError) as e:
        decode_upload(data, 3, 1 << 20, max_pixels=1_000_000, formats=("ICO",))
    assert e.value.status == 422 and "3000x3000 = 9.0 Mpx, more than the 1.0 Mpx allowed" in e.value.message
    assert decode_upload(ico_around(solid_png(40, 30)), 3, 1 << 20, formats=("ICO",)).size == (40, 30)


def test_decompression_bomb_warning_is_a_refusal(monkeypatch):
    """Between Pillow's limit and twice it Pillow only warns, also for an ICO's embedded frame;
    the service refuses before that frame is decoded."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    data = ico_around(solid_png(1500, 1000))  # 1.5 Mpx: Pillow warns, it does not refuse
    with pytest.raises(UploadError) as e:
        decode_upload(data, 3, 1 << 20, formats=("ICO",))
    assert e.value.status == 422 and "Image size (1500000 pixels) exceeds limit" in e.value.message


# ---------------------------------------------------------------------- 8: overload
async def _flood(base: str, path: str, data: bytes, n: int) -> list[tuple[int, str | None, float]]:
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        async def one():
            t0 = time.perf_counter()
            r = await c.post(path, files={"file": ("x.png", data, "image/png")})
            return r.status_code, r.headers.get("retry-after"), time.perf_counter() - t0
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 60)


def test_flood_gets_quick_503s_with_retry_after(trained_run, samples):
    """40 requests at once at a model that takes 0.25 s a batch, 4 queue places: without a
    bound they would all wait, the last about 10 s; now the excess is refused at once."""
    app = create_app(trained_run, ServeSettings(backend="torch", max_batch=1, max_queue=4, max_wait_ms=1))
    app.state.batcher.infer = slow(app.state.batcher.infer, 0.25)
    with LiveServer(app) as base:
        got = asyncio.run(_flood(base, "/predict", samples[0][0], 40))
        after = httpx.post(base + "/predict", files={"file": ("x.png", samples[0][0], "image/png")}, timeout=10)
    statuses = [s for s, _, _ in got]
    busy = [(ra, t) for s, ra, t in got if s == 503]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and len(busy) >= 20, statuses
    assert all(ra == "1" for ra, _ in busy)
    assert max(t for _, t in busy) < 2.0, sorted(t for _, t in busy)[-3:]
    assert after.status_code == 200  # and it serves again once the flood is over


def test_a_waiting_request_times_out_with_503(trained_run, samples):
    app = create_app(trained_run, ServeSettings(backend="torch", max_batch=1, timeout_s=0.4, max_wait_ms=1))
    app.state.batcher.infer = slow(app.state.batcher.infer, 1.0)
    with LiveServer(app) as base:
        got = asyncio.run(_flood(base, "/predict", samples[0][0], 4))
    assert [s for s, _, _ in got] == [503] * 4  # each would have waited 1-4 s
    assert all(ra == "1" and t < 1.5 for _, ra, t in got), got


def test_uvicorn_runs_with_a_concurrency_limit(trained_run, samples):
    """Beyond --limit-concurrency open connections, uvicorn itself answers 503."""
    app = create_app(trained_run, ServeSettings(backend="torch", limit_concurrency=3))
    assert uvicorn_config(app).limit_concurrency == 3
    data = samples[0][0]
    with LiveServer(app) as base:
        clients = [httpx.Client(base_url=base, timeout=10) for _ in range(4)]
        try:
            codes = [c.post("/predict", files={"file": ("x.png", data, "image/png")}).status_code for c in clients]
        finally:
            for c in clients:
                c.close()
    assert codes[:2] == [200, 200] and codes[3] == 503, codes  # connections stay open (keep-alive)


def test_pixel_budget_admits_small_images_and_refuses_a_crowd():
    from imgcls.serve.limits import Overloaded, PixelBudget

    async def main():
        budget = PixelBudget(capacity=10, max_waiting=1)
        async with budget.hold(8, 1):
            big = asyncio.create_task(_hold(budget, 5, 5))  # waits for room
            await asyncio.sleep(0.05)
            assert budget.waiting == 1
            with pytest.raises(Overloaded, match="waiting"):
                await _hold(budget, 5, 5)  # the one waiting place is taken
            assert await _hold(budget, 2, 1) == "done"  # fits now, while the big one waits
        assert await big == "done"
        async with budget.hold(10, 1):
            with pytest.raises(Overloaded, match="waited 0.1 s"):
                await _hold(budget, 1, 0.1)
        assert budget.used == 0 and budget.waiting == 0

    asyncio.run(main())


async def _hold(budget, pixels: int, timeout: float) -> str:
    async with budget.hold(pixels, timeout):
        return "done"


# ---------------------------------------------------------------------- 10: crafted requests
@pytest.fixture(scope="module")
def odd_classes_client():
    classes = ["zebra_crossing", "hedgehog", "猫 ネコ"]
    clf = Classifier.create("reference_cnn", classes=classes, in_chans=1, img_size=16, seed=0)
    with local_client(create_app(None, ServeSettings(backend="torch"), classifier=clf)) as c:
        yield c, classes


def test_class_names_outside_latin1_reach_the_header(odd_classes_client, samples):
    from urllib.parse import unquote

    c, classes = odd_classes_client
    r = c.post("/explain", params={"target": classes[2]}, files={"file": ("x.png", samples[0][0], "image/png")})
    assert r.status_code == 200, r.text
    assert r.headers["x-imgcls-target"] == "%E7%8C%AB %E3%83%8D%E3%82%B3"  # percent-encoded UTF-8
    assert unquote(r.headers["x-imgcls-target"]) == classes[2]
    assert classes[2] in [t["class"] for t in json.loads(r.headers["x-imgcls-top"])]
    r = c.post("/explain", params={"target": classes[0]}, files={"file": ("x.png", samples[0][0], "image/png")})
    assert r.headers["x-imgcls-target"] == "zebra_crossing"  # plain ASCII stays as it is


@pytest.mark.parametrize("top_k", ["Infinity", "-Infinity", "NaN", "2.5", "1e400", "true", "[1]", "{}", '"x"',
                                   '"9999999999999999999999999999999999999999999999999999999"'])
def test_top_k_that_is_not_a_whole_number_is_400(client, samples, top_k):
    import base64

    image = base64.b64encode(samples[0][0]).decode()
    body = f'{{"image": "{image}", "top_k": {top_k}}}'.encode()
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    if top_k.startswith('"99'):  # a whole number, only large: capped at the class count
        assert r.status_code == 200 and len(r.json()["top"]) == 3
    else:
        assert r.status_code == 400 and "top_k must be" in r.json()["detail"], r.text


def test_deeply_nested_json_is_400(client):
    body = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]


def test_decoder_errors_other_than_oserror_are_422(client):
    from tests.test_safety import FOUND_UPLOADS

    for data in FOUND_UPLOADS:  # Pillow raised TypeError, struct.error, OverflowError on these
        r = client.post("/predict", files={"file": ("f.jpg", data, "image/jpeg")})
        assert r.status_code == 422 and "corrupt or truncated" in r.json()["detail"], r.text


# ---------------------------------------------------------------------- 11: other sites' pages
def test_requests_for_another_host_name_are_refused(trained_run, samples):
    from fastapi.testclient import TestClient

    app = create_app(trained_run, ServeSettings(backend="torch"))
    with TestClient(app, base_url="http://attacker.example:8000") as c:  # DNS rebinding: the page's own name
        assert c.get("/health").status_code == 400
        assert c.post("/predict", files={"file": ("x.png", samples[0][0], "image/png")}).status_code == 400
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/health").status_code == 200, base


def test_allowed_host_names():
    import socket

    from imgcls.serve.middleware import allowed_hosts

    assert allowed_hosts() == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("10.0.0.5", ["Box.LAN", "fe80::1"]) == ["127.0.0.1", "localhost", "[::1]", "10.0.0.5",
                                                                 "box.lan", "[fe80::1]"]
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")


def test_posts_from_another_sites_page_are_refused(client, samples):
    files = {"file": ("x.png", samples[0][0], "image/png")}
    r = client.post("/predict", files=files, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert client.post("/predict", files=files, headers={"Origin": "null"}).status_code == 403
    assert client.post("/predict", files=files, headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    assert client.post("/predict", files=files).status_code == 200  # curl and scripts send no Origin


def test_openapi_holds_no_model_data(odd_classes_client):
    c, classes = odd_classes_client
    doc = json.dumps(c.get("/openapi.json").json(), ensure_ascii=False)
    assert "/predict" in doc
    for name in [*classes, "reference_cnn"]:
        assert name not in doc
