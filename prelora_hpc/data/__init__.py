"""Image data: HDF5 conversion and reading, the embedded digits set, synthetic
tensors, and the per-rank samplers and loaders.

    prelora-convert /data/imagenet /lus/eagle/projects/P/imagenet1k.h5
    loaders = build_dataloaders(cfg.data, cfg.model, micro_batch, rank, world, seed)

Names are imported on first use (PEP 562), so ``python -m
prelora_hpc.data.convert`` starts without importing torch: conversion runs
on login nodes, and mpi4py is initialised before torch as on Cray systems.
"""

from __future__ import annotations

import importlib

from .errors import DataError

_EXPORTS = {
    "build_dataloaders": "loader",
    "prepare_data": "loader",
    "Loaders": "loader",
    "ShardedSampler": "loader",
    "HDF5ImageDataset": "hdf5",
    "SyntheticImageDataset": "synthetic",
    "ensure_digits_hdf5": "digits",
    "build_transform": "transforms",
    "convert": "convert",
}

__all__ = ["DataError", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
