"""Preprocessing (what a model needs at inference) and augmentation presets.

``Preprocessing`` travels inside every saved model (``model.json``), so train, evaluate,
predict, export and serve all build the exact same input pipeline from it.

Two paths share it:
* image files: PIL -> torchvision v2 transforms (resize / crop / flip) -> uint8 tensor,
  per image in loader workers;
* in-memory uint8 batches (npz, named data sets): :class:`BatchAugment` on tensors, on
  whatever device trains. Per-image random crops and flips on a whole batch at once are
  hand-written (a few indexing lines) because torchvision v2 applies *one* random draw to
  a whole batch; per-sample v2 calls cost ~30x more on 2 CPU cores for 28x28 images.
Normalisation (and channel conversion, and resizing of in-memory images) happens once per
batch on the device, in :meth:`Preprocessing.normalize`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision is imported where an image-file transform is built (_v2), not at module load:
# `import torchvision` pulls in torch._dynamo and sympy (~1-2 s), which in-memory data never needs


def _v2():
    from torchvision.transforms import v2

    return v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


RESIZES = ("squash", "shorter_side")
FRAMES = ("first", "all")


@dataclass
class Preprocessing:
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "squash"  # "squash": resize to img_size x img_size; "shorter_side": resize + center crop
    crop_pct: float = 1.0  # shorter_side only: resize to img_size / crop_pct, then center crop
    interpolation: str = "bilinear"
    # high bit depth / float pixels -> model input (imgcls.data.intensity); 8-bit images: as they are
    intensity: str = "auto"
    bit_depth: int = 8  # 8: uint8 tensors; 16: uint16 tensors (16-bit data keeps its levels)
    frames: str = "first"  # multi-frame DICOM: the first frame, or every frame as an image ("all")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """From a model card's ``preprocessing``; cards written before a field existed get
        its default. Anything malformed is an ImgclsError naming the field."""
        from imgcls.data.preprocessing_card import validated

        return cls(**validated(d))

    # ------------------------------------------------------------------ images
    def _interp(self) -> v2.InterpolationMode:
        return _v2().InterpolationMode(self.interpolation)

    def geometry(self) -> list:
        """The resize (and centre crop) ops on a (C, H, W) tensor. ``shorter_side``: the
        shorter side to ``img_size / crop_pct``, its centre square (what the decode-once
        cache stores), then the centre ``img_size`` crop of that - two centre offsets,
        each rounded, as evaluation from the cache crops (one offset rounded once moves
        some photos by a pixel against it). Images longer than ``ASPECT_LIMIT`` : 1 are first
        cut to the centre of their long side (:class:`LongSideCrop`): the resize's work stays
        bounded by its output, not by how far a thin strip is stretched."""
        v2 = _v2()
        if self.resize == "shorter_side":
            side = int(round(self.img_size / self.crop_pct))
            square = [v2.CenterCrop(side)] if side != self.img_size else []
            return [LongSideCrop(side), v2.Resize(side, interpolation=self._interp(), antialias=True), *square,
                    v2.CenterCrop(self.img_size)]
        return [v2.Resize((self.img_size, self.img_size), interpolation=self._interp(), antialias=True)]

    def tensor_geometry(self) -> v2.Compose:
        """:meth:`geometry` as one transform of a uint8 (C, H, W) tensor."""
        return _v2().Compose(self.geometry())

    def to_tensor(self) -> list:
        """Decoded PIL image (any mode load_image gives) -> (C, H, W) tensor: the intensity
        mapping and channel conversion, then uint8 (bit_depth 8) or float32 holding
        0..65535 (bit_depth 16: resized as float, see :class:`ToUInt16`)."""
        return [MapIntensity(self.intensity, self.in_chans, self.bit_depth)] + \
            ([_v2().PILToTensor()] if self.bit_depth == 8 else [])

    def finish(self) -> list:
        return [ToUInt16()] if self.bit_depth == 16 else []

    def pil_transform(self) -> v2.Compose:
        """Eval transform for one decoded PIL image -> uint8 (C,S,S) (uint16 for bit_depth 16).
        ``.dtype`` on the result says which (a loader's blank stand-in for an unreadable file
        must match the batch it joins)."""
        tf = _v2().Compose([*self.to_tensor(), *self.geometry(), *self.finish()])
        tf.dtype = torch.uint16 if self.bit_depth == 16 else torch.uint8
        return tf

    def to_display(self, img) -> Any:
        """A decoded image as 8-bit RGB through this intensity setting (for showing it)."""
        return MapIntensity(self.intensity, 3, 8)(img)

    # ------------------------------------------------------------------ batches
    def normalize(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 (N,C,H,W) on any device -> float, channels converted, resized if needed,
        normalised. Also accepts float input already in [0, 1]."""
        # one pass to float, one fused in-place affine at the end: (x/255 - mean)/std is folded into
        # (x - 255 mean) / (255 std) (channel mixing and resizing are linear, so the /255 can wait)
        k = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(x.dtype, 1.0)
        c = x.shape[1]
        same_geometry = c == self.in_chans and x.shape[-2:] == (self.img_size, self.img_size)
        if channels_last and same_geometry and x.dtype in (torch.uint8, torch.uint16):
            x = x.contiguous(memory_format=torch.channels_last)  # reorder the 1-byte values, not floats
        own = x.dtype != torch.float32  # .float() below makes a new tensor we may modify in place
        x = x.float()
        if c != self.in_chans:
            if c == 1 and self.in_chans == 3:
                x, own = x.expand(-1, 3, -1, -1), False
            elif c == 3 and self.in_chans == 1:
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x, own = (x * w).sum(1, keepdim=True), True  # ITU-R 601 luma, as PIL's convert("L")
            else:
                raise ValueError(f"cannot convert {c}-channel images to {self.in_chans} channels")
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)
            own = True
        scale = 1.0 / (torch.tensor(self.std, device=x.device) * k)
        shift = -torch.tensor(self.mean, device=x.device) * k * scale
        n, c, h, w = x.shape
        if own and c > 1 and x.is_contiguous(memory_format=torch.channels_last):
            # channels_last memory is rows of W*C values: one addcmul with the per-channel
            # constants tiled along a row runs ~3x faster on a CPU than broadcasting a
            # (1, C, 1, 1) shape over that layout (measured, 64 x 224 px batches)
            rows = x.permute(0, 2, 3, 1).view(n * h, w * c)
            torch.addcmul(shift.repeat(w), rows, scale.repeat(w), out=rows)
            return x
        shift, scale = shift.view(1, -1, 1, 1), scale.view(1, -1, 1, 1)
        # one fused pass: x * scale + shift, written in place when x is ours
        x = torch.addcmul(shift, x, scale, out=x) if own else torch.addcmul(shift, x, scale)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class AugmentSpec:
    """What augmentation a training run uses; saved in model.json."""

    preset: str = "none"  # none | light | standard | photo
    translate: int = 0  # in-memory batches: random shift up to this many pixels
    hflip: bool = False
    # "random": each image flipped with probability 1/2 per epoch; "alternate": a random half
    # in the first epoch, then every image's orientation alternates (airbench; in-memory data)
    flip_order: str = "random"
    scale: tuple[float, float] = field(default=(0.25, 1.0))  # photo: RandomResizedCrop area range
    randaugment: str | None = None  # timm RandAugment config string, e.g. rand-m9-mstd0.5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d


def augment_preset(preset: str, kind: str, hflip: bool | None) -> AugmentSpec:
    """Pick augmentation by data kind when preset is 'auto'.

    digits (small grayscale): shift by 2 px, never flip (a flipped 2 is not a 2);
    small colour images (CIFAR-like): shift by 4 px + flip; photos: random resized crop + flip.
    """
    if preset == "auto":
        preset = {"digits": "light", "small-colour": "standard"}.get(kind, "photo")
    flip_default = kind != "digits"
    flip = flip_default if hflip is None else hflip
    if preset == "none":
        return AugmentSpec("none", 0, bool(hflip))
    if preset == "light":
        return AugmentSpec("light", 2, flip)
    if preset == "standard":
        return AugmentSpec("standard", 4, flip)
    if preset == "photo":
        return AugmentSpec("photo", 0, flip)
    raise ValueError(preset)


class MapIntensity:
    """PIL image from the decoder -> 'L'/'RGB' (bit_depth 8) or a float32 (C, H, W) tensor
    of 16-bit values (bit_depth 16), through an intensity setting (imgcls.data.intensity)."""

    def __init__(self, intensity: str, channels: int, bit_depth: int = 8):
        from imgcls.data.intensity import parse_intensity

        self.setting, self.channels, self.bit_depth = parse_intensity(intensity), channels, bit_depth

    def __call__(self, img):
        from imgcls.data.intensity import map_8bit, map_16bit

        if self.bit_depth == 16:
            return torch.from_numpy(map_16bit(img, self.setting, self.channels))
        return map_8bit(img, self.setting, self.channels)


# The shorter-side resize is handed at most this many shorter sides of an image's long side
# (LongSideCrop). Only the centre square of the resized image survives the crops, yet the resize
# computes all of it: a 1 x 120000 px PNG of 551 bytes, its 1 px side stretched to 73 px, became
# a 73 x 8.8 M px tensor (640 Mpx, gigabytes and seconds) that no --max-pixels check on the
# decoded image sees. 8 leaves every ordinary photo, panoramas up to 8:1 included, on exactly the
# old ops; beyond it the kept part still holds the kernel's whole footprint around the centre.
ASPECT_LIMIT = 8


class LongSideCrop:
    """Centre part of the long side of an image whose long side exceeds ``ASPECT_LIMIT`` x
    its short side (anything else passes unchanged, the same object), before the resize of
    its short side to ``side``: the part is chosen so that the centre ``side`` square of the
    resized part is the centre square of the resized whole - the same source positions, scale
    and centre-crop offset (see :func:`long_side_window`)."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
        else:  # a PIL image
            w, h = img.size
        window = long_side_window(max(h, w), min(h, w), self.side)
        if window is None:
            return img
        a, n = window
        if not isinstance(img, torch.Tensor):
            return img.crop((0, a, w, a + n) if h > w else (a, 0, a + n, h))
        part = img[..., a:a + n, :] if h > w else img[..., a:a + n]
        # the same memory layout as the whole (PILToTensor gives channels-last strides): the
        # resize kernels are picked by layout
        if img.ndim == 3 and img.permute(1, 2, 0).is_contiguous() and not img.is_contiguous():
            return part.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return part.contiguous()


def long_side_window(long: int, short: int, side: int) -> tuple[int, int] | None:
    """``(start, length)`` of the part of the long side :class:`LongSideCrop` keeps, or None
    (the whole: at most ``ASPECT_LIMIT`` : 1).

    Old road: ``Resize(side)`` makes the long side ``N = int(side * long / short)`` px (scale
    ``long / N`` source px per output px), then a centre crop keeps ``side`` of them from
    ``T = round((N - side) / 2)``. A part of length ``n`` from ``start`` maps output px ``k`` of
    its own crop to ``start + s' (T' + k + 1/2)``. Among a few lengths from ``ASPECT_LIMIT *
    short`` on (multiples of the exact scale's numerator, and every length of the right parity)
    the one whose positions differ least from the old ones is taken, and only lengths whose
    crop keeps the resampling kernel's whole support. Where the old scale allows it (e.g. a
    long side that is a multiple of the short one) the difference is 0: the same positions and
    weights, so the same pixels up to float rounding of the weights; otherwise a small fraction
    of an output pixel."""
    if long <= ASPECT_LIMIT * short:
        return None
    n_old = int(side * long / short)  # as torchvision computes it
    t_old = int(round((n_old - side) / 2.0))
    s_old = Fraction(long, n_old)
    half = Fraction(1, 2)
    lo = ASPECT_LIMIT * short
    hi = min(long, 2 * lo + 64)
    p = long // math.gcd(long, n_old)  # exact scales long / N come from multiples of p
    lengths = set(range(lo, min(lo + 64, hi) + 1))
    first = -(-lo // p) * p
    lengths.update(range(first, min(hi, first + 63 * p) + 1, p))
    best = None
    for n in sorted(lengths):
        if (long - n) % 2:
            continue  # not centred on the whole
        start = (long - n) // 2
        n_out = int(side * n / short)
        t = int(round((n_out - side) / 2.0))
        s = Fraction(n, n_out)
        pad = 3 * max(s, 1) + 2  # the kernel's reach (bicubic: 2 px, widened when shrinking), rounded up
        if s * t < pad or s * (t + side) + pad > n:
            continue
        err = max(abs(start + s * (t + k + half) - s_old * (t_old + k + half)) for k in (0, side - 1))
        if best is None or err < best[0]:
            best = (err, start, n)
        if err == 0:
            break
    if best is None:  # no length keeps the kernel's reach (tiny images): the centre, bounded all the same
        n = hi - (long - hi) % 2
        return None if n >= long else ((long - n) // 2, n)
    return best[1:]


class ToUInt16:
    """Float (C, H, W) of 16-bit values (resized as float: PyTorch's resize has no uint16
    kernel) -> uint16, rounded and clipped."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.round().clamp_(0, 65535).to(torch.int32).to(torch.uint16)


def randaugment_transform(config: str, img_size: int, channels: int):
    """timm's RandAugment (a PIL -> PIL transform) from its config string. A bad string is
    a user error, reported with the flag to fix."""
    from timm.data.auto_augment import rand_augment_transform

    from imgcls.errors import ImgclsError

    fill = 128 if channels == 1 else (124, 116, 104)  # ImageNet mean, timm's default fill
    try:
        return rand_augment_transform(config, {"translate_const": int(img_size * 0.45), "img_mean": fill})
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise ImgclsError(f"invalid --randaugment '{config}': {exc or 'unknown option'}",
                          "use timm's syntax, e.g. rand-m9-mstd0.5 or rand-m7-n2") from None


class BatchAugment:
    """Per-sample random shift (a crop of the reflect-padded image, as airbench) and
    horizontal flip on a uint8 batch, and optionally timm's RandAugment per image (PIL, on
    the CPU: its ops have no batched form). In-memory training data usually gets its flips
    from the loader instead (``Batches.alternate_flips``) and ``hflip=False`` here."""

    def __init__(self, translate: int = 0, hflip: bool = False, randaugment: str | None = None):
        self.translate = translate
        self.hflip = hflip
        self.randaugment = randaugment
        self._ra = None

    def _rand_augment(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        if self._ra is None:
            self._ra = randaugment_transform(self.randaugment, x.shape[-1], x.shape[1])
        arr = x.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        out = [torch.from_numpy(np.asarray(self._ra(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a))).copy())
               for a in arr]
        out = torch.stack(out)
        out = out[:, None] if out.ndim == 3 else out.permute(0, 3, 1, 2)
        return out.to(x.device)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.randaugment:
            x = self._rand_augment(x)
        n, c, h, w = x.shape  # (N, C, H, W)
        dev = x.device
        if self.translate:
            p = self.translate
            padded = F.pad(x, (p, p, p, p), mode="reflect" if min(h, w) > p else "constant")
            oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev)
            # every HxW window of the padded images as a view (N, 2p+1, 2p+1, C, H, W); one
            # gather of each image's window is ~5x faster than a 4-D fancy index (measured)
            windows = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)
            x = windows[torch.arange(n, device=dev), oy, ox]
        if self.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


STRONG_AUGMENTS = ("randaugment", "trivialaugment")


class StrongAugment:
    """FixMatch's strong view of a uint8 batch: torchvision's RandAugment (2 ops, the
    magnitude drawn per image from 1..10 tenths of its range, as FixMatch's RandAugment draws it per
    image) or TrivialAugmentWide, applied per image (torchvision v2 draws one set of parameters per
    call: a batch call would give every image the same ops), then Cutout of a square half the
    image side filled with grey (FixMatch's), batched. Measured on 2 cores: 0.23 s for 448
    CIFAR-sized images per step, ~15% of an airbench step on them."""

    def __init__(self, kind: str = "randaugment", cutout: float = 0.5):
        if kind not in STRONG_AUGMENTS:
            raise ValueError(kind)
        self.kind, self.cutout = kind, cutout
        self._ops = None

    def _build(self) -> list:
        v2 = _v2()
        if self.kind == "trivialaugment":
            return [v2.TrivialAugmentWide()]
        return [v2.RandAugment(num_ops=2, magnitude=m, num_magnitude_bins=11) for m in range(1, 11)]

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self._ops is None:
            self._ops = self._build()
        n, c, h, w = x.shape
        pick = torch.randint(0, len(self._ops), (n,), generator=gen).tolist()
        src = x.cpu()
        out = torch.stack([self._ops[k](img) for k, img in zip(pick, src)]).to(x.device)
        if self.cutout > 0:
            side = max(1, int(round(self.cutout * min(h, w))))
            cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
            cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
            ys = torch.arange(h, device=x.device)[None, :, None]
            xs = torch.arange(w, device=x.device)[None, None, :]
            half = side // 2
            box = ((ys - cy[:, None, None]).abs() <= half) & ((xs - cx[:, None, None]).abs() <= half)
            out = out.masked_fill(box[:, None], 127 if out.dtype == torch.uint8 else 0.5)
        return out


class BatchResizedCrop:
    """RandomResizedCrop (+ horizontal flip) for a whole uint8 batch at once, each image
    with its own crop: the photo preset on decoded-once images (``data/cache.py``).

    The crop boxes follow torchvision's ``RandomResizedCrop.get_params`` (area fraction
    from ``scale``, aspect ratio log-uniform in ``ratio``, 10 tries, then a centre crop),
    drawn for the whole batch in a few tensor ops (hand-written: torchvision v2 draws one
    set of parameters per call). On the CPU each crop is resized with torchvision's
    ``resized_crop`` (antialiased bilinear, uint8); on accelerators the whole batch goes
    through one ``affine_grid`` + ``grid_sample`` (bilinear without antialiasing: the cache
    is only ~1.14x the output size, so crops are never shrunk by more than that).

    Returns ``size`` x ``size`` images: uint8 on the CPU, float in [0, 1] elsewhere
    (``Preprocessing.normalize`` accepts both).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def boxes(self, n: int, h: int, w: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """(n, 4) crop boxes ``top, left, height, width`` in pixels."""
        tries = 10
        area = h * w * torch.empty(n, tries).uniform_(*self.scale, generator=gen)
        log_r = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=gen)
        r = torch.exp(log_r)
        cw = torch.sqrt(area * r).round()
        ch = torch.sqrt(area / r).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        # fallback (no try fits): the whole image, clamped to the ratio range, centred
        in_r = w / h
        if in_r < self.ratio[0]:
            fw, fh = w, int(round(w / self.ratio[0]))
        elif in_r > self.ratio[1]:
            fw, fh = int(round(h * self.ratio[1])), h
        else:
            fw, fh = w, h
        pick = first.clamp_min(0)
        bw = torch.where(first >= 0, cw[torch.arange(n), pick], torch.tensor(float(fw)))
        bh = torch.where(first >= 0, ch[torch.arange(n), pick], torch.tensor(float(fh)))
        u = torch.rand(n, 2, generator=gen)
        top = torch.where(first >= 0, (u[:, 0] * (h - bh + 1)).floor(), torch.tensor((h - fh) // 2).float())
        left = torch.where(first >= 0, (u[:, 1] * (w - bw + 1)).floor(), torch.tensor((w - fw) // 2).float())
        return torch.stack([top, left, bh, bw], 1)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None, index: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Crops of ``x`` (N, C, H, W), or of the rows ``x[index]`` when given (e.g. a batch of
        a memory-mapped cache: only the crops are read). ``out``: where to write the uint8
        crops on the CPU, (n, C, size, size) (e.g. a loader worker's shared-memory batch)."""
        c, h, w = x.shape[1:]
        n = len(index) if index is not None else len(x)
        b = self.boxes(n, h, w, gen)
        flip = (torch.rand(n, generator=gen) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        if x.device.type == "cpu" and x.dtype in (torch.uint8, torch.uint16):
            return self._per_image(x, b, flip, index, out)
        if index is not None:
            x = x[index.to(x.device)]
        # accelerators: one batched resampling call (a per-image loop is launch-bound there)
        # output pixel centres in [-1, 1] map onto the box's edges (align_corners=False)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = b[:, 3] / w * torch.where(flip, -1.0, 1.0)
        theta[:, 0, 2] = (2 * b[:, 1] + b[:, 3]) / w - 1
        theta[:, 1, 1] = b[:, 2] / h
        theta[:, 1, 2] = (2 * b[:, 0] + b[:, 2]) / h - 1
        grid = F.affine_grid(theta.to(x.device), [n, c, self.size, self.size], align_corners=False)
        top = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(x.dtype)
        xf = x.float() / (top / 255.0) if top else x * 255.0
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.div_(255.0)

    def _per_image(self, x: torch.Tensor, b: torch.Tensor, flip: torch.Tensor, index: torch.Tensor | None,
                   out: torch.Tensor | None) -> torch.Tensor:
        """CPU: PyTorch's vectorised uint8 antialiased bilinear resize per crop (what
        torchvision's ``resized_crop`` calls, without its per-call dispatch: ~1.5x faster
        per 224 px image; ~5x faster than grid_sample on floats), channels_last in and out
        (its fast uint8 path), with one intra-op thread: for one small image, more threads
        cost more in synchronisation than they save (measured 2-3x slower with 2 threads on
        a busy 2-core machine; splitting the batch over Python threads did no better)."""
        s = self.size
        if out is None or out.dtype != x.dtype:  # channels_last, the layout the model runs in: normalising keeps it
            out = torch.empty(len(b), s, s, x.shape[1], dtype=x.dtype).permute(0, 3, 1, 2)
        wide = x.dtype == torch.uint16  # PyTorch resizes uint16 only as float
        rows = range(len(b)) if index is None else index.tolist()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, (j, (top, left, bh, bw), f) in enumerate(zip(rows, b.long().tolist(), flip.tolist())):
                crop = x[j:j + 1, :, top:top + bh, left:left + bw].contiguous(memory_format=torch.channels_last)
                if (bh, bw) != (s, s):
                    crop = crop.float() if wide else crop
                    crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                    crop = ToUInt16()(crop) if wide else crop
                out[i] = crop[0].flip(-1) if f else crop[0]
        finally:
            torch.set_num_threads(threads)
        return out
