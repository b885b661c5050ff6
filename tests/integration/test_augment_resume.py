"""Augmented batches are a function of (seed, epoch, sample index): the same
after a resume anywhere in an epoch, with any number of loader workers."""

import random

import numpy as np
import pytest
import torch

from prelora_hpc.config import DataConfig, ModelConfig
from prelora_hpc.data import build_dataloaders, ensure_digits_hdf5
from prelora_hpc.data.seeding import sample_seed

MICRO = 16


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    ensure_digits_hdf5(d)
    return d


def loaders(digits_dir, workers, rank=1):
    data = DataConfig(source="digits", path=str(digits_dir), num_workers=workers,
                      auto_augment="rand-m9-mstd0.5", scale=[0.3, 1.0], hflip=0.5)
    model = ModelConfig(img_size=32, num_classes=10, patch_size=8)
    return build_dataloaders(data, model, MICRO, rank=rank, world_size=2, seed=3)


def batches(ld, epoch, start=0, n=None):
    ld.train_sampler.set_epoch(epoch, start=start)
    out = []
    for x, y in ld.train:
        out.append((x, y))
        if n is not None and len(out) == n:
            break
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


def test_resume_mid_epoch_gives_the_same_augmented_batches(digits_dir):
    uninterrupted = batches(loaders(digits_dir, 0), epoch=1, n=12)
    # A resume after 5 steps, in a fresh process state: other global RNG
    # states, two workers instead of none.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = batches(loaders(digits_dir, 2), epoch=1, start=5 * MICRO, n=7)
    assert same(resumed, uninterrupted[5:])


def test_augmentation_is_random_across_epochs_and_samples(digits_dir):
    ld = loaders(digits_dir, 0)
    (x0, y0), = batches(ld, epoch=0, n=1)
    ld.train_sampler.set_epoch(0)
    first = next(iter(ld.train_sampler))
    index, seed = first
    assert seed == sample_seed(3, 0, index)
    ds = ld.train.dataset
    # The same sample: identical for the same epoch, different in another.
    a = ds[(index, sample_seed(3, 0, index))][0]
    b = ds[(index, sample_seed(3, 0, index))][0]
    c = ds[(index, sample_seed(3, 1, index))][0]
    assert torch.equal(a, b) and torch.equal(a, x0[0]) and not torch.equal(a, c)


def test_loading_leaves_the_training_process_rng_alone(digits_dir):
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    batches(loaders(digits_dir, 0), epoch=0, n=2)
    assert torch.equal(torch.rand(3), expect)
