"""scripts/cifar10_folders.py: the publisher's pickled CIFAR-10 batches to
the ImageFolder tree prelora-convert reads, split by each class's image
number."""

from __future__ import annotations

import importlib.util
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cifar10_folders.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cifar10_folders", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_download(path: Path, per_batch: int, rng) -> dict[str, np.ndarray]:
    """A cifar-10-python.tar.gz of the publisher's format (rows of 3072 bytes,
    channel-major) with smooth images, so JPEG keeps them close."""
    arrays = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            base = rng.integers(30, 220, size=(per_batch, 3, 1, 1))
            data = np.broadcast_to(base, (per_batch, 3, 32, 32)).astype(np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
            arrays[name] = (data, labels)
            blob = pickle.dumps({b"data": data.reshape(per_batch, -1), b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return arrays


def test_training_images_split_by_class_number_and_pixels_survive(tmp_path, monkeypatch):
    mod = load_script()
    monkeypatch.setattr(mod, "TRAIN_PER_CLASS", 3)
    arrays = fake_download(tmp_path / "cifar-10-python.tar.gz", 8, np.random.default_rng(0))
    out = tmp_path / "tree"
    assert mod.main([str(tmp_path / "cifar-10-python.tar.gz"), str(out), "--test"]) == 0

    # Each class's images numbered in batch order; numbers < 3 train, the rest validate.
    seen: dict[int, int] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        data, labels = arrays[name]
        for pixels, label in zip(data, labels):
            n = seen[label] = seen.get(label, -1) + 1
            split = "train" if n < 3 else "val"
            f = out / split / mod.CLASSES[label] / f"{n:04d}.jpg"
            got = np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
            assert got.shape == (32, 32, 3)
            assert np.abs(got - pixels.transpose(1, 2, 0)).max() <= 3, f
    n_train = sum(min(n + 1, 3) for n in seen.values())
    assert len(list((out / "train").rglob("*.jpg"))) == n_train
    assert len(list((out / "val").rglob("*.jpg"))) == 40 - n_train
    assert len(list((out / "test").rglob("*.jpg"))) == 8
