"""The HDF5 layout shared by the converter (writer) and the dataset (reader).

One file, or a directory of shards that all have the same structure::

    /                       attrs: format_version=1, num_classes=C,
                                   shard_index=s, num_shards=S
    /classes                (C,)  vlen str   class-folder names, sorted;
                                             the label is the position here
    /<split>/images         (N,)  vlen uint8 encoded image file bytes, as-is
    /<split>/labels         (N,)  int64      in [0, C)
    /<split>/filenames      (N,)  vlen str   path relative to the source root
    /<split>                attrs: num_skipped (corrupt files left out)

A sharded data set is the concatenation of its shards in index order; the
converter cuts every split into contiguous slices, so a sharded set reads
back in the same order as the single file.
"""

from __future__ import annotations

import re

import h5py
import numpy as np

FORMAT_VERSION = 1
"""Bump when the layout changes in a way an older reader would misread."""

IMAGE_DTYPE = h5py.vlen_dtype(np.dtype("uint8"))
STRING_DTYPE = h5py.string_dtype()
DATASETS = ("images", "labels", "filenames")

SHARD_GLOB = "shard-*-of-*.h5"
SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5")


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` (0-based) of ``count``, e.g. shard-00001-of-00004.h5."""
    return f"shard-{index:05d}-of-{count:05d}.h5"
