"""A map-style dataset over a file (or shard directory) written by prelora-convert.

The file is validated once at construction (opened briefly, then closed):
structure, format version, label range. Worker processes open their own
read-only handle at their first ``__getitem__``; a handle never crosses a
fork or a pickle (h5py handles are not fork-safe and do not pickle).
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import torch.utils.data
from PIL import Image

from .errors import DataError
from .layout import DATASETS, FORMAT_VERSION, SHARD_GLOB, SHARD_RE, shard_name
from .seeding import seeded_rng
from .transforms import DecodingTransform, split_tensor_tail

ON_BAD_SAMPLE = ("fail", "skip")
_MAX_SUBSTITUTES = 16  # consecutive bad samples beyond this mean a broken file, not bad luck


def _open(path: Path) -> h5py.File:
    # HDF5's default locking, on purpose: a process that opens one file twice
    # with different locking flags fails, so a per-call setting here would
    # break anyone else opening it. On a Lustre mount without flock, set
    # HDF5_USE_FILE_LOCKING=FALSE in the job (docs/data.md).
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"HDF5 data file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def shard_files(path: str | Path) -> list[Path]:
    """The file itself, or the complete, ordered shard list of a shard directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"HDF5 data {path} does not exist")
    if not path.is_dir():
        return [path]
    files = sorted(path.glob(SHARD_GLOB))
    if not files:
        raise DataError(f"{path}: a directory without {SHARD_GLOB} files")
    counts = set()
    for f in files:
        m = SHARD_RE.fullmatch(f.name)
        if m is None:
            raise DataError(f"{f}: not a shard name like {shard_name(0, 4)}")
        counts.add(int(m.group(2)))
    if len(counts) != 1:
        raise DataError(f"{path}: shards of different sets ({', '.join(map(str, sorted(counts)))} shards)")
    (count,) = counts
    expected = [path / shard_name(i, count) for i in range(count)]
    missing = [p.name for p in expected if p not in files]
    if missing:
        raise DataError(f"{path}: shard {missing[0]} is missing ({len(missing)} of {count} missing)")
    return expected


def _read_classes(f: h5py.File, path: Path) -> list[str]:
    version = f.attrs.get("format_version")
    if version is None:
        raise DataError(f"{path}: no 'format_version' attribute; not written by prelora-convert")
    if int(version) != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {int(version)}, this reader reads version "
                        f"{FORMAT_VERSION}; convert the images again with prelora-convert")
    if "classes" not in f:
        raise DataError(f"{path}: dataset '/classes' is missing")
    classes = list(f["classes"].asstr()[()])
    if "num_classes" not in f.attrs or int(f.attrs["num_classes"]) != len(classes):
        raise DataError(f"{path}: attribute num_classes does not match the {len(classes)} "
                        "entries of /classes")
    return classes


def _read_labels(f: h5py.File, path: Path, split: str, num_classes: int) -> np.ndarray:
    if split not in f or not isinstance(f[split], h5py.Group):
        have = sorted(k for k in f if isinstance(f[k], h5py.Group))
        raise DataError(f"{path}: no split '{split}' (has: {', '.join(have) or 'none'})")
    g = f[split]
    for name in DATASETS:
        if name not in g:
            raise DataError(f"{path}: dataset '{split}/{name}' is missing")
    lengths = {name: g[name].shape[0] for name in DATASETS}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: '{split}' datasets differ in length {lengths}")
    labels = g["labels"][()].astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: {split}/labels[{i}] = {labels[i]} is outside [0, {num_classes})")
    return labels


def read_metadata(path: str | Path, split: str) -> tuple[list[Path], list[str], list[np.ndarray]]:
    """Validate ``path`` for ``split``; returns (shard files, classes, labels per shard).

    Raises FileNotFoundError for a missing path and DataError (naming the
    file, and the index for a bad label) for anything else wrong.
    """
    files = shard_files(path)
    classes, labels = None, []
    for p in files:
        with _open(p) as f:
            c = _read_classes(f, p)
            if classes is None:
                classes = c
            elif c != classes:
                raise DataError(f"{p}: class list differs from {files[0].name}'s")
            labels.append(_read_labels(f, p, split, len(c)))
    return files, classes, labels


class HDF5ImageDataset(torch.utils.data.Dataset):
    """Images and labels of one split; ``ds[i]`` is ``(transform(rgb_image), label)``.

    ``ds[(i, seed)]`` is the same with the transform's randomness seeded
    from ``seed`` (see ShardedSampler's with_seeds): the same pair gives
    the same tensor in any process.

    path: an .h5 file or a directory of shards (concatenated in order).
    transform: applied to the decoded RGB ``PIL.Image``; None returns the image.
    A ``DecodingTransform`` (``data.jpeg_draft``) gets the image undecoded:
    its ``decode`` chooses how to decode it (and its failures are reported
    like any undecodable image), its ``augment`` does the rest.
    on_bad_sample: 'fail' raises DataError naming file, split and index when
    an image does not decode; 'skip' prints that line, substitutes the next
    decodable sample and counts it in ``bad_samples`` (per process).

    Attributes: ``classes`` (class names, label = position), ``num_classes``,
    ``labels`` (int64 numpy array [N], read at construction: no image is
    decoded to get it), ``files`` (the shard files, in order).
    """

    def __init__(self, path: str | Path, split: str = "train",
                 transform: Optional[Callable] = None, on_bad_sample: str = "fail"):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.path = Path(path)
        self.split = split
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.files, self.classes, shard_labels = read_metadata(self.path, split)
        self.labels = np.concatenate(shard_labels)
        self._offsets = np.cumsum([0] + [len(x) for x in shard_labels])
        self.bad_samples = 0
        self._handles: dict[int, h5py.File] = {}
        self._images: dict[int, h5py.Dataset] = {}
        self._pid: Optional[int] = None

    @property
    def transform(self) -> Optional[Callable]:
        return self._transform

    @transform.setter
    def transform(self, t: Optional[Callable]) -> None:
        # __getitems__ runs the head per sample and the tail once per batch.
        self._transform = t
        self._head, self._tail = split_tensor_tail(t)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_images"], state["_pid"] = {}, {}, None
        return state

    def close(self) -> None:
        """Close this process's handles (reopened on the next access)."""
        if self._pid == os.getpid():
            for h in self._handles.values():
                h.close()
        self._handles, self._images, self._pid = {}, {}, None

    def _handle(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            # Handles inherited across a fork are unusable here; the parent
            # keeps its own.
            self._handles, self._images, self._pid = {}, {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = _open(self.files[shard])
        return self._handles[shard]

    def _images_of(self, shard: int) -> h5py.Dataset:
        # Kept open: two group lookups per sample cost a third of reading it.
        if self._pid != os.getpid() or shard not in self._images:
            self._images[shard] = self._handle(shard)[self.split]["images"]
        return self._images[shard]

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard number, index inside that shard) of global ``index``."""
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def load_image(self, index: int,
                   decode: Optional[Callable[[Image.Image], Image.Image]] = None) -> Image.Image:
        """Decode sample ``index`` as an RGB image; DataError names file, split and index.

        decode: turns the opened, not yet decoded image into the RGB image
        returned (e.g. ``DecodingTransform.decode``); default: a full decode.
        """
        return self._decode(index, None, decode)

    def _decode(self, index: int, data: Optional[bytes],
                decode: Optional[Callable[[Image.Image], Image.Image]] = None) -> Image.Image:
        """``load_image`` of bytes already read (``data``), or read here (None)."""
        shard, local = self._locate(index)
        try:
            if data is None:
                data = self._images_of(shard)[local].tobytes()
            with Image.open(io.BytesIO(data)) as im:
                return decode(im) if decode is not None else im.convert("RGB")
        except (FileNotFoundError, DataError):
            raise  # already name the file
        # PIL (and h5py on a damaged file) raise many types on bad bytes.
        except Exception as e:  # noqa: BLE001
            where = f"{self.files[shard]}: {self.split}[{local}]"
            if len(self.files) > 1:
                where += f" (sample {index} of the set)"
            raise DataError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from e

    def _check_index(self, index: int) -> None:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"{self.path}: index {index} out of range for {self.split} ({n} samples)")

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        self._check_index(index)
        n = len(self)
        i = index
        for substitutes in range(_MAX_SUBSTITUTES + 1):
            try:
                return self._sample(i, seed, self.transform), int(self.labels[i])
            except DataError as e:
                if self.on_bad_sample == "fail" or substitutes == _MAX_SUBSTITUTES:
                    raise
                self.bad_samples += 1
                i = (i + 1) % n
                print(f"warning: {e}; using sample {i} instead", file=sys.stderr, flush=True)

    def __getitems__(self, keys: list) -> list:
        """``[self[k] for k in keys]``, bit for bit, at less than half the cost
        per sample on 32 px JPEGs.

        torch's DataLoader (2.0 and later) calls it with each batch's keys
        (indices or ``(index, seed)`` pairs). The batch's bytes come from one
        HDF5 read per shard instead of one per sample, and a transform ending
        in ToTensor + Normalize runs those two steps once over the batch
        (``split_tensor_tail``). A sample that does not read or decode takes
        ``self[k]``'s path: its error, or its substitute under 'skip'.
        """
        pairs = [k if isinstance(k, tuple) else (k, None) for k in keys]
        for index, _ in pairs:
            self._check_index(index)
        try:
            raw = self._read_many([index for index, _ in pairs])
        except Exception:  # noqa: BLE001 - the one-sample path names what failed
            return [self[k] for k in keys]
        out: list = [None] * len(pairs)
        heads: dict[int, object] = {}
        if isinstance(self._head, DecodingTransform):
            for j, ((index, seed), data) in enumerate(zip(pairs, raw)):
                try:
                    heads[j] = self._sample(index, seed, self._head, data)
                except DataError:
                    out[j] = self[keys[j]]
        else:
            # All decodes first, then all augmentations: a decode draws no
            # random numbers, and the two loops run 15 % faster than one.
            for j, ((index, _), data) in enumerate(zip(pairs, raw)):
                try:
                    heads[j] = self._decode(index, data)
                except DataError:
                    out[j] = self[keys[j]]
            for j, img in heads.items():
                heads[j] = self._augment(img, pairs[j][1], self._head)
        if heads and self._tail is not None:
            done = self._tail(list(heads.values())).unbind(0)
            heads = dict(zip(heads, done))
        for j, x in heads.items():
            out[j] = (x, int(self.labels[pairs[j][0]]))
        return out

    def _read_many(self, indices: list[int]) -> list[bytes]:
        """The stored bytes of samples ``indices`` (any order, repeats allowed),
        one h5py read per shard (h5py wants increasing, distinct indices)."""
        idx = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self._offsets, idx, side="right") - 1
        out: list = [None] * len(indices)
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            local, inverse = np.unique(idx[at] - self._offsets[shard], return_inverse=True)
            rows = self._images_of(int(shard))[local]
            for position, row in zip(at, inverse):
                out[position] = rows[row].tobytes()
        return out

    def _sample(self, index: int, seed: Optional[int], t: Optional[Callable],
                data: Optional[bytes] = None):
        """Sample ``index`` decoded (from ``data``, or read) and transformed by
        ``t``; DataError if it does not decode."""
        # A decoding transform draws its crop before decoding, so the seed
        # covers the decode too; each substitute starts from the same seed.
        if not isinstance(t, DecodingTransform):
            return self._augment(self._decode(index, data), seed, t)
        with seeded_rng(seed) if seed is not None else nullcontext():
            return t.augment(self._decode(index, data, t.decode))

    @staticmethod
    def _augment(img: Image.Image, seed: Optional[int], t: Optional[Callable]):
        """``t(img)`` with its randomness seeded from ``seed`` (when not None)."""
        if t is None:
            return img
        with seeded_rng(seed) if seed is not None else nullcontext():
            return t(img)
