"""Random images that never touch disk, for benchmarks and smoke tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data

from .seeding import mix_seed


class SyntheticImageDataset(torch.utils.data.Dataset):
    """``ds[i]`` is ``(x, y)``: x float32 [3, img_size, img_size] ~ N(0, 1), y in [0, num_classes).

    Both are a pure function of (seed, i): every process, worker and epoch
    sees the same sample for the same index. ``ds[(i, sample_seed)]`` (what
    a ShardedSampler with_seeds yields) is ``ds[i]``: nothing is augmented.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int = 0, in_chans: int = 3):
        if size <= 0 or num_classes <= 0 or img_size <= 0 or in_chans <= 0:
            raise ValueError(f"synthetic data: size, num_classes, img_size and in_chans must be > 0, "
                             f"got {size}, {num_classes}, {img_size}, {in_chans}")
        self.size, self.img_size, self.seed, self.in_chans = size, img_size, seed, in_chans
        self.classes = [str(c) for c in range(num_classes)]
        rng = np.random.default_rng(mix_seed(seed, 0))
        self.labels = rng.integers(0, num_classes, size=size, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic data: index {index} out of range ({self.size} samples)")
        g = torch.Generator().manual_seed(mix_seed(self.seed, 1, index))
        x = torch.randn(self.in_chans, self.img_size, self.img_size, generator=g, dtype=torch.float32)
        return x, int(self.labels[index])
