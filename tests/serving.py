"""Helpers for the web-service tests: an in-process client addressed like a local browser,
and a real uvicorn server on loopback."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
from PIL import Image


def local_client(app, **kw):
    """A TestClient that addresses the app as a browser on this machine does (Host: 127.0.0.1)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:8000", **kw)


def png_bytes(img: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 with a free port, configured as `imgcls serve` does
    (imgcls.serve.app.uvicorn_config); stopped on exit."""

    def __init__(self, app):
        import uvicorn

        from imgcls.serve.app import uvicorn_config

        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ---------------------------------------------------------------------- fixtures (tests/conftest.py)
def make_samples() -> list[tuple[bytes, int]]:
    """6 PNG uploads of the pattern images (classes 0..2 of ``trained_run``) with their labels."""
    from tests.conftest import pattern_images

    x, y = pattern_images(2, size=16, seed=11)
    return [(png_bytes(img), int(label)) for img, label in zip(x, y)]
