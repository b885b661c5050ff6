"""Derived random seeds that do not collide across (seed, epoch, rank, ...)."""

from __future__ import annotations

import numpy as np


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from any integers (order matters), via SeedSequence.

    ``seed + epoch`` style sums collide ((0, 1) and (1, 0)); SeedSequence's
    hash does not, and the result fits torch.Generator.manual_seed.
    """
    entropy = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
