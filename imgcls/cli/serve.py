"""imgcls serve RUN [--host 127.0.0.1] [--port 8000] [--max-upload-mb 10] [--max-pixels 40000000] [--api-key KEY]"""

from __future__ import annotations

import argparse
import errno
import os
import socket

NAME = "serve"
HELP = "serve a trained model over HTTP: JSON API, web page at /, Grad-CAM explanations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (repeatable), e.g. the DNS name or address "
                        "clients use; 127.0.0.1, localhost, ::1 and --host always work")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest accepted image in pixels, judged before and after decoding (default: 40,000,000)")
    p.add_argument("--api-key", default=os.environ.get("IMGCLS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $IMGCLS_API_KEY, else no key)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="inference backend for /predict (default: auto)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests batched into one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default: 5 ms)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most /predict requests waiting for the model; more are answered 503 (default: 256)")
    p.add_argument("--max-explain", type=int, default=2,
                   help="most /explain requests admitted at once, one computing; more get 503 (default: 2)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a request may wait for the model; then 503 with Retry-After (default: 10)")
    p.add_argument("--limit-concurrency", type=int, default=64,
                   help="most open connections / running requests; beyond it uvicorn answers 503 (default: 64)")
    p.add_argument("--top-k", type=int, default=5, help="classes returned per image unless a request asks")
    p.add_argument("--device", default="auto")


def _check(args: argparse.Namespace) -> None:
    from PIL import Image

    from imgcls.errors import ImgclsError

    if not 0 < args.port < 65536:
        raise ImgclsError(f"--port {args.port} is out of range", "use 1-65535")
    if args.max_upload_mb <= 0 or args.max_batch < 1 or args.max_wait_ms < 0:
        raise ImgclsError("--max-upload-mb, --max-batch must be positive and --max-wait-ms >= 0",
                          "e.g. --max-upload-mb 10 --max-batch 32 --max-wait-ms 5")
    if args.top_k < 1:
        raise ImgclsError(f"--top-k {args.top_k} is below 1", "e.g. --top-k 5 (requests may ask for other counts)")
    if min(args.max_queue, args.max_explain, args.limit_concurrency, args.max_pixels) < 1 or not args.timeout > 0:
        raise ImgclsError("--max-queue, --max-explain, --limit-concurrency, --max-pixels and --timeout must be "
                          "positive", "e.g. --max-queue 256 --max-explain 2 --limit-concurrency 64 --timeout 10")
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow and args.max_pixels > pillow:
        raise ImgclsError(f"--max-pixels {args.max_pixels:,} is over Pillow's limit of {pillow:,} pixels, above which "
                          "every image is refused as a decompression bomb",
                          f"raise IMGCLS_MAX_IMAGE_PIXELS to at least {args.max_pixels} as well")


def _listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it, before anything is announced: a port in
    use is a one-line error here, not uvicorn's log line after "serving ..."."""
    from imgcls.errors import ImgclsError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ImgclsError(f"port {port} on {host} is already in use (another server?)",
                              "stop it, or choose another port with --port") from None
        raise ImgclsError(f"cannot listen on {host} port {port}: {exc.strerror or exc}",
                          "check --host (an address of this machine) and --port") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from imgcls.errors import ImgclsError

    _check(args)
    try:
        import uvicorn
    except ImportError:
        raise ImgclsError("serving needs fastapi and uvicorn", "pip install 'imgcls[serve]'") from None
    from imgcls.serve.app import ServeSettings, create_app, uvicorn_config
    from imgcls.serve.middleware import allowed_hosts

    hosts = allowed_hosts(args.host, args.allowed_host)
    settings = ServeSettings(max_upload_mb=args.max_upload_mb, api_key=args.api_key, backend=args.backend,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k,
                             device=args.device, max_pixels=args.max_pixels, max_queue=args.max_queue,
                             max_explain=args.max_explain, timeout_s=args.timeout,
                             limit_concurrency=args.limit_concurrency, allowed_hosts=hosts)
    app = create_app(args.run, settings)
    sock = _listen_socket(args.host, args.port)
    print(f"serving {args.run} on http://{args.host}:{args.port}/  (API docs: /docs; answers requests "
          f"addressed to {', '.join(hosts)})", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port)).run(sockets=[sock])
    finally:
        sock.close()
    return 0
