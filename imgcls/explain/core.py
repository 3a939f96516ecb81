"""``explain(clf, images, method=...)``: one call for every method."""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import torch

from imgcls.engine.device import resolve_device
from imgcls.errors import ImgclsError, did_you_mean
from imgcls.explain.base import EXPLAINERS, CountingModel, ExplainContext, Explanation, to_original
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

    ``target``: class name or index to explain (default: each image's predicted class).
    ``layer``: module name for the CAM methods (default: the last conv block / ViT block).
    ``opts``: method options, e.g. ``samples=`` for lime/shap, ``steps=`` for ig,
    ``window=`` for occlusion. Explanations run in float32; ``device`` as elsewhere.
    """
    fn = EXPLAINERS.get(method)
    _check_options(fn, method, opts)
    items = explain_images(images, clf.preprocessing)
    dev = resolve_device(device)
    model = clf.model.to(dev).float().eval()
    counted = CountingModel(model, getattr(clf, "temperature", 1.0))
    out: list[Explanation] = []
    try:
        for item in items:
            ctx = ExplainContext(counted, clf.preprocessing, dev, list(clf.classes), layer=layer, seed=seed,
                                multi_label=bool(getattr(clf, "multi_label", False)))
            x = ctx.normalize(item.pixels[None])  # (1, C, S, S)
            probs = ctx.probabilities(x)[0].cpu()
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
