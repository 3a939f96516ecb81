"""Start-up: `imgcls --help`, and `imgcls train` from the command to its first training batch.

Each measurement is a fresh process timed from launch (`time.time()` in this process just
before the child starts, against the child's clock at the event; one machine, one clock).
For the first batch the child is this file (`--child`): it wraps the base callback's
``on_batch_start`` / ``on_batch_end``, runs the ordinary CLI entry, and writes when the
first batch started (with the heavy modules already imported then) and when its optimizer
step was done, then exits (the rest of the run is not needed).

    flock /tmp/imgcls-heavy.lock python bench/startup.py --rounds 5 --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import user_env, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "sklearn", "rich", "matplotlib", "torchvision", "scipy", "pandas", "onnx", "onnxruntime",
         "fastapi", "cleanlab", "imgcls.explain", "imgcls.export", "imgcls.serve", "torch._dynamo", "sympy")


def child(out: str, argv: list[str]) -> None:
    import imgcls.engine.callbacks as C  # torch: imported before the first batch anyway

    seen: dict = {}

    def batch_start(self, state) -> None:
        if not seen:
            seen.update(t=time.time(), heavy_imported=[m for m in HEAVY if m in sys.modules])

    def batch_end(self, state) -> None:  # the first optimizer step is done (torch.optim imports torch._dynamo)
        seen["t_end"] = time.time()
        Path(out).write_text(json.dumps(seen))
        os._exit(0)

    C.Callback.on_batch_start = batch_start
    C.Callback.on_batch_end = batch_end
    from imgcls.cli import main

    sys.exit(main(argv))


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def first_batch_s(data: str, model: str, env: dict, tmp: Path, i: int) -> dict:
    out = tmp / f"fb{i}.json"
    cmd = [sys.executable, __file__, "--child", str(out), "--", "train", "--data", data, "--model", model,
           "--out", str(tmp / "runs"), "--name", f"r{i}"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not out.is_file():
        raise SystemExit(f"the child never reached a training batch (rc {proc.returncode}): {proc.stderr[-2000:]}")
    rec = json.loads(out.read_text())
    return {"first_batch_s": round(rec["t"] - t0, 3), "first_step_done_s": round(rec["t_end"] - t0, 3),
            "heavy_imported": rec["heavy_imported"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    ap.add_argument("--model", default="reference_cnn")
    ap.add_argument("--out", help="write the JSON here too")
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    env = user_env({"PYTHONPATH": str(ROOT)})  # bytecode cached, as a user's Python does
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timed([sys.executable, "-m", "imgcls", "train", "--help"], env)  # warm the OS file cache once
        for i in range(args.rounds):  # interleaved, so machine load spreads over both
            row = {"round": i, "help_s": round(timed([sys.executable, "-m", "imgcls", "--help"], env), 3)}
            row.update(first_batch_s(args.data, args.model, env, Path(tmp), i))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"bench": "startup", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "load_avg_end": os.getloadavg(), "data": args.data, "model": args.model, "runs": rows,
              "median_help_s": round(statistics.median(r["help_s"] for r in rows), 3),
              "median_first_batch_s": round(statistics.median(r["first_batch_s"] for r in rows), 3),
              "median_first_step_done_s": round(statistics.median(r["first_step_done_s"] for r in rows), 3)}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
