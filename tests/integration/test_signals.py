"""Walltime stops with the settings users run, on real MPI ranks: DataLoader
workers (the quick start's one, and four) and gradient accumulation over an
epoch end.

A scheduler's stop reaches a run two ways: through ``mpiexec`` (PBS' and
Slurm's signal to the launcher, ``prelora-launch``'s stop timer), and to
every process of the job at once, workers included (PBS at the walltime's
end, ``qdel``, preemption). Either way the run must checkpoint and exit 85,
and the checkpoint must resume exactly.
"""

import os
import signal
import subprocess
import time

import pytest
import torch

from mpi_util import ROOT, env, mpiexec, run_mpi, script_cmd, train_cmd
from prelora_hpc import checkpoint as ckpt
from prelora_hpc.config import load_config
from run_helpers import read_metrics

pytestmark = pytest.mark.mpi

QUICKSTART = "configs/quickstart.yaml"
# A constant learning rate makes a step's update independent of the run's
# length, so a run stopped anywhere and resumed to any length can be
# compared step by step with one uninterrupted run.
QS = ["optim.schedule=constant", "logging.interval_steps=1", "checkpoint.every_steps=0"]
REFERENCE_STEPS = 60
RESUMED_STEPS = 3


def step_losses(run_dir) -> dict[int, float]:
    out = {}
    for r in read_metrics(run_dir, "step"):
        out[r["step"]] = r["loss"]   # a resumed run's records override
    return out


def steps_done(run_dir) -> int:
    try:
        return len(read_metrics(run_dir, "step"))
    except (FileNotFoundError, ValueError):
        return 0


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    """Poll ``pred`` until it holds; fail at the deadline or if ``proc`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The quick start, uninterrupted, for REFERENCE_STEPS steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_mpi(train_cmd(out, *QS, f"run.max_steps={REFERENCE_STEPS}", config=QUICKSTART))
    return step_losses(out)


def worker_pids(mpiexec_pid: int) -> list[int]:
    """DataLoader workers under the job: forks of a rank (same command line)
    whose parent is that rank."""
    import psutil
    ours = [p for p in psutil.Process(mpiexec_pid).children(recursive=True)
            if "prelora-train" in " ".join(p.cmdline())]
    pids = {p.pid for p in ours}
    return [p.pid for p in ours if p.ppid() in pids]


# Each delivery once, and each worker count once: the quick start's one
# worker through mpiexec, four workers signalled with the whole job.
@pytest.mark.parametrize("workers,delivery", [(1, "mpiexec"), (4, "killpg")])
def test_sigterm_with_workers_checkpoints_and_resumes_exactly(reference, tmp_path, workers,
                                                              delivery):
    """SIGTERM to mpiexec, or to every process of the job (as PBS does at the
    walltime's end): exit 85, a verified ``latest`` at the stop step, no lost
    worker, and the resumed steps equal the uninterrupted run's."""
    overrides = [*QS, f"data.num_workers={workers}"]
    cmd = [mpiexec(), "-n", "2", *train_cmd(tmp_path, *overrides, "run.epochs=200",
                                            config=QUICKSTART)]
    # Its own session: killpg reaches the job's processes and nothing else.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: steps_done(tmp_path) >= 3, 240, "three training steps", proc)
        assert len(worker_pids(proc.pid)) == 2 * workers
        if delivery == "killpg":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 85, out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
    stop = read_metrics(tmp_path, "stop")[-1]
    point = ckpt.find_resume(load_config(tmp_path / "config.yaml"))
    assert point.global_step == stop["step"] and (point.path / ckpt.SIDECAR).is_file()
    assert stop["step"] + RESUMED_STEPS <= REFERENCE_STEPS, "stopped too late to compare"

    end = stop["step"] + RESUMED_STEPS
    p = run_mpi(train_cmd(tmp_path, *overrides, f"run.max_steps={end}", config=QUICKSTART))
    assert f"at step {stop['step']}" in p.stdout, p.stdout[-2000:]
    got = step_losses(tmp_path)
    for step in range(1, end + 1):
        assert got[step] == reference[step], f"step {step}"


# --------------------------------------------------------------------------- #
# Accumulation over an epoch end. 270 synthetic images on 2 ranks: 135 per
# rank, 9 micro batches of 15 (an odd count) before trimming; accumulation 2
# trims each epoch to 4 optimizer steps of 30 images per rank.
ACCUM = ["data.synthetic_train_size=270", "deepspeed.micro_batch_size=15",
         "deepspeed.grad_accum_steps=2", "data.num_workers=2", "optim.schedule=constant",
         "logging.interval_steps=1", "run.mode=full", "run.epochs=4"]
ACCUM_STEPS_PER_EPOCH = 4


def deepspeed_model_file(point) -> dict:
    """DeepSpeed's model file of a checkpoint: weights and its own counters."""
    files = sorted(point.path.glob("mp_rank_*_model_states.pt"))
    assert files, f"no DeepSpeed model file in {point.path}"
    return torch.load(files[0], map_location="cpu", weights_only=False)


def deepspeed_global_steps(point) -> int:
    """DeepSpeed's own count of optimizer steps."""
    return deepspeed_model_file(point)["global_steps"]


def test_accumulation_counts_deepspeed_steps_across_epochs_and_stops_on_sigterm(tmp_path):
    """Accumulation 2 over an odd micro-batch count per epoch: the run's
    optimizer steps are DeepSpeed's (its ``global_steps`` in every
    checkpoint), a SIGTERM in epoch 2 is answered at the next step with exit
    85, and the resumed run ends bit for bit where an uninterrupted run ends."""
    ref = tmp_path / "uninterrupted"
    run_mpi(train_cmd(ref, *ACCUM))
    ref_cfg = load_config(ref / "config.yaml")
    end = ckpt.find_resume(ref_cfg)
    assert end.global_step == 4 * ACCUM_STEPS_PER_EPOCH
    assert deepspeed_global_steps(end) == end.global_step
    start = read_metrics(ref, "start")[0]
    assert start["steps_per_epoch"] == ACCUM_STEPS_PER_EPOCH
    assert [e["step"] for e in read_metrics(ref, "epoch")] == [4, 8, 12, 16]

    run = tmp_path / "stopped"
    # SIGTERM on rank 1 only, during step 6 (epoch 2): every rank stops after it.
    p = run_mpi(script_cmd("sigterm_at_step.py", 5, 1, "--config", "configs/vit_tiny_cpu.yaml",
                           "--output-dir", run, *ACCUM), check=False)
    assert p.returncode == 85, p.stdout[-3000:] + p.stderr[-3000:]
    point = ckpt.find_resume(load_config(run / "config.yaml"))
    assert point.global_step == 6 and deepspeed_global_steps(point) == 6

    run_mpi(train_cmd(run, *ACCUM))
    resumed = ckpt.find_resume(load_config(run / "config.yaml"))
    assert resumed.global_step == end.global_step
    assert deepspeed_global_steps(resumed) == end.global_step
    assert step_losses(run) == step_losses(ref)
    a = deepspeed_model_file(end)["module"]
    b = deepspeed_model_file(resumed)["module"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
