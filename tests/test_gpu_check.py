"""bench/gpu_check.sh's machinery without a GPU: its dry run writes the JSON it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["dry_run"] is True and out["ok"] is None
    assert out["cuda_tests"]["rc"] == 0 and out["cifar10"]["rc"] == 0
    assert "cuda_available" in out["env"]  # torch was imported and asked
    assert "pytest -q -m cuda" in proc.stdout and "bench/cifar10.py --recipe fast" in proc.stdout
