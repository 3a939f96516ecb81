"""Start-up stays light: the command line and the package root import nothing heavy, and the
training path leaves timm, sklearn, rich, matplotlib, torchvision and the explain / export /
serve layers until something needs them. Each check runs in a fresh interpreter, since this
test process has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LATER = ["timm", "sklearn", "rich", "matplotlib", "torchvision", "scipy", "pandas", "onnx", "onnxruntime",
         "fastapi", "cleanlab", "imgcls.explain", "imgcls.export", "imgcls.serve"]


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_command_line_and_package_root_import_no_torch():
    mods = _imported_after("import imgcls, imgcls.cli\nimgcls.cli.build_parser().format_help()\nimgcls.__version__")
    heavy = [m for m in ["torch", "numpy", "PIL", *LATER] if m in mods]
    assert heavy == [], f"`imgcls --help` imported {heavy}"


def test_the_training_path_leaves_heavy_modules_until_needed():
    mods = _imported_after("import imgcls.runs, imgcls.cli.train\nfrom imgcls import train, Classifier")
    assert "torch" in mods  # training needs it; the rest waits
    heavy = [m for m in LATER if m in mods]
    assert heavy == [], f"the training path imported {heavy} at start-up"


def test_lazy_package_attributes_resolve():
    import imgcls

    assert imgcls.train.__module__ == "imgcls.runs" and imgcls.Classifier.__name__ == "Classifier"
    assert "TrainConfig" in dir(imgcls)
    with pytest.raises(AttributeError):
        imgcls.no_such_name  # noqa: B018
