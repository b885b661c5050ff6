"""Derived random seeds that do not collide across (seed, epoch, rank, ...),
and per-sample seeding of the augmentation."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.utils.data


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from any integers (order matters), via SeedSequence.

    ``seed + epoch`` style sums collide ((0, 1) and (1, 0)); SeedSequence's
    hash does not, and the result fits torch.Generator.manual_seed.
    """
    entropy = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


#: Separates augmentation seeds from every other use of mix_seed.
_AUGMENT = 0x61756700


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` (of the whole set) in ``epoch``.

    A function of these three only: not of the rank, the DataLoader worker
    or where an epoch was resumed, so a resumed run augments every sample
    exactly as an uninterrupted one does.
    """
    return mix_seed(_AUGMENT, seed, epoch, index)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's global RNGs seeded from
    ``seed`` (timm's and torchvision's transforms draw from all three), and
    give the caller its own RNG states back afterwards (a loader without
    workers runs in the training process, whose dropout stream must not move);
    in a DataLoader worker, which has no other use for them, leave them seeded.
    """
    # A DataLoader worker draws from these streams for its samples only, and
    # seeds them for each one: it has no state to get back, and saving the
    # three costs 12x seeding them (0.08 ms a sample).
    keep = torch.utils.data.get_worker_info() is None
    if keep:
        py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only, which is the one CPU transforms draw from:
    # torch.manual_seed would also queue a CUDA seed, and in a process that
    # has not initialised CUDA (every DataLoader worker) that records a
    # formatted stack trace, 1-2 ms per sample, more than decoding it.
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if keep:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(th)
