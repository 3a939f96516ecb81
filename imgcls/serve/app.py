"""The web service: ``create_app(run_dir, ServeSettings(...))`` -> a FastAPI app.

    POST /predict   multipart upload (field "file") or JSON {"image": base64, "top_k": 3} -> top-k
    POST /explain   same input -> Grad-CAM overlay PNG (top-k in the X-Imgcls-Top header)
    GET  /health    liveness + batching counters (never needs the API key)
    GET  /model     the model card
    GET  /          the web page;  GET /docs  OpenAPI docs (assets served locally, no CDN)

Bad input never reaches the model: see imgcls.serve.uploads for the status codes. Request
bodies are capped while they stream in (BodyLimit), so an oversized upload is refused
without being buffered.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from imgcls.serve.batching import DynamicBatcher
from imgcls.serve.uploads import UploadError, decode_base64, decode_upload

MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file


@dataclass
class ServeSettings:
    max_upload_mb: float = 10.0
    api_key: str | None = None
    backend: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 5
    device: str = "auto"
    max_pixels: int | None = None  # default: Pillow's limit as imgcls sets it (89.5 Mpx)

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit, and for a body
    that grows past it while streaming (chunked uploads declare no length)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _send_json(send, 413, {"detail": f"request body of {int(declared) / 2**20:.1f} MiB is "
                                                          f"over the {self.max_body / 2**20:.1f} MiB limit"})
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, f"request body is over the {self.max_body / 2**20:.1f} MiB limit")
            return msg

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _static(name: str) -> bytes:
    return resources.files("imgcls.serve").joinpath("static", name).read_bytes()


def create_app(run: str | Path, settings: ServeSettings | None = None, classifier=None) -> FastAPI:
    """The app for the model in ``run`` (or an already loaded ``classifier``, any
    :class:`~imgcls.bundle.ModelBundle`)."""
    from imgcls.bundle import ModelBundle
    from imgcls.engine.predictor import Predictor
    from imgcls.version import __version__

    s = settings or ServeSettings()
    clf = classifier if classifier is not None else ModelBundle.load(run)
    predictor = Predictor(clf, s.backend, s.device)  # the one inference path: backend, TTA, temperature
    backend = predictor.backend
    batcher = DynamicBatcher(predictor.logits, s.max_batch, s.max_wait_ms / 1000)
    transform = clf.preprocessing.pil_transform()
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="imgcls", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"{clf.architecture} classifier of {clf.num_classes} classes: "
                              f"{', '.join(clf.classes[:10])}{' …' if clf.num_classes > 10 else ''}")
    app.state.classifier, app.state.batcher, app.state.settings = clf, batcher, s
    bearer = HTTPBearer(auto_error=False, description="--api-key given to `imgcls serve`")

    async def require_key(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if s.api_key is None:
            return
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), s.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)]

    async def read_image(request: Request, channels: int | None = None):
        """(decoded PIL image, top_k, target) from a multipart or JSON request."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        top_k, target = request.query_params.get("top_k"), request.query_params.get("target")
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file") or form.get("image")
            if upload is None or isinstance(upload, str):
                raise UploadError(400, "multipart upload needs a file field named 'file'")
            data, name = await upload.read(), upload.filename or "upload"
            top_k = form.get("top_k", top_k)
            target = form.get("target", target)
        elif ctype == "application/json":
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UploadError(400, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise UploadError(400, "JSON body must be an object: {\"image\": base64, \"top_k\": 5}")
            data, name = decode_base64(body.get("image"), s.max_bytes), "image"
            top_k, target = body.get("top_k", top_k), body.get("target", target)
        else:
            raise UploadError(415, f"unsupported content type '{ctype or 'none'}': send multipart/form-data "
                                   "with a 'file' field, or application/json with base64 'image'")
        img = await run_in_threadpool(decode_upload, data, channels or clf.preprocessing.in_chans, s.max_bytes,
                                      s.max_pixels, name)
        return img, _top_k(top_k), _target(target)

    def _top_k(v) -> int:
        if v is None:
            return min(s.top_k, clf.num_classes)
        try:
            k = int(v)
        except (TypeError, ValueError):
            raise UploadError(400, f"top_k must be an integer, got {v!r}") from None
        if k < 1:
            raise UploadError(400, f"top_k must be >= 1, got {k}")
        return min(k, clf.num_classes)

    def _target(v) -> int | None:
        if v is None or v == "":
            return None
        if v in clf.classes:
            return clf.classes.index(v)
        raise UploadError(400, f"unknown target class {v!r}; classes: {', '.join(clf.classes[:20])}")

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "description": "base64 image bytes (a data: URL works too)"},
            "top_k": {"type": "integer"}, "target": {"type": "string"}}}}}}}

    @app.post("/predict", dependencies=guarded, openapi_extra=upload_doc,
              summary="Top-k classes of one image")
    async def predict(request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        img, k, _ = await read_image(request)
        x = await run_in_threadpool(transform, img)
        logits = await batcher.submit(x)
        p = predictor.probabilities(np.asarray(logits, dtype=np.float64)[None])[0]
        order = np.argsort(-p)[:k]
        return {"label": clf.classes[order[0]],
                "top": [{"class": clf.classes[i], "probability": round(float(p[i]), 6)} for i in order],
                "backend": backend.name, "time_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.post("/explain", dependencies=guarded, openapi_extra=upload_doc, response_class=Response,
              summary="Grad-CAM overlay PNG of one image",
              responses={200: {"content": {"image/png": {}}, "description": "the overlay"}})
    async def explain(request: Request) -> Response:
        img, k, target = await read_image(request, channels=3)  # RGB: the overlay shows the upload itself
        ov = await batcher.run_exclusive(_explain, img, target, k)
        top = [{"class": c, "probability": round(p, 6)} for c, p in ov.top]
        return Response(ov.png, media_type="image/png",
                        headers={"X-Imgcls-Target": ov.target, "X-Imgcls-Top": json.dumps(top),
                                 "Cache-Control": "no-store"})

    def _explain(img, target, k):
        from imgcls.serve.explain import gradcam_overlay

        dev = getattr(backend, "device", None)
        try:
            return gradcam_overlay(clf, img, target, k, device=str(dev or "cpu"))
        finally:
            if dev is not None:  # the explainer hands the module back on the CPU: restore the backend's setup
                backend.model.to(dev)
                if backend.channels_last:
                    backend.model.to(memory_format=torch.channels_last)

    @app.get("/health", summary="Liveness and batching counters (no API key needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": clf.architecture, "classes": clf.num_classes, "backend": backend.name,
                "uptime_s": round(time.time() - started, 1), "auth": s.api_key is not None,
                "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, **batcher.stats.to_dict()}}

    @app.get("/model", dependencies=guarded, summary="The model card (model.json)")
    async def model_card() -> dict[str, Any]:
        return {**clf.card, "serving": {"backend": backend.name, "max_upload_mb": s.max_upload_mb,
                                        "max_batch": s.max_batch}}

    # The page and the docs are static shells with no model data: they load without the
    # key, and the page sends the key (typed into it) with every API call it makes.
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise HTTPException(404, "not found")
        return Response(_static(name), media_type=types[name])

    _mount_docs(app)
    app.add_middleware(BodyLimit, max_body=s.max_bytes * 4 // 3 + MULTIPART_OVERHEAD)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package's files: /docs works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    import swagger_ui_bundle

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imgcls API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

