"""timm's ImageNet transforms, set from the data config.

Training: RandomResizedCrop(scale) + horizontal flip + (optional) RandAugment
or timm's default colour jitter, then normalisation. Validation: resize to
img_size / crop_pct and centre crop. Both take an RGB PIL image and give a
float32 tensor [3, img_size, img_size].

With ``data.jpeg_draft`` the transform is a ``DecodingTransform``: its
first step runs on the image as ``PIL.Image.open`` returns it (header read,
pixels not decoded yet), so a JPEG can be decoded at 1/2, 1/4 or 1/8 scale
in the DCT when the crop still gets at least img_size pixels per side.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp, posterize
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..config import DataConfig

#: DCT scale factors libjpeg decodes at, largest first (PIL's draft picks from these).
DRAFT_SCALES = (8, 4, 2)

_PIL_RESAMPLE = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


def draft_scale(ratio: float) -> int:
    """The largest JPEG decode scale (8, 4, 2, else 1) not above ``ratio``, the
    full-size pixels available per output pixel on the tighter side."""
    for s in DRAFT_SCALES:
        if ratio >= s:
            return s
    return 1


def draft(im: Image.Image, scale: int) -> int:
    """Ask ``im``'s decoder to decode at 1/``scale`` of each side, in place.

    ``im`` must not be decoded yet (as ``Image.open`` returns it); its
    ``size`` becomes ceil(full size / scale). Returns the scale the decoder
    will use: 1 for other formats (PNG, BMP), for an image already decoded,
    and for ``scale`` 1.
    """
    if scale < 2:
        return 1
    w, h = im.size
    # PIL picks the largest power of two <= min(w // rw, h // rh); asking
    # for (w // scale, h // scale) makes that exactly ``scale``.
    got = im.draft("RGB", (w // scale, h // scale))
    if got is None:
        return 1
    _, box = got
    return round(w / box[2])


def posterize_keeping_none(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, also for 0 bits: a black image, as Pillow gave before it
    refused ``bits < 1``. timm's PosterizeIncreasing asks for 0 bits at
    magnitude 10, which RandAugment's magnitude noise (``mstd``) reaches."""
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


def _augment_ops(t) -> list[AugmentOp]:
    """The AugmentOps inside a timm RandAugment (``ops``) or AutoAugment (``policy``)."""
    ops = [op for op in getattr(t, "ops", []) if isinstance(op, AugmentOp)]
    for sub in getattr(t, "policy", []):
        ops += [op for op in sub if isinstance(op, AugmentOp)]
    return ops


class DraftRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` run on an undecoded image.

    Draws the crop box on the full-size dimensions (from the file header,
    with the same random draws as timm's transform, so a seeded sample gets
    the same box), decodes at the smallest size (1/2, 1/4 or 1/8 in the
    DCT) at which the scaled box still has at least ``size`` pixels per
    side, then crops the scaled box and resizes it to ``size``. Returns an
    RGB image of ``size`` (h, w) pixels. When the box is too small for any
    reduction (small images, small crops) the pixels are exactly timm's.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation):
        self.crop = crop

    def __call__(self, im: Image.Image) -> Image.Image:
        c = self.crop
        i, j, h, w = c.get_params(im, c.scale, c.ratio)
        interpolation = random.choice(c.interpolation) if isinstance(c.interpolation, (tuple, list)) \
            else c.interpolation
        out_h, out_w = c.size
        s = draft(im, draft_scale(min(w / out_w, h / out_h)))
        img = im.convert("RGB")
        if s == 1:
            return F.resized_crop(img, i, j, h, w, c.size, interpolation)
        box = (j / s, i / s, (j + w) / s, (i + h) / s)
        return img.resize((out_w, out_h), _PIL_RESAMPLE[interpolation], box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


class DraftShortSide:
    """Decode so the short side still has at least ``min_side`` pixels (the
    validation resize's target), at the smallest DCT scale that allows it;
    returns the RGB image, to be resized and centre-cropped as usual."""

    def __init__(self, min_side: int):
        self.min_side = min_side

    def __call__(self, im: Image.Image) -> Image.Image:
        draft(im, draft_scale(min(im.size) / self.min_side))
        return im.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_side={self.min_side})"


class DecodingTransform:
    """A transform whose first step also decodes: ``augment(decode(im))``.

    decode: takes a ``PIL.Image`` as ``Image.open`` returns it (pixels not
    decoded yet) and returns an RGB image; the dataset calls it where it
    reports undecodable files. augment: the rest, RGB image to float32
    tensor [3, img_size, img_size]. Called on an image that is already
    decoded, it gives the plain transform's result.
    """

    def __init__(self, decode: Callable[[Image.Image], Image.Image], augment: Callable):
        self.decode = decode
        self.augment = augment

    def __call__(self, im: Image.Image):
        return self.augment(self.decode(im))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decode={self.decode!r}, augment={self.augment!r})"


class BatchToTensorNormalize:
    """``normalize(to_tensor(im))`` of every image of a batch, as one tensor.

    Takes the two steps that end timm's transforms; called with a list of B
    images it gives float32 [B, C, H, W], bit for bit the stacked per-image
    results: the same elementwise operations in the same order (uint8 to
    float, / 255, - mean, / std), run once over the batch instead of B times
    (two thirds of the per-image cost of both steps on 32 px images). A
    batch of RGB PIL images of one size takes that path; anything else goes
    through the two steps image by image.
    """

    def __init__(self, to_tensor: Callable, normalize: transforms.Normalize):
        self.to_tensor = to_tensor
        self.normalize = normalize

    def __call__(self, images: Sequence) -> torch.Tensor:
        first = images[0]
        if all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == first.size
               for im in images):
            x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
            x = x.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
            return F.normalize(x, self.normalize.mean, self.normalize.std, inplace=True)
        return torch.stack([self.normalize(self.to_tensor(im)) for im in images])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_tensor!r}, {self.normalize!r})"


def split_tensor_tail(t: Callable | None) -> tuple[Callable | None, BatchToTensorNormalize | None]:
    """``(head, tail)`` with ``t(im)`` equal to ``tail([head(im)])[0]``, bit for bit.

    For a transform ending in ToTensor + Normalize (timm's, either split, a
    ``DecodingTransform`` around one): head is the rest (PIL image to PIL
    image, all the randomness), tail a ``BatchToTensorNormalize`` of the two
    steps. Any other transform, or None: ``(t, None)``.
    """
    if isinstance(t, DecodingTransform):
        head, tail = split_tensor_tail(t.augment)
        return (DecodingTransform(t.decode, head), tail) if tail is not None else (t, None)
    steps = t.transforms if isinstance(t, transforms.Compose) else []
    if len(steps) >= 2 and isinstance(steps[-2], transforms.ToTensor) \
            and isinstance(steps[-1], transforms.Normalize):
        return transforms.Compose(steps[:-2]), BatchToTensorNormalize(steps[-2], steps[-1])
    return t, None


def build_transform(data_cfg: DataConfig, img_size: int, is_training: bool) -> Callable:
    """The train (augmenting) or validation (deterministic) transform at ``img_size`` pixels.

    Takes a PIL image, gives a float32 tensor [3, img_size, img_size].
    RandAugment's posterize at 0 bits gives a black image on any Pillow
    (``posterize_keeping_none``). With ``data_cfg.jpeg_draft`` it is a
    ``DecodingTransform`` whose ``decode`` drafts JPEGs (see
    ``DraftRandomResizedCrop``, ``DraftShortSide``).
    """
    t = create_transform(
        input_size=(3, img_size, img_size),
        is_training=is_training,
        auto_augment=data_cfg.auto_augment,
        hflip=data_cfg.hflip,
        scale=tuple(data_cfg.scale),
        crop_pct=data_cfg.crop_pct,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    for step in t.transforms:
        for op in _augment_ops(step):
            if op.aug_fn is posterize:
                op.aug_fn = posterize_keeping_none
    if not data_cfg.jpeg_draft:
        return t
    first, rest = t.transforms[0], t.transforms[1:]
    if is_training:
        if not isinstance(first, RandomResizedCropAndInterpolation):
            raise TypeError(f"jpeg_draft expects timm's training transform to start with "
                            f"RandomResizedCropAndInterpolation, got {first!r}")
        return DecodingTransform(DraftRandomResizedCrop(first), transforms.Compose(rest))
    if not isinstance(first, transforms.Resize) or not isinstance(first.size, int):
        raise TypeError(f"jpeg_draft expects timm's validation transform to start with a "
                        f"short-side Resize, got {first!r}")
    return DecodingTransform(DraftShortSide(first.size), t)
