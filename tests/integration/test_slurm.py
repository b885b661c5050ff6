"""jobs/slurm.sbatch, unchanged, on a real single-node Slurm cluster.

The cluster (tests/slurm/cluster.sh, started once per session by the
``slurm_cluster`` fixture in conftest.py) has one node with this machine's
cores, no GPUs and no accounting. Each job is submitted the way docs/slurm.md
tells a user of a CPU-only partition to: the GPU lines cleared with
``--constraint= --gpus-per-node=0`` (also in PRELORA_SUBMIT_ARGS, so that
resubmissions repeat them), ``--nodes=1 --ntasks-per-node=2
--cpus-per-task=1``, a time limit, and the run through the template's
variables with ``--export``. The template's account and QOS lines stay:
Slurm without accounting ignores them. scripts/launch.sh then starts the
ranks as it would at a site (``srun --mpi=pmi2``).

Checked: the quick start runs as one 2-rank MPI world; a walltime warning
(USR1 to the batch shell) makes the run checkpoint and the job resubmit
itself, and the follow-up resumes at the saved stage and step and completes
all three stages; a request the cluster cannot satisfy is refused at sbatch.
PRELORA_SLOW=1 adds a run where a real time limit delivers the warning.

The jobs seen are listed in the "Slurm jobs" section of the terminal summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = "jobs/slurm.sbatch"
CONFIG = "configs/quickstart.yaml"
# Job states after which a job never runs again.
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# The first DeepSpeed run on a machine JIT-builds a CPU communication op
# (a minute or two on two cores): waits for a job's first steps allow for it.
START_S = 420

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def venv() -> str:
    """PRELORA_VENV for the jobs: the environment running the tests, if it is
    a venv (make test's .venv), else empty (the job inherits PATH)."""
    prefix = Path(sys.prefix)
    if prefix != Path(sys.base_prefix) and (prefix / "bin" / "activate").exists():
        return str(prefix)
    return ""


@pytest.fixture
def slurm(slurm_cluster, tmp_path, request):
    """The cluster, for one test; jobs the test leaves queued or running are
    cancelled afterwards so the next test finds the node free."""
    if shutil.which("prelora-train") is None and not venv():
        pytest.skip("prelora-train is not on PATH (activate the venv, or run `make test`)")
    yield slurm_cluster
    r = subprocess.run(["squeue", "-h", "-O", "JobID:20,STDOUT:1000"], env=slurm_cluster.env(),
                       capture_output=True, text=True, timeout=30)
    mine = [line.split()[0] for line in r.stdout.splitlines()
            if str(tmp_path) in line and line.split()]
    if mine:
        subprocess.run(["scancel", *mine], env=slurm_cluster.env(), timeout=30)


class Submission:
    """sbatch of the template as a CPU-partition user writes it."""

    def __init__(self, slurm, tmp_path: Path, name: str):
        self.slurm = slurm
        self.tmp = tmp_path
        self.name = name
        self.run_dir = tmp_path / "run"
        # docs/slurm.md: what every resubmission must repeat goes into
        # PRELORA_SUBMIT_ARGS. The output file is there too, so that the
        # follow-up jobs log beside the first one instead of into the repository.
        self.submit_args = f"--constraint= --gpus-per-node=0 --output={tmp_path}/slurm-%j.out"

    def sbatch(self, *options: str, train_args: str = "", max_resubmits: int = 0
               ) -> subprocess.CompletedProcess:
        export = ",".join(["ALL", f"PRELORA_CONFIG={CONFIG}", f"PRELORA_RUN_DIR={self.run_dir}",
                           f"PRELORA_VENV={venv()}", f"PRELORA_TRAIN_ARGS={train_args}",
                           f"PRELORA_MAX_RESUBMITS={max_resubmits}"])
        cmd = ["sbatch", "--parsable", *self.submit_args.split(), "--nodes=1",
               "--ntasks-per-node=2", "--cpus-per-task=1", "-t", "00:20:00", *options,
               f"--export={export}", SBATCH]
        # One thread per rank: the two ranks have one core each.
        env = self.slurm.env(PRELORA_SUBMIT_ARGS=self.submit_args, OMP_NUM_THREADS=1,
                             DS_ACCELERATOR="cpu", PYTHONUNBUFFERED=1)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    def submit(self, *options: str, **kw) -> str:
        r = self.sbatch(*options, **kw)
        assert r.returncode == 0, f"sbatch refused the job: {r.stderr}"
        return r.stdout.strip().split(";")[0]

    def output(self, job: str) -> str:
        p = self.tmp / f"slurm-{job}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def info(self, job: str) -> dict:
        r = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.slurm.env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
        return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)

    def explain(self, job: str) -> str:
        """What to read when a job did not do what the test expected."""
        try:
            state = " ".join(f"{k}={v}" for k, v in self.info(job).items()
                             if k in ("JobState", "Reason", "ExitCode", "RunTime", "Dependency"))
        except AssertionError as e:
            state = str(e)
        out = "\n".join(self.output(job).splitlines()[-40:])
        return (f"\njob {job}: {state}\n--- {self.tmp}/slurm-{job}.out (tail)\n{out}\n"
                f"{self.slurm.log_tail('slurmctld.log', 10)}\n{self.slurm.log_tail('slurmd.log', 10)}")

    def wait(self, job: str, timeout: float, note: str = "") -> dict:
        """Wait for the job to end; record it for the summary; return its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(job)
            if info["JobState"] in FINAL:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still {info['JobState']} after {timeout:.0f} s"
                                     + self.explain(job))
            time.sleep(1)
        self.slurm.seen(f"{self.name}: job {job} {info['JobState']} ExitCode={info['ExitCode']} "
                        f"RunTime={info['RunTime']}{' (' + note + ')' if note else ''}")
        return info

    def records(self, kind: str) -> list[dict]:
        """metrics.jsonl records of one kind; a line still being written is skipped."""
        p = self.run_dir / "metrics.jsonl"
        out = []
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("kind") == kind:
                    out.append(rec)
        return out

    def wait_for_step(self, job: str, step: int, timeout: float) -> None:
        """Wait until the run has logged training past ``step`` while the job runs."""
        deadline = time.monotonic() + timeout
        while True:
            if any(r["step"] >= step for r in self.records("window") + self.records("step")):
                return
            state = self.info(job)["JobState"]
            if state in FINAL:
                raise AssertionError(f"job {job} ended ({state}) before step {step}"
                                     + self.explain(job))
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step} after {timeout:.0f} s" + self.explain(job))
            time.sleep(0.5)


def follow_up(sub: Submission, job: str) -> str:
    """The job that ``job`` submitted through scripts/resubmit.sh."""
    m = re.search(r"resubmit\.sh: submitted: Submitted batch job (\d+)", sub.output(job))
    assert m, "the job did not resubmit itself" + sub.explain(job)
    return m.group(1)


def stage_at(sub: Submission, step: int) -> int:
    """The stage the run was in at ``step``, from its switch records."""
    return max([s["stage"] for s in sub.records("switch") if s["step"] <= step], default=1)


def check_resumed(sub: Submission, first: str, second: str) -> None:
    """The first job stopped with a checkpoint; the second resumed there and finished."""
    stops = sub.records("stop")
    assert len(stops) == 1, f"stop records: {stops}" + sub.explain(first)
    step, stage = stops[0]["step"], stage_at(sub, stops[0]["step"])
    out1 = sub.output(first)
    assert f"stopping at step {step} on SIGUSR1" in out1, sub.explain(first)
    assert "resubmitting" in out1, sub.explain(first)

    info = sub.wait(second, START_S, note=f"follow-up of {first}, resumed at step {step}")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), sub.explain(second)
    out2 = sub.output(second)
    m = re.search(r"resumed from (\S+) in stage (\d) .* at step (\d+)", out2)
    assert m, "the follow-up job did not resume" + sub.explain(second)
    assert (int(m.group(2)), int(m.group(3))) == (stage, step), m.group(0)
    starts = sub.records("start")
    assert len(starts) == 2 and starts[1]["resumed_step"] == step
    assert starts[1]["stage"] == stage and starts[1]["world_size"] == 2
    end = sub.records("end")
    assert len(end) == 1 and end[0]["step"] == starts[0]["total_steps"], end
    assert "training finished (exit 0): no resubmission" in out2, sub.explain(second)


# --------------------------------------------------------------------------- #


def test_impossible_request_is_refused_at_sbatch(slurm, tmp_path):
    """More tasks than the node has cores: sbatch says why and nothing runs."""
    sub = Submission(slurm, tmp_path, "impossible request")
    r = sub.sbatch("--ntasks-per-node=64")
    slurm.seen(f"{sub.name}: sbatch --ntasks-per-node=64 exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode != 0, f"sbatch accepted job {r.stdout.strip()}"
    assert "Batch job submission failed" in r.stderr
    assert re.search(r"More processors requested than permitted|"
                     r"Requested node configuration is not available", r.stderr), r.stderr
    assert not sub.run_dir.exists()


@pytest.mark.slow
# Each delivery once: to the batch shell with the quick start's one worker,
# to every process of the job with four.
@pytest.mark.parametrize("workers, target", [(1, "--batch"), (4, "--full")])
def test_quickstart_on_two_ranks_stops_on_usr1_resubmits_and_completes(slurm, tmp_path,
                                                                        workers, target):
    """The quick start, shortened to 3 epochs (66 steps) with 5-step windows
    and thresholds that pass at once (switches at steps 15 and 20), runs as
    one 2-rank MPI world. USR1 to the batch shell, as --signal=B:USR1@300
    sends it before the time limit, or to every process of the job
    (``--full``: the batch shell, the ranks and their DataLoader workers):
    the run checkpoints, the job resubmits itself, the follow-up resumes
    where the run stopped and completes all three stages."""
    sub = Submission(slurm, tmp_path, f"walltime signal, {workers} workers, {target}")
    job = sub.submit(train_args=f"run.epochs=3 data.num_workers={workers} "
                                "prelora.window_steps=5 prelora.tau=100 prelora.zeta=100",
                     max_resubmits=1)
    sub.wait_for_step(job, 5, START_S)
    r = subprocess.run(["scancel", "--signal=USR1", target, job], env=slurm.env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    info = sub.wait(job, 180, note=f"scancel --signal=USR1 {target}")
    # 85: stopped after a checkpoint (Slurm calls any non-zero exit FAILED).
    assert info["ExitCode"] == "85:0", sub.explain(job)
    assert info["NumTasks"] == "2", info
    out = sub.output(job)
    assert "walltime warning" in out, sub.explain(job)
    # launch.sh's choice under Slurm, and one MPI world of two ranks.
    assert "scheduler=slurm nodes=1 ranks_per_node=2 ranks=2 gpus_per_node=0" in out, out[-3000:]
    assert re.search(r"^\+ \S*srun --mpi=pmi2 -n 2 ", out, re.M), out[-3000:]
    assert "2 rank(s) on cpu" in out, out[-3000:]
    check_resumed(sub, job, follow_up(sub, job))
    assert [s["world_size"] for s in sub.records("start")] == [2, 2]
    assert [s["stage"] for s in sub.records("switch")] == [2, 3]
    assert sub.records("end")[0]["stage"] == 3


@pytest.mark.slow
def test_time_limit_delivers_the_signal(slurm, tmp_path):
    """A real 2-minute limit with --signal=B:USR1@60: Slurm itself warns the
    batch shell. The follow-up runs under the template's own limit."""
    if os.environ.get("PRELORA_SLOW") != "1":
        pytest.skip("waits for a real Slurm time limit (about 3 minutes): set PRELORA_SLOW=1")
    sub = Submission(slurm, tmp_path, "time limit")
    # Longer than the limit on any machine, so the warning lands mid-run.
    job = sub.submit("--time=2", "--signal=B:USR1@60", train_args="run.epochs=24",
                     max_resubmits=1)
    info = sub.wait(job, START_S + 180, note="--time=2 --signal=B:USR1@60")
    assert info["ExitCode"] == "85:0", sub.explain(job)
    assert "walltime warning" in sub.output(job), sub.explain(job)
    check_resumed(sub, job, follow_up(sub, job))
