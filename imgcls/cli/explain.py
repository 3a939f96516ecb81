"""imgcls explain RUN IMAGE... --method gradcam|gradcam++|ig|occlusion|lime|shap --out DIR"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "explain"
HELP = "explain predictions: heatmaps (Grad-CAM, IG, occlusion, LIME, SHAP) with faithfulness scores"
METHODS = ["gradcam", "gradcam++", "ig", "occlusion", "lime", "shap"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train` (or any saved model folder)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="explanation method (default: gradcam)")
    p.add_argument("--target", help="class to explain (default: each image's predicted class)")
    p.add_argument("--layer", help="CAM methods: module name to explain (default: last conv block / ViT block)")
    p.add_argument("--samples", type=int, help="lime/shap: model evaluations per image (default 300 / 500)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown beside the heatmap")
    p.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion scores")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.errors import ImgclsError
    from imgcls.explain import explain
    from imgcls.explain.render import faithfulness_line

    if args.samples is not None and args.method not in ("lime", "shap"):
        raise ImgclsError(f"--samples applies to lime and shap, not {args.method}", "drop --samples")
    if args.samples is not None and args.samples < 10:
        raise ImgclsError(f"--samples {args.samples} is too few for a meaningful fit", "use at least 10 (default 300/500)")
    clf = Classifier.load(args.run)
    opts = {"samples": args.samples} if args.samples else {}
    exps = explain(clf, args.images, method=args.method, target=args.target, layer=args.layer,
                   top_k=args.top_k, faithfulness=not args.no_faithfulness, device=args.device, **opts)
    out = Path(args.out)
    stems: dict[str, int] = {}
    for e in exps:
        stem = Path(e.source).stem or "image"
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # same file name in two folders: keep both
            stem = f"{stem}-{stems[stem]}"
        png, npy = e.save(out, stem)
        if args.json:
            print(json.dumps({**e.to_dict(), "png": str(png), "npy": str(npy)}))
            continue
        top = "  ".join(f"{c} {p:.3f}" for c, p in e.top)
        print(f"{e.source}: {e.method} for '{e.target}'  [{top}]  {e.evaluations} model evaluations, {e.seconds:.2f}s")
        if e.faithfulness:
            verdict = "beats random" if e.faithfulness["beats_random"] else "does NOT beat random"
            print(f"  {faithfulness_line(e.faithfulness)}: {verdict}")
        print(f"  -> {png}  {npy.name}")
    return 0
