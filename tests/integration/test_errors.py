"""Errors as a user meets them on real MPI ranks: an error we raise on
purpose is one line, said once when every rank raises it; anything else is
a bug and keeps its traceback. Both exit 1 on every rank, nothing hangs."""

import pytest

from mpi_util import run_mpi, script_cmd, train_cmd

pytestmark = pytest.mark.mpi

TINY = ["run.max_steps=2", "logging.tensorboard=false"]


def test_an_error_every_rank_raises_is_said_once(tmp_path):
    # 16 micro x 2 ranks does not divide 100: every rank refuses alike.
    p = run_mpi(train_cmd(tmp_path, *TINY, "deepspeed.train_batch_size=100"), check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert lines == ["prelora-train: error: BatchSizeError: deepspeed.train_batch_size=100 is not "
                     "a multiple of micro_batch_size 16 x world size 2 = 32, so grad_accum_steps: "
                     "auto cannot keep it; choose a node count or micro batch that divides it"], \
        p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "BAD TERMINATION" not in p.stdout + p.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    p = run_mpi(script_cmd("bug_in_step.py", "--config", "configs/vit_tiny_cpu.yaml",
                           "--output-dir", tmp_path, *TINY), check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    # Both ranks print at once and mpiexec merges their lines, so the frame
    # and its source line need not be adjacent: each is asked for alone.
    lines = p.stderr.splitlines()
    assert "Traceback (most recent call last):" in lines
    assert any(l.strip().startswith('File "') and l.endswith("in train_step") for l in lines)
    assert 'raise RuntimeError("a bug in the step")' in {l.strip() for l in lines}
    assert "error: RuntimeError: a bug in the step" in p.stderr
