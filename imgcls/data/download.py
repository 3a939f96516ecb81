"""Download with a cache and a sha256 check (the torchvision / keras ``get_file`` idea).

Files land in ``cache_dir()`` (``IMGCLS_CACHE_DIR``, else ``~/.cache/imgcls``); a file
already there with the right checksum is reused; a download is written to a temporary
file, verified, then renamed, so an interrupted or corrupted download never poses as a
good one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from imgcls.errors import ImgclsError


def cache_dir() -> Path:
    root = os.environ.get("IMGCLS_CACHE_DIR") or Path.home() / ".cache" / "imgcls"
    return Path(root)


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(urls: str | list[str], filename: str, sha256: str, subdir: str = "datasets",
             offline_hint: str = "", timeout: float = 30.0) -> Path:
    """Return a verified local copy of ``filename``, fetching it from the first URL that
    works. Raises ImgclsError (naming ``offline_hint``) when none can be reached."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = cache_dir() / subdir / filename  # filename may hold a subfolder: fashion-mnist/train-...gz
    dest_dir = dest.parent
    if dest.is_file():
        if sha256sum(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt: fetch again
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImgclsError(f"cannot create the download folder {dest_dir}: {exc.strerror or exc}",
                          "set IMGCLS_CACHE_DIR to a writable folder") from None
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            got = sha256sum(Path(tmp))
            if got != sha256:
                errors.append(f"{url}: checksum mismatch (got {got[:12]}…, expected {sha256[:12]}…)")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise ImgclsError(f"could not download {filename} ({'; '.join(errors)})",
                      offline_hint or "check the network connection")
