"""GPU-only paths: bf16 engines and CUDA memory across rebuilds.

Skipped without a CUDA device; run them where one is lent
(`python -m pytest -m gpu`)."""

import json

import pytest
import torch

from mpi_util import run_mpi, script_cmd, train_cmd
from run_helpers import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.mpi,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_run_passes_all_stages_on_one_gpu(tmp_path):
    run_mpi(train_cmd(tmp_path, "deepspeed.precision=bf16", "run.epochs=1"), np=1)
    assert [s["stage"] for s in read_metrics(tmp_path, "switch")] == [2, 3]


def test_inductor_compiled_run_passes_all_stages_and_resumes_on_one_gpu(tmp_path):
    """What the CPU suite checks with ``aot_eager``, with inductor's kernels."""
    common = ["deepspeed.precision=bf16", "model.compile=true", "optim.schedule=constant"]
    run_mpi(train_cmd(tmp_path, *common, "run.max_steps=8"), np=1, timeout=900)
    assert [s["stage"] for s in read_metrics(tmp_path, "switch")] == [2, 3]
    p = run_mpi(train_cmd(tmp_path, *common, "run.max_steps=10"), np=1, timeout=900)
    assert "resumed from" in p.stdout
    assert read_metrics(tmp_path, "end")[-1]["step"] == 10


def test_cuda_memory_does_not_grow_over_rebuilds(tmp_path):
    run_mpi(script_cmd("rebuild_memory.py", tmp_path), np=1)
    series = json.loads((tmp_path / "rss_rank0.json").read_text())
    assert series[-1] - series[1] < 16 * 2**20, series
