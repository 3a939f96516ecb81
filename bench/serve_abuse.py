"""Abuse of `imgcls serve` over loopback: C clients for S seconds mixing good and hostile requests.

    flock /tmp/imgcls-heavy.lock python bench/serve_abuse.py --seconds 60 --clients 32 \\
        --out bench/results/serve_abuse.json

Trains a small model first (the reference CNN, 8 epochs on scikit-learn's embedded digits,
as `make demo` does; ``--run`` reuses one), starts `imgcls serve` as its own process on 127.0.0.1 (a free port),
and has C clients send requests back to back, each one drawn from this mix (``--mix``):

    predict        /predict with a test-split digit PNG (its label is checked)
    explain_big    /explain with a 6324x6324 (40.0 Mpx) PNG, just under the default --max-pixels
    over_pixels    /predict with an 8000x8000 (64 Mpx) PNG                       -> 422
    over_bytes     /predict with 12 MiB, over --max-upload-mb 10                 -> 413
    truncated      /predict with the first half of a 512x512 photo-like PNG      -> 422
    not_image      /predict with text, or a PostScript (EPS) header              -> 415

Only 127.0.0.1 is contacted, and the run is bounded (S seconds plus the requests in flight,
each with a 30 s client timeout). The JSON result: counts per kind and status, 5xx
responses (overload 503s with Retry-After counted apart from any other 5xx), transport
errors, /predict latency percentiles, the server's peak RSS (its process tree, sampled
from /proc every 50 ms, and the kernel's high-water mark VmHWM), and the checks against
the targets: no 5xx but overload 503s, every 503 with Retry-After, peak RSS < 3 GB,
/predict p99 < 2 s.

``--once`` sends no load, only one /explain and one /predict of the 40 Mpx PNG, and reports
their times and the peak RSS; with ``--server-root DIR`` the server runs from another
checkout (an older commit), for a before/after figure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402
from serve_load import free_port  # noqa: E402

DEFAULT_MIX = "predict=60,explain_big=8,over_pixels=8,over_bytes=4,truncated=10,not_image=10"
EXPECTED = {"predict": {200}, "explain_big": {200}, "over_pixels": {422}, "over_bytes": {413}, "truncated": {422},
            "not_image": {415}}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def payloads() -> dict[str, list[tuple[bytes, int | None]]]:
    """The bytes each kind of request sends (with the digit's label for predict)."""
    from PIL import Image

    from imgcls.data.datasets import digits as digits_set

    test = digits_set().test  # the test split, 28x28 as the model was trained on
    digits = [(png(Image.fromarray(x[0].numpy())), int(y)) for x, y in zip(test.images[:200], test.labels[:200])]
    big = Image.new("RGB", (6324, 6324), (30, 140, 200))
    big.paste((250, 250, 250), (2000, 2000, 4300, 4300))  # a square to explain, a few kB more
    rng = np.random.default_rng(0)
    photo = png(Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)))
    return {"predict": digits,
            "explain_big": [(png(big), None)],
            "over_pixels": [(png(Image.new("L", (8000, 8000), 128)), None)],
            "over_bytes": [(b"\x89PNG\r\n\x1a\n" + os.urandom(12 * 2**20), None)],
            "truncated": [(photo[: len(photo) // 2], None)],
            "not_image": [(b"hello, this is not an image\n" * 20, None),
                          (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", None)]}


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its children, summed, from /proc."""

    def __init__(self, pid: int, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak_kb, self.stop = pid, every_s, 0, threading.Event()

    def tree(self) -> list[int]:
        children: dict[int, list[int]] = defaultdict(list)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children[ppid].append(int(entry))
                except (OSError, IndexError, ValueError):
                    continue
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            total = sum(status_kb(p, "VmRSS") for p in self.tree())
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(self.every_s)


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def abuse(base: str, data: dict, classes: list[str], mix: dict[str, int], clients: int, seconds: float,
                seed: int) -> list[dict]:
    import httpx

    kinds, weights = list(mix), list(mix.values())
    records: list[dict] = []
    end = time.perf_counter() + seconds

    async def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            while time.perf_counter() < end:
                kind = rng.choices(kinds, weights)[0]
                body, label = rng.choice(data[kind])
                path = "/explain" if kind == "explain_big" else "/predict"
                rec = {"kind": kind, "status": None}
                t0 = time.perf_counter()
                try:
                    r = await c.post(path, files={"file": ("upload.png", body, "image/png")})
                    rec.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
                    if kind == "predict" and r.status_code == 200:
                        rec["wrong"] = r.json()["label"] != classes[label]
                except httpx.HTTPError as exc:  # the server closed the connection, a timeout, ...
                    rec["error"] = type(exc).__name__
                rec["latency_s"] = time.perf_counter() - t0
                records.append(rec)

    await asyncio.gather(*(client(k) for k in range(clients)))
    return records


def summarise(records: list[dict], wall: float) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_kind[r["kind"]][str(r["status"]) if r["status"] is not None else f"error:{r['error']}"] += 1
    statuses = Counter(r["status"] for r in records if r["status"] is not None)
    busy = [r for r in records if r["status"] == 503]
    other_5xx = sum(n for s, n in statuses.items() if s >= 500 and s != 503)
    unexpected = sum(1 for r in records if r["status"] not in EXPECTED[r["kind"]] | {503})
    pred = np.array([r["latency_s"] for r in records if r["kind"] == "predict" and r["status"] == 200]) * 1000
    pred_all = np.array([r["latency_s"] for r in records if r["kind"] == "predict"]) * 1000
    expl = np.array([r["latency_s"] for r in records if r["kind"] == "explain_big" and r["status"] == 200]) * 1000
    busy_ms = np.array([r["latency_s"] for r in busy]) * 1000

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 1) if len(a) else None

    return {"requests": len(records), "wall_s": round(wall, 1), "req_per_s": round(len(records) / wall, 1),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "responses_5xx": sum(n for s, n in statuses.items() if s >= 500),
            "responses_503": len(busy), "responses_503_with_retry_after": sum(1 for r in busy if r["retry_after"]),
            "responses_5xx_other_than_503": other_5xx, "unexpected_status": unexpected,
            "transport_errors": dict(Counter(r["error"] for r in records if r["status"] is None)),
            "wrong_labels": sum(1 for r in records if r.get("wrong")),
            "predict_ok_ms": {"n": len(pred), "p50": pct(pred, 50), "p90": pct(pred, 90), "p99": pct(pred, 99),
                              "max": pct(pred, 100)},
            "predict_all_ms": {"n": len(pred_all), "p50": pct(pred_all, 50), "p99": pct(pred_all, 99)},
            "explain_ok_ms": {"n": len(expl), "p50": pct(expl, 50), "p99": pct(expl, 99)},
            "busy_503_ms": {"n": len(busy_ms), "p50": pct(busy_ms, 50), "p99": pct(busy_ms, 99)}}


def train_model(out: Path) -> Path:
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", "digits", "--model", "reference_cnn", "--epochs", "8",
           "--out", str(out), "--name", "abuse", "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "abuse"


def start_server(run: Path, port: int, extra: list[str], root: Path = ROOT) -> subprocess.Popen:
    """`imgcls serve` from the checkout ``root`` (default: this one) as a process of its own."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(root)}
    server = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(run), "--host", "127.0.0.1",
                               "--port", str(port), *extra], cwd=root, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return server
        except httpx.HTTPError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.3)


def once(base: str, data: dict) -> dict:
    """One /explain, then one /predict, of the 40 Mpx PNG: their status and seconds."""
    import httpx

    out = {}
    for path in ("/explain", "/predict"):
        t0 = time.perf_counter()
        r = httpx.post(base + path, files={"file": ("big.png", data["explain_big"][0][0], "image/png")}, timeout=300)
        out[path] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 2)}
    return out


def targets(res: dict, peak_mb: float) -> dict:
    return {"no_5xx_but_overload_503": res["responses_5xx_other_than_503"] == 0,
            "every_503_has_retry_after": res["responses_503"] == res["responses_503_with_retry_after"],
            "no_unexpected_status": res["unexpected_status"] == 0 and not res["transport_errors"],
            "peak_rss_under_3gb": peak_mb < 3 * 1024,
            "predict_p99_under_2s": (res["predict_ok_ms"]["p99"] or 1e9) < 2000}


def measure(args: argparse.Namespace, run: Path, mix: dict[str, int]) -> dict:
    """Start the server, warm it up, run the load (or --once), and stop it; the results."""
    import httpx

    data = payloads()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(run, port, args.serve_args.split(), Path(args.server_root or ROOT))
    idle_kb = status_kb(server.pid, "VmRSS")
    sampler = RssSampler(server.pid)
    sampler.start()
    try:
        classes = httpx.get(base + "/model").json()["classes"]
        asyncio.run(abuse(base, {"predict": data["predict"]}, classes, {"predict": 1}, 4, 2, args.seed))  # warm-up
        t0 = time.perf_counter()
        if args.once:
            res = {"once": once(base, data)}
        else:
            records = asyncio.run(abuse(base, data, classes, mix, args.clients, args.seconds, args.seed))
            res = summarise(records, time.perf_counter() - t0)
            res["health_after"] = httpx.get(base + "/health").json()
        hwm_kb = status_kb(server.pid, "VmHWM")
    finally:
        sampler.stop.set()
        server.terminate()
        server.wait(timeout=30)
    peak_mb = round(max(sampler.peak_kb, hwm_kb) / 1024, 1)
    res.update({"server_peak_rss_mb": peak_mb, "server_tree_peak_rss_sampled_mb": round(sampler.peak_kb / 1024, 1),
                "server_vmhwm_mb": round(hwm_kb / 1024, 1), "server_idle_rss_mb": round(idle_kb / 1024, 1)})
    if not args.once:
        res["targets"] = targets(res, peak_mb)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run folder (default: train the reference CNN on digits first)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... (default: {DEFAULT_MIX})")
    ap.add_argument("--serve-args", default="", help="extra flags for imgcls serve, e.g. '--max-explain 4'")
    ap.add_argument("--once", action="store_true",
                    help="no load: one /explain and one /predict of the 40 Mpx PNG, their times and the peak RSS")
    ap.add_argument("--server-root", help="run imgcls serve from this checkout (e.g. an older commit, for a "
                                          "before/after figure); default: this one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    mix = {k: int(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    with tempfile.TemporaryDirectory(prefix="imgcls-abuse-") as tmp:
        run = Path(args.run) if args.run else train_model(Path(tmp))
        res = measure(args, run, mix)
    res["config"] = {"clients": args.clients, "seconds": args.seconds, "mix": mix, "serve_args": args.serve_args,
                     "once": args.once, "server_root": args.server_root or str(ROOT),
                     "run": str(args.run or "reference_cnn, 8 epochs on digits"), "seed": args.seed,
                     "command": " ".join(sys.argv), "machine": machine(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
