"""Per-rank samplers and DataLoaders for training and validation.

Every rank builds its own loaders from the same config and seed; the
sampler gives each rank a disjoint slice of one shared permutation, so no
collective is needed to agree on the data order. Training samples carry
their augmentation seed, a function of (seed, epoch, sample index), so the
augmented stream does not depend on the worker or the resume point.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.utils.data

from ..config import DataConfig, ModelConfig
from .digits import ensure_digits_hdf5
from .errors import DataError
from .hdf5 import HDF5ImageDataset, read_metadata
from .seeding import mix_seed, sample_seed
from .synthetic import SyntheticImageDataset
from .transforms import build_transform


class ShardedSampler(torch.utils.data.Sampler[int]):
    """This rank's indices of one epoch: a slice of a permutation shared by all ranks.

    The permutation depends only on (seed, epoch), so every rank computes the
    same one (torch.Generator) and takes every ``world_size``-th index from
    position ``rank``. drop_last=True trims the permutation to a multiple
    of world_size first, so every rank gets exactly ``dataset_len //
    world_size`` samples and runs the same number of steps (a rank with one
    more batch would wait forever in a collective); ``multiple_of`` (the
    images of one optimizer step, micro batch x accumulation) trims each
    rank's share further to whole optimizer steps, so no accumulation
    straddles an epoch end. drop_last=False (for validation) covers every
    index once; ranks may then differ by one sample, nothing is padded, so
    sums and counts must be all-reduced.

    with_seeds=True yields ``(index, sample_seed(seed, epoch, index))``
    pairs instead of indices: the dataset seeds the sample's augmentation
    from the pair (HDF5ImageDataset and SyntheticImageDataset take both).
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, with_seeds: bool = False,
                 multiple_of: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} is not in [0, world_size={world_size})")
        if dataset_len < 0:
            raise ValueError(f"ShardedSampler: dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.with_seeds = with_seeds
        if multiple_of < 1:
            raise ValueError(f"ShardedSampler: multiple_of must be >= 1, got {multiple_of}")
        self.multiple_of = multiple_of
        self.epoch, self.start = 0, 0

    def epoch_length(self) -> int:
        """Samples this rank sees in a whole epoch (ignoring ``start``)."""
        if self.drop_last:
            per_rank = self.dataset_len // self.world_size
            return per_rank - per_rank % self.multiple_of
        return len(range(self.rank, self.dataset_len, self.world_size))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first ``start`` samples.

        ``start`` is the number of samples this rank already consumed in the
        epoch (a mid-epoch resume): iteration continues exactly where it stopped.
        """
        if not 0 <= start <= self.epoch_length():
            raise ValueError(f"ShardedSampler: start {start} is not in [0, {self.epoch_length()}] "
                             f"(samples per rank per epoch)")
        self.epoch, self.start = epoch, start

    def epoch_indices(self) -> list[int]:
        """All of this rank's indices for the current epoch, ``start`` included."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        end = self.epoch_length() * self.world_size if self.drop_last else self.dataset_len
        return order[self.rank:end:self.world_size]

    def __iter__(self) -> Iterator:
        indices = self.epoch_indices()[self.start:]
        if not self.with_seeds:
            return iter(indices)
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return self.epoch_length() - self.start


@dataclass
class Loaders:
    """What the trainer needs from the data package for one rank."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    train_sampler: ShardedSampler
    num_classes: int
    train_size: int
    """Training samples in the whole set (all ranks)."""
    val_size: int
    """Validation samples in the whole set (all ranks)."""

    def close(self) -> None:
        """End both loaders' worker processes (safe to call twice)."""
        for loader in (self.train, self.val):
            if isinstance(loader, WorkerSafeLoader):
                loader.close()


def _init_worker(worker_id: int, rank: int, ignores: tuple) -> None:
    # A job's stop signals (walltime SIGTERM, Slurm's USR1, a hang-up) often
    # reach every process of the job, workers included; torch's workers die
    # on SIGTERM and take the rank down with them before it can checkpoint.
    # The rank's main process handles them; its workers ignore them, then
    # unblock what the parent blocked around their start (a signal that came
    # in between is dropped here and still pending in the parent).
    for s in ignores:
        signal.signal(s, signal.SIG_IGN)
    if ignores:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ignores)
    # Training samples are augmented from their own seed (ShardedSampler
    # with_seeds); this seeds whatever else a worker draws. torch seeds each
    # worker with base_seed + worker_id (base_seed comes from the loader's
    # generator, new every epoch); mixing in the rank keeps ranks apart.
    s = mix_seed(torch.initial_seed(), rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class WorkerSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers start with ``ignores`` blocked.

    Workers inherit the blocked set at fork (or exec) and switch those
    signals to ignored in their init function, so no signal in ``ignores``
    can kill a worker, not even one that arrives while it starts; a signal
    the main process receives meanwhile is delivered when the start is done.
    """

    def __init__(self, *args, ignores: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.ignores = tuple(ignores)

    def __iter__(self):
        if not (self.ignores and self.num_workers > 0):
            return super().__iter__()
        with _blocked(self.ignores):
            return super().__iter__()

    def close(self, grace_s: float = 10.0) -> None:
        """End the persistent workers now; any still alive after ``grace_s``
        seconds is killed.

        Workers that ignore SIGTERM outlive ``multiprocessing``'s exit-time
        terminate(), whose join would then wait forever; a rank ends them
        here before it exits. Reaches into torch's iterator (tested on torch
        2.13 and 2.14); a version without it leaves the workers to torch.
        """
        it, self._iterator = getattr(self, "_iterator", None), None
        if it is None:
            return
        workers = list(getattr(it, "_workers", ()))
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        deadline = time.monotonic() + grace_s
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.kill()
                w.join(timeout=grace_s)


@contextlib.contextmanager
def _blocked(signals: tuple):
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _hdf5_path(data_cfg: DataConfig) -> Path:
    if data_cfg.source == "digits":
        return ensure_digits_hdf5(data_cfg.path)
    return Path(data_cfg.path)


def prepare_data(data_cfg: DataConfig) -> None:
    """One-time work before any loader is built: call on one rank, then barrier.

    source=digits builds the cached HDF5 file if needed; source=hdf5 checks
    the file once (so a bad file gives one error, not one per rank).
    No collectives inside.
    """
    if data_cfg.source == "synthetic":
        return
    path = _hdf5_path(data_cfg)
    for split in (data_cfg.train_split, data_cfg.val_split):
        read_metadata(path, split)


def _datasets(data_cfg: DataConfig, model_cfg: ModelConfig, seed: int):
    if data_cfg.source == "synthetic":
        train = SyntheticImageDataset(data_cfg.synthetic_train_size, model_cfg.num_classes,
                                      model_cfg.img_size, seed=mix_seed(seed, 0), in_chans=model_cfg.in_chans)
        val = SyntheticImageDataset(data_cfg.synthetic_val_size, model_cfg.num_classes,
                                    model_cfg.img_size, seed=mix_seed(seed, 1), in_chans=model_cfg.in_chans)
        return train, val
    path = _hdf5_path(data_cfg)
    train = HDF5ImageDataset(path, data_cfg.train_split,
                             build_transform(data_cfg, model_cfg.img_size, is_training=True),
                             on_bad_sample=data_cfg.on_bad_sample)
    val = HDF5ImageDataset(path, data_cfg.val_split,
                           build_transform(data_cfg, model_cfg.img_size, is_training=False),
                           on_bad_sample=data_cfg.on_bad_sample)
    if model_cfg.num_classes != train.num_classes:
        raise DataError(f"model.num_classes is {model_cfg.num_classes} but {path} has "
                        f"{train.num_classes} classes; set model.num_classes: {train.num_classes}")
    if model_cfg.in_chans != 3:
        raise DataError(f"model.in_chans is {model_cfg.in_chans} but images from {path} are "
                        "decoded as RGB (3 channels)")
    return train, val


def build_dataloaders(data_cfg: DataConfig, model_cfg: ModelConfig, micro_batch_size: int,
                      rank: int, world_size: int, seed: int, accum: int = 1,
                      worker_ignores: tuple = ()) -> Loaders:
    """This rank's training and validation loaders.

    Batches are ``(x, y)``: x float32 [micro_batch_size, 3, img_size,
    img_size], y int64 [micro_batch_size]. Training batches are all full
    (drop_last) and an epoch holds a whole number of optimizer steps of
    ``accum`` micro batches; the last validation batch may be short. Call
    ``loaders.train_sampler.set_epoch(epoch, start)`` before each epoch.
    DataLoader workers ignore the signals in ``worker_ignores`` (the
    trainer's stop signals, which the rank's main process handles).
    Raises DataError when model.num_classes differs from the data's.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    train_ds, val_ds = _datasets(data_cfg, model_cfg, seed)
    train_sampler = ShardedSampler(len(train_ds), rank, world_size, seed, shuffle=True,
                                   drop_last=True, with_seeds=True,
                                   multiple_of=micro_batch_size * accum)
    val_sampler = ShardedSampler(len(val_ds), rank, world_size, seed, shuffle=False, drop_last=False)
    workers = data_cfg.num_workers
    common = dict(
        batch_size=micro_batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=partial(_init_worker, rank=rank, ignores=tuple(worker_ignores)),
        ignores=worker_ignores,
    )
    train = WorkerSafeLoader(
        train_ds, sampler=train_sampler, drop_last=True,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank, 0)), **common)
    val = WorkerSafeLoader(
        val_ds, sampler=val_sampler, drop_last=False,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank, 1)), **common)
    return Loaders(train=train, val=val, train_sampler=train_sampler, num_classes=train_ds.num_classes,
                   train_size=len(train_ds), val_size=len(val_ds))
