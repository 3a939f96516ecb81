"""Load on `imgcls serve` over loopback: N requests from C concurrent clients.

    python bench/serve_load.py RUN --images ../shared/data/mnist.npz --requests 2000 --clients 16

Starts `imgcls serve RUN` as its own process on 127.0.0.1 (a free port), sends PNG
uploads to /predict from C clients (bounded: a fixed number of requests and a time
limit), checks every answer, and prints JSON: throughput, p50/p90/p99 latency, errors,
and the server's batching counters. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_pngs(npz: str, n: int) -> list[tuple[bytes, int]]:
    from PIL import Image

    with np.load(npz) as d:
        x, y = d["x_test"][:n], d["y_test"][:n]
    out = []
    for img, label in zip(x, y):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((buf.getvalue(), int(label)))
    return out


async def load(base: str, samples, classes, total: int, clients: int, limit_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    wrong = 0

    async def worker(ids):
        nonlocal wrong
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            for i in ids:
                data, label = samples[i % len(samples)]
                t0 = time.perf_counter()
                try:
                    r = await c.post("/predict", files={"file": ("x.png", data, "image/png")})
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:80]}")
                elif r.json()["label"] != classes[label]:
                    wrong += 1

    ids = list(range(total))
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(ids[k::clients]) for k in range(clients))), limit_s)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": total, "clients": clients, "wall_s": round(wall, 2), "req_per_s": round(total / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": len(errors), "error_samples": errors[:3],
            "wrong_labels": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--images", default="../shared/data/mnist.npz", help="Keras-layout .npz with x_test, y_test")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--limit-s", type=float, default=300)
    ap.add_argument("--serve-args", default="", help="extra flags for imgcls serve, e.g. '--backend torch'")
    args = ap.parse_args()

    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", args.run, "--host", "127.0.0.1",
                               "--port", str(port), *args.serve_args.split()], cwd=root,
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(base + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
        classes = httpx.get(base + "/model").json()["classes"]
        samples = sample_pngs(args.images, 500)
        asyncio.run(load(base, samples[:16], classes, 64, 4, 60))  # warm-up
        before = httpx.get(base + "/health").json()["batching"]
        res = asyncio.run(load(base, samples, classes, args.requests, args.clients, args.limit_s))
        after = httpx.get(base + "/health").json()["batching"]
        batches = after["batches"] - before["batches"]
        res.update({"backend": health["backend"], "mean_batch": round((after["requests"] - before["requests"])
                                                                       / max(batches, 1), 2),
                    "largest_batch": after["largest_batch"]})
        print(json.dumps(res, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
