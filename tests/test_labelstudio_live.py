"""A real Label Studio instance: import what ``imgcls rank`` writes, annotate through its API,
export JSON and train on the export with ``--data``.

Label Studio is a large Django application (~1 GB installed), so it lives in a virtual
environment of its own and this test finds its ``label-studio`` executable through
``IMGCLS_LABEL_STUDIO`` (or on PATH); without one it skips. To run it::

    python3 -m venv /work/venvs/labelstudio && /work/venvs/labelstudio/bin/pip install label-studio==1.23.2
    IMGCLS_LABEL_STUDIO=/work/venvs/labelstudio/bin/label-studio pytest -m slow tests/test_labelstudio_live.py

The instance runs on its SQLite default in a temporary data folder on a free port, with a
user and a legacy API token made at start-up (``--user-token``, ``--enable-legacy-api-token``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.data.sources import load_data
from tests.conftest import pattern_images

pytestmark = pytest.mark.slow

TOKEN = "imgcls0test0token0123456789abcdef"
START_TIMEOUT_S = 240  # first start migrates a new SQLite database: ~1 min on 2 busy cores


def _executable() -> str | None:
    exe = os.environ.get("IMGCLS_LABEL_STUDIO") or shutil.which("label-studio")
    return exe if exe and Path(exe).is_file() and os.access(exe, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Api:
    def __init__(self, base: str):
        self.base = base

    def __call__(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
        return json.loads(raw) if raw else None


@pytest.fixture
def label_studio(tmp_path):
    exe = _executable()
    if exe is None:
        pytest.skip("no label-studio executable (set IMGCLS_LABEL_STUDIO or put it on PATH)")
    port, data_dir = _free_port(), tmp_path / "ls-data"
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "SENTRY_DSN": "", "COLLECT_ANALYTICS": "false"}
    log = open(tmp_path / "label-studio.log", "w")
    proc = subprocess.Popen([exe, "start", "--no-browser", "--port", str(port), "--internal-host", "127.0.0.1",
                             "--data-dir", str(data_dir), "--username", "imgcls@example.com",
                             "--password", "imgcls-test-pw", "--user-token", TOKEN, "--enable-legacy-api-token"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-studio exited ({proc.returncode}): {(tmp_path / 'label-studio.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"label-studio did not answer /health in {START_TIMEOUT_S} s")
            time.sleep(1)
        yield _Api(base)
    finally:  # the server and anything it started: the process group this test made
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_rank_tasks_through_a_real_label_studio_and_back(label_studio, trained_run, tmp_path, monkeypatch, capsys):
    api = label_studio
    x, truth = pattern_images(4, size=16, seed=5)  # 12 images of classes a, b, c
    np.savez(tmp_path / "pool.npz", x_unlabeled=x)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))  # task URLs relative to it
    out = tmp_path / "ranked"
    assert main(["rank", str(trained_run), str(tmp_path / "pool.npz"), "--budget", "9", "--out", str(out),
                 "--json"]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    project = api("POST", "/api/projects", {"title": "imgcls rank", "label_config":
                                              (out / "label_config.xml").read_text()})
    imported = api("POST", f"/api/projects/{project['id']}/import", tasks)
    assert imported["task_count"] == 9 and imported["prediction_count"] == 9
    listed = api("GET", f"/api/tasks?project={project['id']}&page_size=100")
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(listed) == 9
    names = ["a", "b", "c"]
    labelled = {}
    for t in listed[:7]:  # the annotator labels 7 of the 9 with the true class; 2 stay unlabelled
        label = names[int(truth[int(t["data"]["index"])])]
        api("POST", f"/api/tasks/{t['id']}/annotations", {"result": [
            {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]})
        labelled[int(t["data"]["index"])] = label
    export = api("GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    assert len(export) == 9 and sum(bool(t["annotations"]) for t in export) == 7
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    data = load_data(path, val_split=0.0)  # what --data reads
    assert len(data.train) == 7 and "2 task(s) without an annotation" in data.notes[0]
    got = {int(Path(p).stem): data.classes[int(c)] for p, c in zip(data.train.paths, data.train.labels)}
    assert got == labelled
    for t in export:  # the images named only by their local-files URL resolve to the same files
        t["data"].pop("path", None)
    path.write_text(json.dumps(export))
    capsys.readouterr()
    assert main(["train", "--data", str(path), "--epochs", "1", "--batch-size", "4", "--val-split", "0",
                 "--out", str(tmp_path / "runs"), "--name", "from_ls"]) == 0
    assert (tmp_path / "runs" / "from_ls" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- no server needed
def test_local_files_urls_round_trip_odd_file_names(tmp_path, monkeypatch):
    from imgcls.data.labelstudio import _file_of, image_url

    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    for name in ["a b.png", "a+b.png", "50%.png", "x&y.png", "no#1.png", "ü.png", "%41.png"]:
        p = (tmp_path / "img" / name).resolve()
        url = image_url(p)
        assert "#" not in url and " " not in url and "&" not in url.split("?d=", 1)[1]
        assert _file_of({"data": {"image": url}}, tmp_path / "elsewhere") == p


def test_label_config_escapes_class_names():
    import xml.etree.ElementTree as ET

    from imgcls.data.labelstudio import label_config

    names = ["R&D", 'say "hi"', "<b>", "it's"]
    root = ET.fromstring(label_config(names))
    assert [c.get("value") for c in root.iter("Choice")] == names


def test_relative_data_path_is_relative_to_the_json(tmp_path, monkeypatch):
    from imgcls.data.labelstudio import _file_of

    monkeypatch.chdir(tmp_path)
    assert _file_of({"data": {"path": "imgs/a.png"}}, tmp_path / "export") == tmp_path / "export" / "imgs" / "a.png"


def test_a_file_outside_the_document_root_is_refused(tmp_path, monkeypatch):
    from imgcls.data.labelstudio import image_url
    from imgcls.errors import ImgclsError

    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "root"))
    with pytest.raises(ImgclsError, match="outside LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.*move the images under"):
        image_url(tmp_path / "other" / "a.png")
