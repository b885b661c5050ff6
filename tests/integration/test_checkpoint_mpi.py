"""A rank that dies and a non-finite loss, on real MPI ranks: the job ends or
skips the step, and the checkpoints already written stay valid. (Exact resume
in every stage: tests/integration/test_soak.py.)"""

import json
import signal
import subprocess
import time

import psutil
import pytest

from mpi_util import ROOT, env, mpiexec, run_mpi, script_cmd, train_cmd
from prelora_hpc import checkpoint as ckpt
from prelora_hpc.config import load_config
from run_helpers import read_metrics

pytestmark = pytest.mark.mpi

# vit_tiny_cpu: 8 steps per epoch on 2 ranks, 2-step windows, k=2, loose
# thresholds: stage 2 from step 4, stage 3 from step 6, 16 steps in all.
# A constant learning rate keeps run.max_steps from changing the schedule.
BASE = ["optim.schedule=constant", "logging.interval_steps=1"]


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _steps_done(run_dir):
    try:
        return len(read_metrics(run_dir, "step"))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _start(run_dir, *overrides):
    cmd = [mpiexec(), "-n", "2", *train_cmd(run_dir, *BASE, "run.epochs=200", *overrides)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


#: A dead rank ends the job within this many seconds (Hydra tears the job
#: down when a rank dies; the collective timeout bounds the rest).
DEAD_RANK_BOUND_S = 60


def test_killed_rank_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    proc = _start(tmp_path, "checkpoint.every_steps=2", "run.collective_timeout_s=30")
    _wait_for(lambda: (tmp_path / "checkpoints" / "latest").is_file(), 180, "a checkpoint")
    ranks = [p for p in psutil.process_iter(["cmdline", "name"])
             if str(tmp_path) in " ".join(p.info["cmdline"] or [])
             and "python" in " ".join(p.info["cmdline"] or [])
             and "mpiexec" not in (p.info["name"] or "")]
    assert len(ranks) == 2, [p.info for p in ranks]
    victim = max(ranks, key=lambda p: p.pid)
    t0 = time.time()
    victim.send_signal(signal.SIGKILL)
    proc.communicate(timeout=DEAD_RANK_BOUND_S + 30)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert elapsed < DEAD_RANK_BOUND_S, f"job took {elapsed:.0f} s to end after a rank died"
    point = ckpt.find_resume(load_config(tmp_path / "config.yaml"))
    assert (point.path / ckpt.SIDECAR).is_file()
    # Still loadable: resume it for one more step.
    p = run_mpi(train_cmd(tmp_path, *BASE, f"run.max_steps={point.global_step + 1}"))
    assert f"at step {point.global_step}" in p.stdout


def test_nan_loss_stops_with_message_and_keeps_latest(tmp_path):
    p = run_mpi(script_cmd("nan_at_step.py", 5, "--config", "configs/vit_tiny_cpu.yaml",
                           "--output-dir", tmp_path, *BASE, "checkpoint.every_steps=2"),
                check=False)
    assert p.returncode != 0
    assert "non-finite loss at step 5" in p.stderr and "stage 2" in p.stderr, p.stderr[-2000:]
    point = ckpt.find_resume(load_config(tmp_path / "config.yaml"))
    assert point.global_step == 4 and (point.path / ckpt.SIDECAR).is_file()


def test_nan_loss_can_skip_steps_instead(tmp_path):
    p = run_mpi(script_cmd("nan_at_step.py", 5, "--config", "configs/vit_tiny_cpu.yaml",
                           "--output-dir", tmp_path, *BASE, "run.on_nonfinite_loss=skip"))
    end = read_metrics(tmp_path, "end")[-1]
    assert end["skipped_steps"] == 1 and end["step"] == 16


@pytest.mark.parametrize("zero,accum", [pytest.param(2, 2, marks=pytest.mark.compat), (3, 1)])
def test_a_nan_on_one_rank_skips_the_whole_step_everywhere(tmp_path, zero, accum):
    """The flags are agreed once per optimizer step, after backward: the
    step's update is discarded on every rank, weights and AdamW state
    exactly as before, and the next step trains again."""
    run_mpi(script_cmd("nan_skip_update.py", tmp_path, zero, accum))
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"nan_skip_rank{rank}.json").read_text())
        assert rec["boundary_flags"] == [[False, False]] * (accum - 1) + [[True, True]], rec
        assert rec["unchanged"] and rec["state_tensors"] > 0, rec
        assert rec["updated_after"] and rec["finite_after"], rec
        assert rec["skipped_steps"] == 1
