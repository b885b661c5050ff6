"""Data package: conversion to HDF5, reading back, validation, samplers, loaders."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from prelora_hpc.config import DataConfig, ModelConfig
from prelora_hpc.data import DataError
from prelora_hpc.data.convert import convert, remove_stale_staging
from prelora_hpc.data.digits import ensure_digits_hdf5
from prelora_hpc.data.hdf5 import HDF5ImageDataset, shard_files
from prelora_hpc.data.loader import ShardedSampler, build_dataloaders, prepare_data
from prelora_hpc.data.synthetic import SyntheticImageDataset
from prelora_hpc.data.transforms import build_transform, split_tensor_tail

REPO = Path(__file__).resolve().parents[2]

# train has three classes, val lacks 'n02' on purpose: labels must still use
# the shared class list (n03 -> 2 in both splits).
TREE = {
    "train": {"n01": 3, "n02": 2, "n03": 3},
    "val": {"n01": 1, "n03": 2},
}


def make_tree(root: Path, seed: int = 0) -> dict[str, bytes]:
    """Real JPEG (and one PNG) files with varied pixels; returns {relpath: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, classes in TREE.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 16 + 2 * i, 20 + i
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = ".png" if (split, cls, i) == ("train", "n02", 1) else ".JPEG"
                path = folder / f"{cls}_{i}{ext}"
                Image.fromarray(pixels).save(path)
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    return files


def read_split(path: Path, split: str) -> tuple[list[str], list[int], list[bytes]]:
    """Filenames, labels and stored bytes of a split, across shards, straight from h5py."""
    names, labels, blobs = [], [], []
    for f in shard_files(path):
        with h5py.File(f, "r") as h:
            g = h[split]
            names += list(g["filenames"].asstr()[()])
            labels += g["labels"][()].tolist()
            blobs += [g["images"][i].tobytes() for i in range(len(g["images"]))]
    return names, labels, blobs


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".tmp-*"))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "imagenet"
    return root, make_tree(root)


@pytest.fixture()
def converted(tree, tmp_path):
    root, files = tree
    out = tmp_path / "out" / "data.h5"
    convert(root, out, progress=False)
    return out, root, files


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return ensure_digits_hdf5(tmp_path_factory.mktemp("cache"))


# --------------------------------------------------------------------------- #
# Conversion


def test_convert_round_trip(converted):
    out, root, files = converted
    with h5py.File(out, "r") as h:
        assert h.attrs["format_version"] == 1
        assert h.attrs["num_classes"] == 3
        assert list(h["classes"].asstr()[()]) == ["n01", "n02", "n03"]
    for split in ("train", "val"):
        names, labels, blobs = read_split(out, split)
        expected = sorted(k for k in files if k.startswith(split + "/"))
        assert names == expected
        assert labels == [["n01", "n02", "n03"].index(n.split("/")[1]) for n in names]
        assert blobs == [files[n] for n in names]  # stored as-is, not re-encoded
        ds = HDF5ImageDataset(out, split)
        assert ds.classes == ["n01", "n02", "n03"] and ds.num_classes == 3
        assert len(ds) == len(expected)
        assert ds.labels.dtype == np.int64 and ds.labels.tolist() == labels
        for i, name in enumerate(names):
            img, label = ds[i]
            assert label == labels[i]
            np.testing.assert_array_equal(np.asarray(img), decode(files[name]))
    assert leftovers(out) == []


def test_sharded_output_reads_back_like_one_file(converted, tmp_path):
    out, root, _ = converted
    shards = tmp_path / "sharded"
    written = convert(root, shards, num_shards=4, progress=False)  # val has 3 images: one shard empty
    assert written == [shards / f"shard-{s:05d}-of-00004.h5" for s in range(4)]
    for f in written:
        with h5py.File(f, "r") as h:
            assert h.attrs["format_version"] == 1 and h.attrs["num_classes"] == 3
            assert list(h["classes"].asstr()[()]) == ["n01", "n02", "n03"]
    for split in ("train", "val"):
        assert read_split(shards, split) == read_split(out, split)
        one, many = HDF5ImageDataset(out, split), HDF5ImageDataset(shards, split)
        assert many.labels.tolist() == one.labels.tolist()
        for i in range(len(one)):
            np.testing.assert_array_equal(np.asarray(many[i][0]), np.asarray(one[i][0]))


def test_corrupt_image_fails_naming_it_and_writes_nothing(tree, tmp_path):
    root, files = tree
    good = root / "train" / "n02" / "n02_0.JPEG"
    bad = root / "train" / "n02" / "truncated.JPEG"
    bad.write_bytes(good.read_bytes()[:200])
    out = tmp_path / "data.h5"
    with pytest.raises(DataError, match="truncated.JPEG") as e:
        convert(root, out, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert leftovers(out) == []


def test_corrupt_image_skip_counts_and_excludes_it(tree, tmp_path, capsys):
    root, files = tree
    bad = root / "train" / "n02" / "truncated.JPEG"
    bad.write_bytes(files["train/n02/n02_0.JPEG"][:200])
    out = tmp_path / "data.h5"
    convert(root, out, on_corrupt="skip", progress=False)
    names, _, _ = read_split(out, "train")
    assert names == sorted(k for k in files if k.startswith("train/"))
    with h5py.File(out, "r") as h:
        assert h["train"].attrs["num_skipped"] == 1
        assert h["val"].attrs["num_skipped"] == 0
    err = capsys.readouterr().err
    assert "skipped 1 corrupt image" in err and str(bad) in err


def test_interrupted_conversion_leaves_no_file_and_rerun_works(tree, tmp_path, monkeypatch):
    root, files = tree
    out = tmp_path / "data.h5"
    real_open = Image.open
    calls = {"n": 0}

    def open_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(root, out, progress=False)
    assert calls["n"] == 5
    assert not out.exists() and leftovers(out) == []
    monkeypatch.setattr(Image, "open", real_open)
    convert(root, out, progress=False)
    assert read_split(out, "train")[0] == sorted(k for k in files if k.startswith("train/"))


def test_rerun_removes_stale_staging_of_dead_runs_only(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "data.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"data.h5.tmp-{socket.gethostname()}-{dead}-ab12"
    alive = tmp_path / f"data.h5.tmp-{socket.gethostname()}-1-ab12"  # pid 1 always runs
    fresh = tmp_path / "data.h5.tmp-other-host-123-ab12"  # another node's writer, recently active
    for p in (stale, alive, fresh):
        p.write_bytes(b"partial")
    convert(root, out, progress=False)
    assert out.is_file()
    assert not stale.exists()
    assert alive.exists() and fresh.exists()
    assert remove_stale_staging(out) == []


def test_existing_output_is_not_overwritten_unless_asked(converted, tmp_path):
    out, root, _ = converted
    before = out.read_bytes()
    with pytest.raises(DataError, match="already exists"):
        convert(root, out, progress=False)
    assert out.read_bytes() == before
    convert(root, out, progress=False, overwrite=True)
    assert read_split(out, "val")[0] == ["val/n01/n01_0.JPEG", "val/n03/n03_0.JPEG",
                                         "val/n03/n03_1.JPEG"]


def test_missing_split_folder_is_named(tree, tmp_path):
    root, _ = tree
    with pytest.raises(DataError, match="no 'test' folder"):
        convert(root, tmp_path / "x.h5", splits=("train", "test"), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere", tmp_path / "x.h5", progress=False)


def test_cli_reports_corrupt_file_in_one_line(tree, tmp_path):
    root, files = tree
    (root / "val" / "n01" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "cli.h5"
    r = subprocess.run([sys.executable, "-m", "prelora_hpc.data.convert", str(root), str(out),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.jpg" in lines[0], r.stderr
    assert not out.exists() and leftovers(out) == []


def _mpiexec(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec is not on PATH (make test puts the venv's bin first)")
    return subprocess.run([exe, "-n", "2", sys.executable, "-m", "prelora_hpc.data.convert", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=180)


@pytest.mark.mpi
def test_two_rank_conversion_equals_one_process(tree, tmp_path):
    root, _ = tree
    single = tmp_path / "single.h5"
    convert(root, single, progress=False)
    for shards in (2, 3, 1):
        out = tmp_path / f"mpi-{shards}"
        r = _mpiexec(str(root), str(out), "--shards", str(shards))
        assert r.returncode == 0, r.stderr
        if shards == 1:  # proves the ranks really formed one world of two
            assert "2 ranks but 1 shard(s)" in r.stderr
        for split in ("train", "val"):
            assert read_split(out, split) == read_split(single, split)
        assert leftovers(out) == []


@pytest.mark.mpi
def test_two_rank_conversion_fails_together_on_a_corrupt_file(tree, tmp_path):
    root, files = tree
    # The last class of train lands in shard 1, written by rank 1.
    (root / "train" / "n03" / "n03_9.JPEG").write_bytes(files["train/n03/n03_0.JPEG"][:150])
    out = tmp_path / "mpi"
    r = _mpiexec(str(root), str(out), "--shards", "2", "--no-progress")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "n03_9.JPEG" in lines[0], r.stderr
    assert not out.exists() and leftovers(out) == []


# --------------------------------------------------------------------------- #
# Reading: validation and decode errors


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        HDF5ImageDataset(tmp_path / "missing.h5")


def test_not_hdf5_is_named(tmp_path):
    p = tmp_path / "fake.h5"
    p.write_text("this is not HDF5")
    with pytest.raises(DataError, match="fake.h5.*not a readable HDF5 file"):
        HDF5ImageDataset(p)


def test_wrong_format_version_is_named(converted):
    out, _, _ = converted
    with h5py.File(out, "r+") as h:
        h.attrs["format_version"] = 7
    with pytest.raises(DataError, match=r"data\.h5: format_version 7, this reader reads version 1"):
        HDF5ImageDataset(out)


def test_label_out_of_range_names_file_and_index(converted):
    out, _, _ = converted
    with h5py.File(out, "r+") as h:
        h["train/labels"][5] = 3
    with pytest.raises(DataError, match=r"data\.h5: train/labels\[5\] = 3 is outside \[0, 3\)"):
        HDF5ImageDataset(out, "train")
    HDF5ImageDataset(out, "val")  # the other split is fine


def test_missing_split_or_dataset_is_named(converted):
    out, _, _ = converted
    with pytest.raises(DataError, match=r"data\.h5: no split 'test' \(has: train, val\)"):
        HDF5ImageDataset(out, "test")
    with h5py.File(out, "r+") as h:
        del h["val/filenames"]
    with pytest.raises(DataError, match=r"data\.h5: dataset 'val/filenames' is missing"):
        HDF5ImageDataset(out, "val")


def test_missing_shard_is_named(converted, tmp_path):
    _, root, _ = converted
    shards = tmp_path / "sharded"
    convert(root, shards, num_shards=3, progress=False)
    (shards / "shard-00001-of-00003.h5").unlink()
    with pytest.raises(DataError, match="shard-00001-of-00003.h5 is missing"):
        HDF5ImageDataset(shards)


def _damage_image(out: Path, index: int) -> None:
    with h5py.File(out, "r+") as h:
        h["train/images"][index] = np.frombuffer(b"garbage, not a JPEG", dtype=np.uint8)


def test_undecodable_sample_names_file_split_and_index(converted):
    out, _, _ = converted
    _damage_image(out, 4)
    ds = HDF5ImageDataset(out, "train")  # construction does not decode images
    ds[3]
    with pytest.raises(DataError, match=r"data\.h5: train\[4\]: cannot decode image"):
        ds[4]


def test_undecodable_sample_skip_substitutes_the_next(converted, capsys):
    out, _, _ = converted
    _damage_image(out, 4)
    ds = HDF5ImageDataset(out, "train", on_bad_sample="skip")
    img, label = ds[4]
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ds[5][0]))
    assert label == ds.labels[5] and ds.bad_samples == 1
    assert r"train[4]" in capsys.readouterr().err


def test_dataset_pickles_without_handle_and_works_in_forked_workers(converted):
    out, _, _ = converted
    ds = HDF5ImageDataset(out, "val", transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    first = ds[0][0]  # opens a handle in this process before the fork
    clone = pickle.loads(pickle.dumps(HDF5ImageDataset(out, "val")))
    assert np.array_equal(np.asarray(clone[0][0]), first.numpy())
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    got = [x[0] for x, _ in loader]
    assert torch.equal(got[0], first) and len(got) == 3


def _equal(a, b) -> bool:
    """Two samples, (tensor or PIL image, label), identical to the bit."""
    (x, y), (u, v) = a, b
    if isinstance(x, torch.Tensor):
        return isinstance(u, torch.Tensor) and x.dtype == u.dtype and torch.equal(x, u) and y == v
    return np.array_equal(np.asarray(x), np.asarray(u)) and x.mode == u.mode and y == v


# The sampler's keys in a batch: unsorted, with a repeat.
_KEYS = [(6, 101), (0, 102), (3, 103), (6, 101), (7, 104), (1, 105)]


@pytest.mark.parametrize("kind", ["train", "train-auto-augment", "train-jpeg-draft", "val", "none"])
def test_a_batch_fetch_gives_the_samples_one_by_one_bit_for_bit(converted, tmp_path, kind):
    out, root, _ = converted
    shards = tmp_path / "sharded"
    convert(root, shards, num_shards=3, progress=False)
    data_cfg = DataConfig(jpeg_draft=kind.endswith("draft"),
                          auto_augment="rand-m9-mstd0.5" if "auto" in kind else None)
    t = None if kind == "none" else build_transform(data_cfg, 8, is_training=kind != "val")
    # Plain indices too where nothing is random (validation's keys).
    keys = _KEYS + [2, 5] if kind in ("val", "none") else _KEYS
    for path in (out, shards):
        ds = HDF5ImageDataset(path, "train", t)
        got = ds.__getitems__(keys)
        assert len(got) == len(keys)
        assert all(_equal(a, b) for a, b in zip(got, [ds[k] for k in keys])), path
    with pytest.raises(IndexError, match="index 8 out of range"):
        ds.__getitems__([(1, 0), (8, 0)])


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_batch_with_an_undecodable_sample_fails_or_substitutes_as_one_by_one(converted, capsys, policy):
    out, _, _ = converted
    _damage_image(out, 4)
    t = build_transform(DataConfig(), 8, is_training=True)
    ds = HDF5ImageDataset(out, "train", t, on_bad_sample=policy)
    keys = [(3, 1), (4, 2), (5, 3)]
    if policy == "fail":
        with pytest.raises(DataError, match=r"data\.h5: train\[4\]: cannot decode image"):
            ds.__getitems__(keys)
        return
    got = ds.__getitems__(keys)
    assert ds.bad_samples == 1 and "train[4]" in capsys.readouterr().err
    assert all(_equal(a, b) for a, b in zip(got, [ds[k] for k in keys]))
    assert got[1][1] == ds.labels[5]  # sample 5 stands in for 4, seeded as 4 was


def test_the_batched_tensor_tail_is_the_per_image_steps_for_any_images():
    t = build_transform(DataConfig(), 8, is_training=False)
    head, tail = split_tensor_tail(t)
    rng = np.random.default_rng(0)
    same = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    # Not the fast path: an HSV image, and a tensor (timm's MaybeToTensor passes it).
    mixed = same[:2] + [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("HSV"),
                        torch.rand(3, 8, 8)]
    for images in (same, mixed):
        want = torch.stack([t.transforms[-1](t.transforms[-2](im)) for im in images])
        assert torch.equal(tail(images), want)
    assert split_tensor_tail(None) == (None, None)
    assert torch.equal(tail([head(same[0])])[0], t(same[0]))


def test_a_worker_batch_is_the_training_process_samples_bit_for_bit(digits):
    data_cfg, model_cfg = _cfgs(source="digits", path=str(digits.parent), num_workers=1)
    loaders = build_dataloaders(data_cfg, model_cfg, 16, rank=0, world_size=2, seed=4)
    loaders.train_sampler.set_epoch(1)
    keys = list(loaders.train_sampler)[:32]
    batches = iter(loaders.train)
    ds = loaders.train.dataset
    try:
        for part in (keys[:16], keys[16:]):
            x, y = next(batches)
            one_by_one = [ds[k] for k in part]
            assert torch.equal(x, torch.stack([s[0] for s in one_by_one]))
            assert y.tolist() == [s[1] for s in one_by_one]
    finally:
        loaders.close()


# --------------------------------------------------------------------------- #
# Sampler


def test_sampler_ranks_are_disjoint_and_share_one_permutation():
    n, world = 24, 3
    samplers = [ShardedSampler(n, r, world, seed=5) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(s) == 8 for p, s in zip(per_rank, samplers))
    assert sorted(sum(per_rank, [])) == list(range(n))
    perm = [per_rank[i % world][i // world] for i in range(n)]
    assert perm != list(range(n))  # shuffled
    again = [list(ShardedSampler(n, r, world, seed=5)) for r in range(world)]
    assert again == per_rank  # a function of (seed, epoch) only


def test_sampler_epochs_differ_and_start_resumes_the_tail():
    s = ShardedSampler(20, 1, 2, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(1, start=7)
    assert list(s) == e1[7:] and len(s) == 3
    s.set_epoch(1, start=10)
    assert list(s) == [] and len(s) == 0
    with pytest.raises(ValueError, match="start 11"):
        s.set_epoch(1, start=11)


def test_sampler_drop_last_gives_every_rank_the_same_count():
    samplers = [ShardedSampler(23, r, 4, seed=1) for r in range(4)]
    lists = [list(s) for s in samplers]
    assert [len(x) for x in lists] == [5, 5, 5, 5]
    assert len(set(sum(lists, []))) == 20


def test_sampler_trims_each_rank_to_whole_optimizer_steps():
    """135 images per rank in micro batches of 15 with accumulation 2: 120
    images, 4 whole steps; the ranks still share one permutation."""
    plain = [list(ShardedSampler(270, r, 2, seed=3)) for r in range(2)]
    trimmed = [ShardedSampler(270, r, 2, seed=3, multiple_of=30) for r in range(2)]
    for s in trimmed:
        s.set_epoch(0)
    assert [len(s) for s in trimmed] == [120, 120]
    assert [list(s) for s in trimmed] == [p[:120] for p in plain]
    trimmed[0].set_epoch(1, start=90)
    assert len(list(trimmed[0])) == 30


def test_validation_sampler_covers_everything_in_order():
    lists = [list(ShardedSampler(10, r, 3, shuffle=False, drop_last=False)) for r in range(3)]
    assert lists == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# --------------------------------------------------------------------------- #
# Embedded digits, synthetic data, loaders


def test_digits_has_ten_classes_and_both_splits(digits):
    train, val = HDF5ImageDataset(digits, "train"), HDF5ImageDataset(digits, "val")
    assert train.classes == [str(d) for d in range(10)]
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.labels, minlength=10).min() >= 35  # stratified
    img, label = val[0]
    assert img.size == (32, 32) and 0 <= label < 10
    mtime = digits.stat().st_mtime_ns
    assert ensure_digits_hdf5(digits.parent) == digits
    assert digits.stat().st_mtime_ns == mtime  # found, not rebuilt


def test_concurrent_first_use_of_digits_is_safe(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=ensure_digits_hdf5, args=(tmp_path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["digits-v1.h5"]
    assert len(HDF5ImageDataset(tmp_path / "digits-v1.h5", "val")) == 360


def _cfgs(**data):
    model = ModelConfig(img_size=32, num_classes=10, patch_size=8)
    return DataConfig(**{"num_workers": 0, **data}), model


def test_build_dataloaders_digits_gives_full_batches(digits):
    data_cfg, model_cfg = _cfgs(source="digits", path=str(digits.parent), hflip=0.0)
    prepare_data(data_cfg)
    loaders = build_dataloaders(data_cfg, model_cfg, 16, rank=1, world_size=2, seed=0)
    assert (loaders.num_classes, loaders.train_size, loaders.val_size) == (10, 1437, 360)
    loaders.train_sampler.set_epoch(0)
    # Each rank's half of the images, trimmed to whole optimizer steps of 16.
    half = loaders.train_size // 2
    assert len(loaders.train_sampler) == half - half % 16
    assert sum(len(y) for _, y in loaders.train) == len(loaders.train_sampler)
    x, y = next(iter(loaders.train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    val_batches = list(loaders.val)
    assert sum(len(y) for _, y in val_batches) == 180
    assert val_batches[0][0].shape == (16, 3, 32, 32)


def test_build_dataloaders_rejects_class_count_mismatch(digits):
    data_cfg, model_cfg = _cfgs(source="digits", path=str(digits.parent))
    model_cfg.num_classes = 1000
    with pytest.raises(DataError, match=r"model.num_classes is 1000 but .*digits-v1.h5 has 10"):
        build_dataloaders(data_cfg, model_cfg, 8, rank=0, world_size=1, seed=0)


def test_build_dataloaders_synthetic_is_deterministic():
    data_cfg, model_cfg = _cfgs(source="synthetic", synthetic_train_size=40, synthetic_val_size=10)
    a = build_dataloaders(data_cfg, model_cfg, 8, rank=0, world_size=2, seed=3)
    b = build_dataloaders(data_cfg, model_cfg, 8, rank=0, world_size=2, seed=3)
    assert (a.train_size, a.val_size, a.num_classes) == (40, 10, 10)
    xa, ya = next(iter(a.train))
    xb, yb = next(iter(b.train))
    assert xa.shape == (8, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    ds = SyntheticImageDataset(5, 4, 8, seed=1)
    assert torch.equal(ds[2][0], ds[2][0]) and not torch.equal(ds[2][0], ds[3][0])
    assert set(ds.labels.tolist()) <= set(range(4))


def test_loader_bench_reports_supply_demand_and_workers(digits, tmp_path):
    from prelora_hpc.data import loader_bench

    out = tmp_path / "bench.json"
    loader_bench.main(["--path", str(digits), "--img-size", "32", "--max-workers", "1",
                       "--batches", "2", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                       "--json", str(out)])
    r = json.loads(out.read_text())
    assert [s["workers"] for s in r["loader"]] == [0, 1]
    assert all(s["images_per_s"] > 0 for s in r["loader"])
    assert r["train_step"]["images_per_s"] > 0 and r["workers_needed"] >= 1
    assert r["data"]["images"] == 1437
