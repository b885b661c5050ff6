"""data.jpeg_draft: decoding JPEGs at a reduced DCT scale before the crop.

The oracle is the plain transform (timm's, on a full decode) under the same
sample seed. Pixel differences are measured in 8-bit levels (0-255) of the
image before normalisation.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from prelora_hpc.config import DataConfig
from prelora_hpc.data.convert import convert
from prelora_hpc.data.errors import DataError
from prelora_hpc.data.hdf5 import HDF5ImageDataset
from prelora_hpc.data.seeding import seeded_rng
from prelora_hpc.data.transforms import DecodingTransform, build_transform

IMG = 224
REFERENCE_AUG = "rand-m9-mstd0.5-inc1"  # configs/vit_large_imagenet1k.yaml
# A level of the normalised tensor: timm's ImageNet std is 0.224-0.229.
LEVEL = 1 / (255 * 0.229)

# Tolerances against a full decode, in 8-bit levels. libjpeg's scaled IDCT
# averages each s x s block, the full path's bicubic reduction weighs a
# wider neighbourhood: on smooth content they agree to a level or two, and
# never by more than a few. A wrong crop box moves the position-coded
# pixels below by tens of levels on average.
MEAN_TOL = 1.5
MAX_TOL = 8.0


def position_jpeg(w: int, h: int, quality: int = 95) -> bytes:
    """A JPEG whose red channel encodes x and green channel y (blue: a smooth
    pattern), so a crop's pixels say where it was cut from."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px = np.stack([20 + 215 * xx / w, 20 + 215 * yy / h,
                   127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0)], -1)
    buf = io.BytesIO()
    Image.fromarray(px.round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def transforms(is_training: bool, **data) -> tuple:
    """(plain, drafting) transforms of the same data config."""
    plain = build_transform(DataConfig(**data), IMG, is_training)
    drafting = build_transform(DataConfig(jpeg_draft=True, **data), IMG, is_training)
    assert isinstance(drafting, DecodingTransform)
    return plain, drafting


def run_both(data: bytes, plain, drafting, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Both transforms on one encoded image under one sample seed, as the
    dataset runs them; returns the two tensors and the size drafting decoded."""
    with seeded_rng(seed):
        want = plain(Image.open(io.BytesIO(data)).convert("RGB"))
    im = Image.open(io.BytesIO(data))
    with seeded_rng(seed):
        got = drafting.augment(drafting.decode(im))
    return want, got, im.size


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / LEVEL


@pytest.mark.parametrize("seed", range(6))
def test_training_crop_is_the_same_box_decoded_smaller(seed):
    # Crops of at least a quarter of a 1600x1200 image are >= 600 px a side:
    # every one can be decoded at 1/2 or smaller.
    data = position_jpeg(1600, 1200)
    plain, drafting = transforms(True, scale=[0.25, 1.0], hflip=0.5)
    want, got, decoded = run_both(data, plain, drafting, seed)
    assert got.shape == want.shape == (3, IMG, IMG) and got.dtype == torch.float32
    assert decoded[0] <= 800 and decoded[1] <= 600, "no reduced decode happened"
    d = levels(got, want)
    assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL


def test_reference_augmentation_stays_close_with_draft():
    # RandAugment draws the same operations; solarize and posterize thresholds
    # can flip single pixels, so only the mean is bounded here.
    data = position_jpeg(1600, 1200)
    plain, drafting = transforms(True, auto_augment=REFERENCE_AUG)
    drafted = 0
    for seed in range(8):
        want, got, decoded = run_both(data, plain, drafting, seed)
        drafted += decoded != (1600, 1200)
        assert got.shape == (3, IMG, IMG)
        assert levels(got, want).mean() <= 2 * MEAN_TOL, f"seed {seed}"
    assert drafted >= 4


def test_large_jpeg_decodes_at_a_quarter_when_the_crop_allows():
    # The whole 2048x1536 image as the crop: 1536 / 224 = 6.9, so 1/4 is the
    # smallest scale that still gives the crop >= 224 px a side (1/8 gives 192).
    data = position_jpeg(2048, 1536)
    plain, drafting = transforms(True, scale=[1.0, 1.0], hflip=0.0)
    want, got, decoded = run_both(data, plain, drafting, seed=0)
    assert decoded == (512, 384)
    d = levels(got, want)
    assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL


def test_validation_decodes_no_smaller_than_the_resize_needs():
    # Validation resizes the short side to 224 / 0.875 = 256: 1536 / 256 = 6, so 1/4.
    data = position_jpeg(2048, 1536)
    plain, drafting = transforms(False)
    want, got, decoded = run_both(data, plain, drafting, seed=0)
    assert decoded == (512, 384) and got.shape == (3, IMG, IMG)
    d = levels(got, want)
    assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL


@pytest.mark.parametrize("size", [(32, 32), (500, 375)])
@pytest.mark.parametrize("is_training", [True, False])
def test_images_too_small_to_reduce_are_exactly_the_plain_transform(size, is_training):
    # CIFAR-sized, and ImageNet's most common size: no crop of 375 px fills
    # 224 at half scale, nor does 375 cover the 256 px validation resize.
    data = position_jpeg(*size)
    plain, drafting = transforms(is_training, auto_augment=REFERENCE_AUG)
    for seed in range(4):
        want, got, decoded = run_both(data, plain, drafting, seed)
        assert decoded == size
        assert torch.equal(got, want)


def test_non_jpeg_images_are_not_drafted():
    data = png(1600, 1200)
    plain, drafting = transforms(True, scale=[1.0, 1.0])
    want, got, decoded = run_both(data, plain, drafting, seed=0)
    assert decoded == (1600, 1200) and torch.equal(got, want)


def test_called_on_a_decoded_image_it_is_the_plain_transform():
    rgb = Image.open(io.BytesIO(position_jpeg(1600, 1200))).convert("RGB")
    plain, drafting = transforms(True, auto_augment=REFERENCE_AUG)
    with seeded_rng(3):
        want = plain(rgb)
    with seeded_rng(3):
        got = drafting(rgb)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- #
# Through the dataset


@pytest.fixture(scope="module")
def large_h5(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    for i, (w, h) in enumerate([(1600, 1200), (1200, 1600), (500, 375), (2048, 1536)]):
        folder = root / "src" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(position_jpeg(w, h))
    return convert(root / "src", root / "data.h5", splits=("train",), progress=False)[0]


def test_dataset_with_draft_gives_the_seeded_sample_of_a_full_decode(large_h5):
    plain, drafting = transforms(True, scale=[0.25, 1.0])
    full = HDF5ImageDataset(large_h5, "train", plain)
    drafted = HDF5ImageDataset(large_h5, "train", drafting)
    for i in range(len(full)):
        for seed in (11, 12):
            (want, y0), (got, y1) = full[(i, seed)], drafted[(i, seed)]
            assert y0 == y1 and got.shape == (3, IMG, IMG)
            d = levels(got, want)
            assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL, f"sample {i} seed {seed}"
            assert torch.equal(drafted[(i, seed)][0], got)  # same seed, same tensor


def test_dataset_with_draft_names_a_truncated_image(large_h5, tmp_path):
    path = tmp_path / "damaged.h5"
    path.write_bytes(large_h5.read_bytes())
    with h5py.File(path, "r+") as f:
        whole = f["train/images"][0]
        f["train/images"][0] = whole[: len(whole) // 3]  # header intact, pixels cut
    _, drafting = transforms(True, scale=[0.25, 1.0])
    with pytest.raises(DataError, match=r"damaged\.h5: train\[0\]: cannot decode image"):
        HDF5ImageDataset(path, "train", drafting)[(0, 5)]
    skipping = HDF5ImageDataset(path, "train", drafting, on_bad_sample="skip")
    got, label = skipping[(0, 5)]
    assert skipping.bad_samples == 1 and label == skipping.labels[1]
    assert torch.equal(got, skipping[(1, 5)][0])


# --------------------------------------------------------------------------- #
# The loader benchmark's comparison


def test_fake_jpegs_are_imagenet_sized(tmp_path):
    # ImageNet-1k's training images average about 400x350 px and 110 KB; the
    # supply figures in docs/loader_bench.md assume the fakes are like them.
    from prelora_hpc.data.loader_bench import write_fake_jpegs

    mean_bytes = write_fake_jpegs(tmp_path, 6)
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 6
    assert all(Image.open(f).size == (400, 350) for f in files)
    assert 90e3 <= mean_bytes <= 130e3


def test_loader_bench_compares_draft_against_full_decode(tmp_path):
    from prelora_hpc.data import loader_bench

    out = tmp_path / "bench.json"
    loader_bench.main(["--fake-jpeg", "8", "--fake-size", "1000x750", "--compare-draft",
                       "--rounds", "2", "--min-workers", "0", "--max-workers", "0", "--batches", "1",
                       "--batch-size", "4", "--breakdown", "4", "--demand", "855", "--json", str(out)])
    r = json.loads(out.read_text())
    plain, drafted = r["loader"], r["draft"]["loader"]
    assert [s["jpeg_draft"] for s in plain] == [False] and [s["jpeg_draft"] for s in drafted] == [True]
    assert len(plain[0]["rounds"]) == len(drafted[0]["rounds"]) == 2
    assert plain[0]["per_cpu_second"] > 0 and drafted[0]["per_cpu_second"] > 0
    (ratio,) = r["draft"]["ratio"]
    assert ratio["ratios"] == pytest.approx([b / a for a, b in zip(plain[0]["rounds"], drafted[0]["rounds"])])
    # The demand is the given one; no training step ran.
    assert r["train_step"] == {"model": None, "device": "given", "images_per_s": 855.0}
    assert r["workers_needed"] == math.ceil(855.0 / plain[0]["per_worker"])
    assert r["draft"]["workers_needed"] == math.ceil(855.0 / drafted[0]["per_worker"])
    assert r["workers_needed_cpu"] == math.ceil(855.0 / plain[0]["per_cpu_second"])
    assert r["stages_ms"]["jpeg_draft"]["crop"] == 0.0  # folded into the decode
    assert all(v > 0 for v in r["stages_ms"]["full_decode"].values())


# --------------------------------------------------------------------------- #
# The reference augmentation on any Pillow


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_reference_randaugment_posterize_at_full_magnitude_gives_a_black_image(jpeg_draft):
    # rand-m9-mstd0.5 draws magnitude 10 now and then; timm then asks posterize
    # for 0 bits, which Pillow >= 13 refuses: a training worker would die.
    t = build_transform(DataConfig(auto_augment=REFERENCE_AUG, jpeg_draft=jpeg_draft), IMG, True)
    steps = t.augment.transforms if jpeg_draft else t.transforms
    (op,) = [op for step in steps for op in getattr(step, "ops", []) if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.open(io.BytesIO(position_jpeg(64, 48))).convert("RGB")
    out = op(img)
    assert out.size == img.size and np.asarray(out).max() == 0
