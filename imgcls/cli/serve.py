"""imgcls serve RUN [--host 127.0.0.1] [--port 8000] [--max-upload-mb 10] [--api-key KEY]"""

from __future__ import annotations

import argparse
import os

NAME = "serve"
HELP = "serve a trained model over HTTP: JSON API, web page at /, Grad-CAM explanations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10)")
    p.add_argument("--api-key", default=os.environ.get("IMGCLS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $IMGCLS_API_KEY, else no key)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="inference backend for /predict (default: auto)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests batched into one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default: 5 ms)")
    p.add_argument("--top-k", type=int, default=5, help="classes returned per image unless a request asks")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from imgcls.errors import ImgclsError
    from imgcls.serve.app import ServeSettings, create_app

    if not 0 < args.port < 65536:
        raise ImgclsError(f"--port {args.port} is out of range", "use 1-65535")
    if args.max_upload_mb <= 0 or args.max_batch < 1 or args.max_wait_ms < 0:
        raise ImgclsError("--max-upload-mb, --max-batch must be positive and --max-wait-ms >= 0",
                          "e.g. --max-upload-mb 10 --max-batch 32 --max-wait-ms 5")
    try:
        import uvicorn
    except ImportError:
        raise ImgclsError("serving needs fastapi and uvicorn", "pip install 'imgcls[serve]'") from None
    settings = ServeSettings(max_upload_mb=args.max_upload_mb, api_key=args.api_key, backend=args.backend,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k,
                             device=args.device)
    app = create_app(args.run, settings)
    print(f"serving {args.run} on http://{args.host}:{args.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
