"""Pictures of explanations: heatmap overlays and the three-panel figure (matplotlib, Agg)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgcls.explain.base import normalize_attribution

if TYPE_CHECKING:
    from imgcls.explain.base import Explanation


def overlay(image: Image.Image, attribution: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """The positive evidence as a colour map blended over the (RGB) image; where there is no
    evidence the image shows through unchanged."""
    from matplotlib import colormaps

    a = normalize_attribution(attribution)
    if a.shape != (image.height, image.width):
        a = np.asarray(Image.fromarray(a).resize(image.size, Image.BILINEAR))
    heat = colormaps[cmap](a)[..., :3]
    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    w = (alpha * a)[..., None]
    return Image.fromarray(((1 - w) * img + w * heat).clip(0, 1).__mul__(255).round().astype(np.uint8))


def faithfulness_line(f: dict) -> str:
    if not f:
        return ""
    return (f"deletion AUC {f['deletion_auc']:.3f} (random {f['random_deletion_auc']:.3f}, lower is better)   "
            f"insertion AUC {f['insertion_auc']:.3f} (random {f['random_insertion_auc']:.3f}, higher is better)")


def figure(e: Explanation, dpi: int = 100) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    axes[0].imshow(e.image)
    # parse_math=False: a '$' in a file or class name is text, not matplotlib mathtext
    axes[0].set_title(_short(e.source), fontsize=9, parse_math=False)
    axes[1].imshow(e.overlay)
    axes[1].set_title(f"{e.method} for '{e.target}'", fontsize=10, parse_math=False)
    for ax in axes[:2]:
        ax.axis("off")
    names = [c for c, _ in e.top][::-1]
    probs = [p for _, p in e.top][::-1]
    colors = ["tab:orange" if c == e.target else "tab:blue" for c in names]
    axes[2].barh(range(len(names)), probs, color=colors)
    axes[2].set_yticks(range(len(names)), [_short(c, 18) for c in names], fontsize=9, parse_math=False)
    axes[2].set_xlim(0, 1)
    axes[2].set_title("top classes (probability)", fontsize=10)
    for i, p in enumerate(probs):
        axes[2].text(min(p + 0.02, 0.8), i, f"{p:.3f}", va="center", fontsize=8)
    note = faithfulness_line(e.faithfulness)
    note += f"\n{e.evaluations} model evaluations, {e.seconds:.2f}s" + (f", layer {e.layer}" if e.layer else "")
    fig.text(0.5, 0.02, note, ha="center", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
