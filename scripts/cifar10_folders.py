#!/usr/bin/env python3
"""CIFAR-10 as its publisher ships it (``cifar-10-python.tar.gz``: pickled
batches of 32 x 32 arrays) -> the ImageFolder tree ``prelora-convert`` takes:

    OUT/train/<class>/NNNN.jpg   4,500 per class (the class's images 0-4499)
    OUT/val/<class>/NNNN.jpg       500 per class (images 4500-4999)
    OUT/test/<class>/NNNN.jpg    1,000 per class (the test batch; --test)

NNNN counts a class's images in the order of data_batch_1 ... data_batch_5,
so the split is fixed by file number, the layout of docs/data.md:

    python scripts/cifar10_folders.py cifar-10-python.tar.gz data/cifar10
    prelora-convert data/cifar10 data/cifar10.h5

The JPEG encoder and quality decide the bytes; the pixels differ from
another re-encoding of the same arrays by JPEG's rounding only.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
TRAIN_PER_CLASS = 4500
"""Of each class's 5,000 training images, the first 4,500 train; the rest validate."""


def read_batches(src: Path, names: list[str]) -> list[dict]:
    """The pickled batches ``names`` from the tarball or its unpacked folder."""
    out = []
    if src.is_dir():
        for n in names:
            with open(src / n, "rb") as f:
                out.append(pickle.load(f, encoding="bytes"))
        return out
    with tarfile.open(src) as tar:
        members = {Path(m.name).name: m for m in tar if m.isfile()}
        for n in names:
            if n not in members:
                raise SystemExit(f"{src}: no {n} inside (is this cifar-10-python.tar.gz?)")
            out.append(pickle.load(tar.extractfile(members[n]), encoding="bytes"))
    return out


def write_split(batches: list[dict], out: Path, split_of, quality: int) -> dict[str, int]:
    """JPEG files of every image; ``split_of(n)`` names the split of a class's
    n-th image. Returns the count per split."""
    seen = [0] * len(CLASSES)
    counts: dict[str, int] = {}
    for b in batches:
        data = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for pixels, label in zip(data, b[b"labels"]):
            n = seen[label]
            seen[label] += 1
            split = split_of(n)
            folder = out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
            (folder / f"{n:04d}.jpg").write_bytes(buf.getvalue())
            counts[split] = counts.get(split, 0) + 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="cifar-10-python.tar.gz or cifar-10-batches-py/")
    p.add_argument("out", type=Path, help="root of the tree (train/, val/[, test/])")
    p.add_argument("--test", action="store_true", help="also write test/ from the test batch")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    args = p.parse_args(argv)
    if not args.src.exists():
        print(f"cifar10_folders: no such file or folder: {args.src}", file=sys.stderr)
        return 2
    train = read_batches(args.src, [f"data_batch_{i}" for i in range(1, 6)])
    counts = write_split(train, args.out,
                         lambda n: "train" if n < TRAIN_PER_CLASS else "val", args.quality)
    if args.test:
        counts.update(write_split(read_batches(args.src, ["test_batch"]), args.out,
                                  lambda n: "test", args.quality))
    print(", ".join(f"{s}: {n} images" for s, n in counts.items()) + f" under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
