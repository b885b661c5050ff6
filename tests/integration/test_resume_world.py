"""Resuming on another number of ranks: ZeRO 0 loads (and says the batch
changed); ZeRO 1/2 partitions resume through DeepSpeed's universal
checkpoint (tests/integration/test_universal_checkpoint.py checks what is
loaded); ZeRO 3 partitions are refused with one line, never a traceback."""

import pytest

from mpi_util import run_mpi, train_cmd
from prelora_hpc import checkpoint as ckpt
from run_helpers import read_metrics

pytestmark = pytest.mark.mpi

SHORT = ["run.epochs=1", "run.max_steps=4", "checkpoint.every_steps=2"]


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_resume_on_fewer_ranks(tmp_path, zero):
    run_mpi(train_cmd(tmp_path, *SHORT, f"deepspeed.zero_stage={zero}"), np=2)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    p = run_mpi(train_cmd(tmp_path, "run.epochs=1", "run.max_steps=6",
                          f"deepspeed.zero_stage={zero}"), np=1, check=False)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    copy = tmp_path / "checkpoints" / (latest + ckpt.UNIVERSAL)
    if zero < 3:
        assert p.returncode == 0, out[-3000:]
        assert "written by 2 ranks" in out and "resumed on 1" in out
        assert read_metrics(tmp_path, "start")[-1]["resumed_step"] == 4
        assert read_metrics(tmp_path, "end")[-1]["step"] == 6
        # ZeRO 0 holds whole optimizer state on every rank: no conversion.
        assert copy.is_dir() == (zero == 1)
    else:
        assert p.returncode == 1, out[-3000:]
        errors = [l for l in out.splitlines() if "error" in l.lower()]
        assert any("written by 2 ranks under ZeRO 3" in l and "cannot be resumed on 1 ranks" in l
                   for l in errors), out[-3000:]
        # Nothing was loaded, nothing was written: the checkpoint stays latest.
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == latest
        assert not copy.exists()


def test_resume_mid_epoch_on_more_ranks_keeps_the_epochs_position(tmp_path):
    """A global batch of 32 kept by derived accumulation (2 on one rank, 1 on
    two): one rank stops 5 steps (160 of 256 samples) into the epoch; two
    ranks go on from the same place in the shared permutation (80 samples
    each) and run the epoch's remaining 3 steps."""
    batch = ["run.epochs=1", "deepspeed.train_batch_size=32", "deepspeed.grad_accum_steps=auto"]
    run_mpi(train_cmd(tmp_path, *batch, "run.max_steps=5"), np=1)
    p = run_mpi(train_cmd(tmp_path, *batch), np=2, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "global batch 32 = 16 micro x 1 accum (auto) x 2 ranks" in p.stdout
    assert read_metrics(tmp_path, "start")[-1]["resumed_step"] == 5
    assert read_metrics(tmp_path, "end")[-1]["step"] == 8
    assert read_metrics(tmp_path, "epoch")[-1]["epoch"] == 1
