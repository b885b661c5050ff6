"""CIFAR-10 through the path ImageNet takes: JPEG files of the real data set
in an ImageFolder tree, ``prelora-convert`` to HDF5, then the benchmark's
own config (``configs/cifar10.yaml``) on 2 MPI ranks through both switches.

The tarball (the 50,000 training images as JPEGs, see docs/data.md) is named
by ``PRELORA_CIFAR10_TARBALL``; ``make test`` sets it where the development
machines keep it. Without it the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import pytest

from mpi_util import ROOT, env, run_mpi, train_cmd
from run_helpers import read_metrics

pytestmark = pytest.mark.mpi

PER_CLASS = {"train": 25, "val": 5}
"""300 images: 25 training and 5 validation images of each of the 10 classes."""


def take_subset(tarball: Path, dest: Path) -> dict[str, int]:
    """Unpack the first ``PER_CLASS`` images of each class and split; returns
    the count per split."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(tarball) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 4 or parts[1] not in PER_CLASS:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) >= PER_CLASS[parts[1]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            m.name = str(Path(*parts[1:]))
            tar.extract(m, dest, filter="data")
    return {s: sum(n for (split, _), n in counts.items() if split == s) for s in PER_CLASS}


def test_cifar10_jpegs_convert_and_train_through_both_switches(tmp_path):
    """300 real CIFAR-10 JPEGs -> prelora-convert -> the benchmark config on 2
    ranks: ten classes in both splits, stage 1 -> 2 -> 3 with the config's
    ranks and stage-3 parameters, and an evaluation on the converted
    validation split."""
    tarball = os.environ.get("PRELORA_CIFAR10_TARBALL", "")
    if not tarball or not Path(tarball).is_file():
        pytest.skip(f"no CIFAR-10 tarball (PRELORA_CIFAR10_TARBALL={tarball!r})")
    tree = tmp_path / "cifar10"
    assert take_subset(Path(tarball), tree) == {"train": 250, "val": 50}

    h5 = tmp_path / "cifar10.h5"
    exe = Path(sys.executable).parent / "prelora-convert"
    p = subprocess.run([str(exe), str(tree), str(h5), "--no-progress"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(h5) as f:
        for split, n in (("train", 250), ("val", 50)):
            assert len(f[split]["labels"]) == n
            assert sorted(set(f[split]["labels"][:].tolist())) == list(range(10))

    run_dir = tmp_path / "run"
    # Windows of 2 steps and a threshold every window passes: the switch at
    # the second window, one window of stage 2 (the config itself goes
    # straight to stage 3), then stage 3.
    run_mpi(train_cmd(run_dir, f"data.path={h5}", "prelora.window_steps=2",
                      "prelora.tau=1000", "prelora.zeta=1000", "prelora.warmup_windows=1",
                      "run.epochs=3",
                      "deepspeed.micro_batch_size=16", "run.eval_every_steps=0",
                      config="configs/cifar10.yaml"), timeout=600)
    switches = read_metrics(run_dir, "switch")
    assert [s["stage"] for s in switches] == [2, 3]
    ranks = set(switches[0]["rank_map"].values())
    assert ranks and ranks <= {4, 8, 16}
    evals = read_metrics(run_dir, "epoch")
    assert evals[-1]["stage"] == 3 and 0.0 <= evals[-1]["top1"] <= 100.0
    # Stage 3 trains the adapters plus what the config keeps: more than the
    # adapters alone, far less than the model.
    end = read_metrics(run_dir, "end")[-1]
    assert 0.02 * end["params_total"] < end["trainable_params"] < 0.25 * end["params_total"]
