"""``explain(clf, images, method=...)``: one call for every method."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.engine.device import resolve_device
from imgcls.engine.predictor import Predictor
from imgcls.errors import ImgclsError, did_you_mean
from imgcls.explain.base import EXPLAINERS, CountingModel, ExplainContext, Explanation, ExplainImage, to_original
from imgcls.explain.faithfulness import deletion_insertion
from imgcls.explain.inputs import explain_images


def _target_index(target: Any, classes: list[str], probs: torch.Tensor) -> int:
    if target is None:
        return int(probs.argmax())
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < len(classes):
            raise ImgclsError(f"target class index {target} is out of range", f"use 0..{len(classes) - 1}")
        return int(target)
    name = str(target)
    if name in classes:
        return classes.index(name)
    hint = did_you_mean(name, classes) or "classes: " + ", ".join(classes[:10]) + ("…" if len(classes) > 10 else "")
    raise ImgclsError(f"unknown target class '{name}' (--target)", hint)


def _predicted(clf: Any, items: list[ExplainImage], device: str, batch_size: int = 64) -> np.ndarray:
    """Each image's class probabilities as ``predict`` gives them: through the engine's
    Predictor, so with the run's test-time augmentation and temperature (the explained class
    and the top-k shown are the prediction's, not the plain view's)."""
    with Predictor(clf, "torch", device, batch_size=batch_size) as p:
        # [0, 1] float pixels, the explained view (Preprocessing.normalize takes them), a batch at a time
        logits = [p.logits(torch.stack([item.pixels for item in items[i:i + batch_size]]))
                  for i in range(0, len(items), batch_size)]
        return p.probabilities(np.concatenate(logits))


def _one_file(images: Any) -> bool:
    """Whether ``images`` names a single image file (unreadable: an error, not a skip)."""
    if isinstance(images, (list, tuple)) and len(images) == 1:
        images = images[0]
    return isinstance(images, (str, Path)) and Path(images).is_file()


def _check_options(fn, method: str, opts: dict[str, Any]) -> None:
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("ctx", "x", "target")]
    for key in opts:
        if key not in allowed:
            hint = did_you_mean(key, allowed) or ("options: " + ", ".join(allowed) if allowed else "it takes none")
            raise ImgclsError(f"method '{method}' has no option '{key}'", hint)


def explain(clf: Any, images: Any, method: str = "gradcam", target: Any = None, layer: str | None = None, *,
            top_k: int = 3, faithfulness: bool = True, device: str = "cpu", seed: int = 0,
            **opts: Any) -> list[Explanation]:
    """Explain ``clf``'s prediction for each image with ``method`` (see ``EXPLAINERS``).

    ``target``: class name or index to explain (default: each image's predicted class, as
    ``predict`` predicts it: the run's TTA and temperature; the attribution is of the plain view).
    ``layer``: module name for the CAM methods (default: the last conv block / ViT block).
    ``opts``: method options, e.g. ``samples=`` for lime/shap, ``steps=`` for ig,
    ``window=`` for occlusion. Explanations run in float32; ``device`` as elsewhere.
    Unreadable files among several are left out with a line on stderr each; a single named
    file that cannot be read is an error.
    """
    fn = EXPLAINERS.get(method)
    _check_options(fn, method, opts)
    skipped: dict[str, str] | None = None if _one_file(images) else {}
    items = explain_images(images, clf.preprocessing, skipped)
    for reason in (skipped or {}).values():  # left out, as predict leaves them out: say why, one line each
        print(f"imgcls: skipped: {reason}", file=sys.stderr)
    predicted = _predicted(clf, items, device)
    dev = resolve_device(device)
    model = clf.model.to(dev).float().eval()
    counted = CountingModel(model, getattr(clf, "temperature", 1.0))
    out: list[Explanation] = []
    try:
        for item, probs in zip(items, predicted):
            ctx = ExplainContext(counted, clf.preprocessing, dev, list(clf.classes), layer=layer, seed=seed,
                                multi_label=bool(getattr(clf, "multi_label", False)))
            x = ctx.normalize(item.pixels[None])  # (1, C, S, S)
            # the attribution is of the plain view (what the explainers can take gradients of and
            # perturb); the class it is for and the top-k are the predictor's (TTA, temperature)
            probs = torch.from_numpy(probs)
            t = _target_index(target, ctx.classes, probs)
            counted.evaluations = 0
            t0 = time.perf_counter()
            attr = np.asarray(fn(ctx, x, t, **opts), dtype=np.float32)
            seconds = time.perf_counter() - t0
            evaluations = counted.evaluations
            if attr.shape != tuple(x.shape[-2:]):
                raise RuntimeError(f"explainer {method} returned shape {attr.shape}, expected {tuple(x.shape[-2:])}")
            faith = deletion_insertion(ctx, x, attr, t, seed=seed) if faithfulness else {}
            k = max(1, min(top_k, len(ctx.classes)))
            top_idx = torch.argsort(probs, descending=True)[:k].tolist()
            out.append(Explanation(
                source=item.source, method=method, target=ctx.classes[t], target_index=t,
                attribution=to_original(attr, item), image=item.original,
                top=[(ctx.classes[i], float(probs[i])) for i in top_idx], evaluations=evaluations,
                faithfulness=faith, seconds=seconds, layer=ctx.layer if method.startswith("gradcam") else None,
                input_attribution=attr))
    finally:
        model.to("cpu")
    return out
