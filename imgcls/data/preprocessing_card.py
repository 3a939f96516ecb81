"""Checking a model card's ``preprocessing`` before it becomes a :class:`Preprocessing`.

``model.json`` is a file users copy, edit and hand around: whatever it holds, loading it
gives either a valid Preprocessing or an ImgclsError naming the field (fuzzed in
tests/test_fuzz.py). Fields a card lacks (cards written before they existed) get their
defaults.
"""

from __future__ import annotations

import math
from typing import Any

from imgcls.errors import ImgclsError

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_HINT = "re-save the model with imgcls, or restore its model.json"


def _bad(field: str, value: Any, want: str) -> ImgclsError:
    return ImgclsError(f"model card: preprocessing.{field} is {value!r:.60}, expected {want}", _HINT)


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(key, v, f"a whole number in {lo}..{hi}")
    return v


def _floats(d: dict, key: str, n: int, positive: bool) -> tuple[float, ...]:
    v = d[key]
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise _bad(key, v, f"a list of {n} number(s), one per input channel")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
            raise _bad(key, v, f"{n} finite{' positive' if positive else ''} number(s)")
        out.append(float(x))
    return tuple(out)


def _choice(d: dict, key: str, choices: tuple) -> Any:
    v = d[key]
    if isinstance(v, bool) or v not in choices:
        raise _bad(key, v, "one of " + ", ".join(map(str, choices)))
    return v


def validated(d: Any) -> dict[str, Any]:
    """The constructor arguments of Preprocessing from a card's dict (see module doc)."""
    from imgcls.data.intensity import parse_intensity
    from imgcls.data.transforms import FRAMES, RESIZES

    if not isinstance(d, dict):
        raise ImgclsError(f"model card: preprocessing is {type(d).__name__}, expected an object", _HINT)
    missing = [k for k in ("img_size", "in_chans", "mean", "std") if k not in d]
    if missing:
        raise ImgclsError(f"model card: preprocessing has no '{missing[0]}'", _HINT)
    out: dict[str, Any] = {"img_size": _int(d, "img_size", 1, 16384), "in_chans": _int(d, "in_chans", 1, 64)}
    out["mean"] = _floats(d, "mean", out["in_chans"], positive=False)
    out["std"] = _floats(d, "std", out["in_chans"], positive=True)
    if "resize" in d:
        out["resize"] = _choice(d, "resize", RESIZES)
    if "crop_pct" in d:
        v = d["crop_pct"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.05 <= v <= 1.0:
            raise _bad("crop_pct", v, "a number in 0.05..1")
        out["crop_pct"] = float(v)
    if "interpolation" in d:
        out["interpolation"] = _choice(d, "interpolation", INTERPOLATIONS)
    if "intensity" in d:
        try:
            out["intensity"] = str(parse_intensity(d["intensity"]))
        except ImgclsError as exc:
            raise ImgclsError(f"model card: preprocessing.intensity: {exc.message}", _HINT) from None
    if "bit_depth" in d:
        out["bit_depth"] = _choice(d, "bit_depth", (8, 16))
    if "frames" in d:
        out["frames"] = _choice(d, "frames", FRAMES)
    return out
