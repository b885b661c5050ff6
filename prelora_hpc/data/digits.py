"""The embedded default data set: scikit-learn's handwritten digits as HDF5.

1797 real 8x8 grayscale digits (10 classes) ship inside scikit-learn, so the
quick start needs no download. They are upscaled to 32x32 PNGs in an
ImageFolder tree (a seeded, stratified 80/20 split: 1437 train, 360 val)
and converted by the same ``convert()`` as ImageNet, so the quick start
exercises the production read path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .convert import convert
from .errors import DataError
from .hdf5 import read_metadata

DIGITS_FILE = "digits-v1.h5"
DIGITS_SIZE = 32  # pixels; large enough that random crops still show a digit
_SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/prelora_hpc``, else ``~/.cache/prelora_hpc``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prelora_hpc"


def write_digits_tree(root: str | Path) -> dict[str, int]:
    """Write ``root/{train,val}/<digit>/digit-NNNN.png``; returns images per split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(index, test_size=0.2, stratify=digits.target,
                                  random_state=_SPLIT_SEED)
    root = Path(root)
    counts = {}
    for split, ids in (("train", train), ("val", val)):
        for i in sorted(ids):
            # Intensities 0..16 -> 0..255; bicubic keeps strokes smooth at 4x.
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            img = Image.fromarray(pixels).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"digit-{i:04d}.png")
        counts[split] = len(ids)
    return counts


def _check(path: Path) -> None:
    for split in ("train", "val"):
        _, classes, _ = read_metadata(path, split)
        if len(classes) != 10:
            raise DataError(f"{path}: {len(classes)} classes, the digits set has 10")


def ensure_digits_hdf5(cache_dir: Optional[str | Path] = None) -> Path:
    """Path of ``<cache_dir>/digits-v1.h5``, building it first if it is not there.

    cache_dir: default ``default_cache_dir()``. Idempotent; concurrent
    callers are safe (each builds under a private temporary name, and the
    identical results replace one another atomically). An existing file
    that does not validate raises DataError naming it (it is not replaced).
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache / DIGITS_FILE
    if out.exists():
        try:
            _check(out)
        except DataError as e:
            raise DataError(f"{e} (a damaged cache file? delete it to rebuild)") from None
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prelora-digits-") as tree:
        write_digits_tree(tree)
        convert(tree, out, progress=False, overwrite=True)
    return out
