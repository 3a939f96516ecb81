"""The web service: ``create_app(run_dir, ServeSettings(...))`` -> a FastAPI app.

    POST /predict   multipart upload (field "file") or JSON {"image": base64, "top_k": 3} -> top-k
    POST /explain   same input -> Grad-CAM overlay PNG (top-k in the X-Imgcls-Top header)
    GET  /health    liveness, batching and load counters (never needs the API key: without it,
                    when one is set, only {"status": "ok", "auth": true})
    GET  /model     the model card
    GET  /          the web page;  GET /docs  OpenAPI docs (assets served locally, no CDN)

Bad input never reaches the model: see imgcls.serve.uploads for the status codes (always a
4xx with a one-line JSON ``detail``). Request bodies are capped while they stream in
(BodyLimit); requests addressed to a host name that is not this server's are refused
(TrustedHost), and so are browser requests sent by another site's page
(SameOrigin). Under overload a request gets 503 with Retry-After at once (imgcls.serve.limits):
the batcher's queue, the pixels being decoded and the Grad-CAM requests are all bounded, and
no request waits longer than ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from imgcls.data.cache import decode_min_side
from imgcls.engine.decisions import decide
from imgcls.serve.batching import DynamicBatcher
from imgcls.serve.limits import Lane, Overloaded, PixelBudget
from imgcls.serve.middleware import LOCAL_NAMES, BodyLimit, SameOrigin, TrustedHost
from imgcls.serve.uploads import (DEFAULT_MAX_PIXELS, UploadError, claimed_pixels, decode_base64, decode_upload,
                                  pixel_limit)

MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file
__all__ = ["BodyLimit", "ServeSettings", "create_app", "uvicorn_config"]


@dataclass
class ServeSettings:
    max_upload_mb: float = 10.0
    api_key: str | None = None
    backend: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 5
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS  # the largest image accepted (never above Pillow's limit)
    max_queue: int = 256  # /predict requests waiting for the model; beyond: 503
    max_explain: int = 2  # /explain requests admitted at once (one runs, the others wait); beyond: 503
    max_waiting_uploads: int = 32  # uploads waiting for room to decode (2 x max_pixels at once); beyond: 503
    timeout_s: float = 10.0  # the longest a request waits for decoding room, the model or Grad-CAM: then 503
    limit_concurrency: int = 64  # uvicorn's limit on open connections / running requests (imgcls serve)
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOCAL_NAMES))  # Host header names answered

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class Upload(NamedTuple):
    data: bytes
    name: str
    top_k: Any
    target: Any


def _static(name: str) -> bytes:
    return resources.files("imgcls.serve").joinpath("static", name).read_bytes()


# Header values are latin-1 on the wire: a class name with other characters (or '%') is sent
# percent-encoded UTF-8, which the page decodes with decodeURIComponent.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_text(text: str) -> str:
    return quote(text, safe=_HEADER_SAFE)


def _own_model(clf, predictor):
    """The classifier Grad-CAM uses. It hooks the module and needs gradients, so when /predict's
    backend runs the same module (torch) it gets a copy of its own, and neither waits for the other."""
    inner = predictor.backend  # the backend that holds the module (torch) or a session (ONNX)
    if getattr(inner, "model", None) is not clf.model:
        return clf
    twin = copy.copy(clf)
    twin.model = copy.deepcopy(clf.model).to("cpu").to(memory_format=torch.contiguous_format)
    return twin


class Service:
    """Everything a request needs: the model, its predictor (backend, TTA, temperature: the one
    every road uses), the batcher and the limits."""

    def __init__(self, clf, predictor, s: ServeSettings):
        self.clf, self.predictor, self.s = clf, predictor, s
        # rows of [logits | features] when the model's unknown score is kNN, else logits (Predictor.packed)
        self.batcher = DynamicBatcher(predictor.packed, s.max_batch, s.max_wait_ms / 1000, s.max_queue)
        self.budget = PixelBudget(2 * pixel_limit(s.max_pixels), s.max_waiting_uploads)
        self.explainer = Lane("explain", s.max_explain)
        self.explain_clf = _own_model(clf, predictor)
        self.transform = clf.preprocessing.pil_transform()
        self.min_side = decode_min_side(clf.preprocessing)  # JPEGs decode as eval_batches decodes files
        self.thresholds = clf.decision_thresholds()  # multi-label: the per-class thresholds of model.json
        self.started = time.time()

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        await self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()

    async def read(self, request: Request) -> Upload:
        """The uploaded bytes and options of a multipart or JSON request."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        top_k, target = request.query_params.get("top_k"), request.query_params.get("target")
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file") or form.get("image")
            if upload is None or isinstance(upload, str):
                raise UploadError(400, "multipart upload needs a file field named 'file'")
            return Upload(await upload.read(), upload.filename or "upload", form.get("top_k", top_k),
                          form.get("target", target))
        if ctype == "application/json":
            try:
                body = await request.json()
            # ValueError: JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is the
            # refusal of an integer longer than Python converts (4300 digits, sys.int_info)
            except (ValueError, RecursionError):
                raise UploadError(400, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise UploadError(400, "JSON body must be an object: {\"image\": base64, \"top_k\": 5}")
            return Upload(decode_base64(body.get("image"), self.s.max_bytes), "image", body.get("top_k", top_k),
                          body.get("target", target))
        raise UploadError(415, f"unsupported content type '{ctype[:60] or 'none'}': send multipart/form-data "
                               "with a 'file' field, or application/json with base64 'image'")

    async def decoded(self, up: Upload, channels: int, finish, deadline: float, min_side: int | None = None,
                      draft_up_to: int | None = None):
        """``finish(decoded image)``, computed in a worker thread once the pixel budget has room
        for the upload: decoding and shrinking hold the memory, nothing after them does.
        ``min_side``, ``draft_up_to``: see :func:`decode_upload`."""
        pixels = await run_in_threadpool(claimed_pixels, up.data)
        if pixels > pixel_limit(self.s.max_pixels):
            pixels = 0  # refused from its header, before anything is decoded
        async with self.budget.hold(pixels, deadline - asyncio.get_running_loop().time()):
            return await run_in_threadpool(self._decode_then, up, channels, finish, min_side, draft_up_to)

    def _decode_then(self, up: Upload, channels: int, finish, min_side: int | None, draft_up_to: int | None):
        return finish(decode_upload(up.data, channels, self.s.max_bytes, self.s.max_pixels, up.name,
                                    min_side=min_side, draft_up_to=draft_up_to))

    def top_k(self, v: Any) -> int:
        n = self.clf.num_classes
        if v is None:
            return min(self.s.top_k, n)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, float) and not v.is_integer()):
            raise UploadError(400, f"top_k must be a whole number, got {_short(v)}")
        try:
            k = int(v)
        except (TypeError, ValueError, OverflowError):
            raise UploadError(400, f"top_k must be a whole number, got {_short(v)}") from None
        if k < 1:
            raise UploadError(400, f"top_k must be >= 1, got {k}")
        return min(k, n)

    def target(self, v: Any) -> int | None:
        if v is None or v == "":
            return None
        if isinstance(v, str) and v in self.clf.classes:
            return self.clf.classes.index(v)
        raise UploadError(400, f"unknown target class {_short(v)}; classes: {', '.join(self.clf.classes[:20])}")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of a batch of logits (N, K)."""
        return self.predictor.probabilities(logits)

    async def predict(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        up = await self.read(request)
        k = self.top_k(up.top_k)
        self.batcher.check_room()  # a full queue refuses before the upload is decoded
        deadline = asyncio.get_running_loop().time() + self.s.timeout_s
        x = await self.decoded(up, self.clf.preprocessing.in_chans, self.transform, deadline, self.min_side)
        row = await self.batcher.submit(x, timeout=deadline - asyncio.get_running_loop().time())
        logits, features = self.predictor.unpack(np.asarray(row, dtype=np.float64)[None])
        p = self.probabilities(logits)
        [pred] = decide(self.clf.classes, p, [up.name], k, thresholds=self.thresholds,
                          assessment=self.predictor.assess(logits, features))
        answer = pred.to_dict()
        del answer["source"]
        return {**answer, "backend": self.predictor.name, "time_ms": round(1000 * (time.perf_counter() - t0), 2)}

    async def explain(self, request: Request) -> Response:
        from imgcls.serve.explain import explain_side, gradcam_overlay, shrink_for_explain

        up = await self.read(request)
        k, target = self.top_k(up.top_k), self.target(up.target)
        deadline = asyncio.get_running_loop().time() + self.s.timeout_s
        img_size = self.clf.preprocessing.img_size
        shrink = partial(shrink_for_explain, img_size=img_size)
        dev = str(self.predictor.device)
        with self.explainer.place() as place:  # refused (503) before any decoding when the lane is full
            # RGB: the overlay shows the upload itself. An image it keeps at its size decodes as
            # /predict decodes it (a JPEG at reduced scale), so both see the same pixels; a
            # larger one decodes at full size, to be shrunk to the overlay's size
            img = await self.decoded(up, 3, shrink, deadline, self.min_side, draft_up_to=explain_side(img_size))
            ov = await place.run(gradcam_overlay, self.explain_clf, img, target, k, dev,
                                 timeout=deadline - asyncio.get_running_loop().time())
        top = [{"class": c, "probability": round(p, 6)} for c, p in ov.top]
        return Response(ov.png, media_type="image/png",
                        headers={"X-Imgcls-Target": header_text(ov.target), "X-Imgcls-Top": json.dumps(top),
                                 "Cache-Control": "no-store"})

    def health(self, authorized: bool = True) -> dict[str, Any]:
        """Liveness and counters; without the API key (when one is set) only the status, since
        the rest names the model (architecture, class count, task)."""
        s, clf = self.s, self.clf
        if not authorized:
            return {"status": "ok", "auth": True}
        return {"status": "ok", "model": clf.architecture, "classes": clf.num_classes, "backend": self.predictor.name,
                "task": "multi" if clf.multi_label else "single",
                "uptime_s": round(time.time() - self.started, 1), "auth": s.api_key is not None,
                "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, **self.batcher.stats.to_dict()},
                "load": {"queued": self.batcher.queued, "max_queue": s.max_queue,
                         "explain_admitted": self.explainer.admitted, "max_explain": s.max_explain,
                         "decoding_mpx": round(self.budget.used / 1e6, 2), "uploads_waiting": self.budget.waiting,
                         "timeout_s": s.timeout_s}}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def create_app(run: str | Path, settings: ServeSettings | None = None, classifier=None) -> FastAPI:
    """The app for the model in ``run`` (or an already loaded ``classifier``, any
    :class:`~imgcls.bundle.ModelBundle`)."""
    from imgcls.bundle import ModelBundle
    from imgcls.engine.predictor import Predictor
    from imgcls.version import __version__

    s = settings or ServeSettings()
    clf = classifier if classifier is not None else ModelBundle.load(run)
    # the one inference path every road shares: backend, test-time augmentation, temperature
    svc = Service(clf, Predictor(clf, s.backend, s.device), s)
    # the OpenAPI document is served without the key: it describes the API, never the model
    app = FastAPI(title="imgcls", version=__version__, lifespan=svc.lifespan, docs_url=None, redoc_url=None,
                  description="An image classifier: POST an image to /predict for its top classes, to /explain "
                              "for a Grad-CAM overlay. GET /model (with the API key, when one is set) describes "
                              "the model.")
    app.state.classifier, app.state.batcher, app.state.settings, app.state.service = clf, svc.batcher, s, svc
    _add_routes(app, svc, [Depends(_key_check(s.api_key))])
    _add_error_handlers(app)
    _mount_docs(app)
    app.add_middleware(BodyLimit, max_body=s.max_bytes * 4 // 3 + MULTIPART_OVERHEAD)
    app.add_middleware(SameOrigin)
    app.add_middleware(TrustedHost, allowed_hosts=s.allowed_hosts)
    return app


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """How ``imgcls serve`` runs the app: uvicorn with the settings' concurrency limit (beyond
    it uvicorn itself answers 503 and closes the connection) and a short keep-alive."""
    import uvicorn

    s: ServeSettings = app.state.settings
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=s.limit_concurrency,
                          timeout_keep_alive=5)


# the one reader of "Authorization: Bearer KEY": the guarded routes' dependency and /health's
_BEARER = HTTPBearer(auto_error=False, description="--api-key given to `imgcls serve`")


def _key_check(api_key: str | None):
    async def require_key(cred: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> None:
        if not key_matches(api_key, cred.credentials if cred is not None else None):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_key


def key_matches(api_key: str | None, given: str | None) -> bool:
    """No key is set, or ``given`` is it (compared in constant time)."""
    if api_key is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded):
        return JSONResponse({"detail": f"server busy: {exc.message}"}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})


UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "base64 image bytes (a data: URL works too)"},
        "top_k": {"type": "integer"}, "target": {"type": "string"}}}}}}}
BUSY = {503: {"description": "server busy (queue full or timed out): retry after the Retry-After seconds"}}


def _add_routes(app: FastAPI, svc: Service, guarded: list) -> None:
    @app.post("/predict", dependencies=guarded, openapi_extra=UPLOAD_DOC, responses=BUSY,
              summary="Top-k classes of one image")
    async def predict(request: Request) -> dict[str, Any]:
        return await svc.predict(request)

    @app.post("/explain", dependencies=guarded, openapi_extra=UPLOAD_DOC, response_class=Response,
              summary="Grad-CAM overlay PNG of one image",
              responses={200: {"content": {"image/png": {}}, "description": "the overlay"}, **BUSY})
    async def explain(request: Request) -> Response:
        return await svc.explain(request)

    # Not guarded, so monitors and the page's key prompt work without the key; what it says
    # of the model then stays behind it
    @app.get("/health", summary="Liveness, batching and load counters (no API key needed; without it, when one "
                                "is set, only the status)")
    async def health(request: Request) -> dict[str, Any]:
        cred = await _BEARER(request)
        return svc.health(key_matches(svc.s.api_key, cred.credentials if cred is not None else None))

    @app.get("/model", dependencies=guarded, summary="The model card (model.json)")
    async def model_card() -> dict[str, Any]:
        s = svc.s
        return {**svc.clf.card, "serving": {"backend": svc.predictor.name, "max_upload_mb": s.max_upload_mb,
                                            "max_pixels": pixel_limit(s.max_pixels), "max_batch": s.max_batch}}

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
