"""Helpers shared by the benchmark scripts: machine description, subprocess runs, JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BENCH_PY = ROOT / ".bench-env" / "bin" / "python"


def default_data(name: str) -> Path:
    """../shared/data/NAME next to the checkout (also found from a git worktree)."""
    for root in (ROOT.parent, ROOT.parent.parent, Path("/work")):
        p = root / "shared" / "data" / name
        if p.exists():
            return p
    return SHARED / name


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def user_env(extra: dict | None = None) -> dict:
    """The environment of a timed child process as a user's would be: Python's default of
    caching bytecode. This sandbox sets PYTHONDONTWRITEBYTECODE=1, which makes every process
    compile imgcls's own modules again (~0.5 s of start-up on a slow 2-core machine); an
    installed package has its .pyc files from pip, as torch's and TensorFlow's do here."""
    env = {**os.environ, **(extra or {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_json(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> tuple[dict, float]:
    """Run a command whose last stdout line is JSON; returns (that object, wall seconds).
    Its stderr (progress, per-epoch lines) passes straight through."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd, env=user_env(env))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def feature_cache_times(training: dict) -> dict:
    """A linear-probe run's feature-extraction and head-training seconds (metrics.json
    ``training.finetune``), or nothing when the run trained the whole network."""
    ft = training.get("finetune") or {}
    if not ft.get("feature_cache"):
        return {}
    out = {"extract_s": ft["extract_s"], "head_train_s": ft["head_train_s"]}
    if "top_blocks" in ft:  # the transfer recipe's second stage (kept or not, and why)
        out["top_blocks"] = ft["top_blocks"]
    return out


def write_result(result: dict, out: str | None = None) -> None:
    """Print the benchmark's JSON (and write it to ``out`` when given)."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
