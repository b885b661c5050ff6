"""scripts/scaling.sh: its syntax, a real local series of 1 and 2 ranks for
stage 1 and stage 3 (rows with exactly the keys prelora-report reads), the
jobs it writes for PBS and Slurm, and the launch lines prelora-launch builds
for it here and inside a (faked) PBS allocation.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_util import ROOT, env

SCALING = ROOT / "scripts" / "scaling.sh"
ROW_KEYS = ["stage", "scaling", "nodes", "gpus", "global_batch", "images_per_s",
            "images_per_s_per_gpu", "step_time_s", "allreduce_bytes_per_step",
            "peak_memory_bytes", "device"]
ROW_TYPES = {"stage": int, "scaling": str, "nodes": int, "gpus": int, "global_batch": int,
             "images_per_s": float, "images_per_s_per_gpu": float, "step_time_s": float,
             "allreduce_bytes_per_step": int, "peak_memory_bytes": int, "device": str}


def scaling(*args: str, extra_env: dict | None = None, timeout: float = 600):
    e = env()
    # Leaked scheduler variables would switch --in-job to the wrong launcher.
    e = {k: v for k, v in e.items() if not k.startswith(("PBS_", "SLURM_", "PRELORA_"))}
    e.update(extra_env or {})
    return subprocess.run(["bash", str(SCALING), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCALING)]).returncode == 0
    p = scaling("--help")
    assert p.returncode == 0 and "--local" in p.stdout and "--submit" in p.stdout
    p = scaling("--local", "--scalings", "sideways")
    assert p.returncode == 2 and "weak and/or strong" in p.stderr
    p = scaling("--in-job", "--per-gpu-batch", "4")
    assert p.returncode == 2 and "--in-job needs a PBS (PBS_NODEFILE) or Slurm" in p.stderr
    p = scaling("--local", "--preset", "no-such-preset", "--dry-run")
    assert p.returncode == 2 and "no-such-preset: no such preset" in p.stderr


def test_local_dry_run_prints_one_launch_line_per_point(tmp_path):
    """The preset's micro batch (toy: 4) from its YAML; one local
    prelora-launch line per (scaling, rank count)."""
    p = scaling("--local", "--dry-run", "--preset", "toy", "--max-ranks", "2",
                "--out", str(tmp_path / "rows"), extra_env={"PRELORA_MPIEXEC": "/opt/mpi/mpiexec"})
    assert p.returncode == 0, p.stderr
    lines = [shlex.split(line) for line in p.stdout.splitlines()]
    assert [(a[:3], a[a.index("--scaling-row") + 1]) for a in lines] == [
        (["/opt/mpi/mpiexec", "-n", str(n)], s) for n in (1, 2) for s in ("weak", "strong")]
    for a in lines:
        assert os.path.basename(a[3]) == "prelora-bench" and a[4:6] == ["--preset", "toy"]
    _, _, weak2, strong2 = lines
    assert "--micro-batch" in weak2 and weak2[weak2.index("--micro-batch") + 1] == "4"
    # Strong scaling keeps the 1-rank run's global batch.
    assert strong2[strong2.index("--global-batch") + 1] == "4"


@pytest.mark.mpi
def test_local_series_writes_exact_rows(tmp_path):
    if shutil.which("mpiexec") is None or shutil.which("prelora-bench") is None:
        pytest.skip("mpiexec or prelora-bench is not on PATH (make test puts the venv's bin first)")
    out = tmp_path / "rows"
    p = scaling("--local", "--max-ranks", "2", "--preset", "toy", "--out", str(out),
                "--steps", "1", "--warmup", "1", "--", "--no-checks")
    assert p.returncode == 0, p.stderr[-4000:]
    files = sorted(f.name for f in out.glob("*-n*.json") if not f.name.startswith("bench-"))
    assert files == sorted(f"{s}-{st}-n{n}.json" for s in ("weak", "strong")
                           for st in (1, 3) for n in (1, 2))
    for s in ("weak", "strong"):
        for st in (1, 3):
            for n in (1, 2):
                row = json.loads((out / f"{s}-{st}-n{n}.json").read_text())
                assert list(row) == ROW_KEYS
                for k, t in ROW_TYPES.items():
                    assert type(row[k]) is t, (k, row[k])
                assert (row["stage"], row["scaling"], row["gpus"], row["nodes"]) == (st, s, n, 1)
                # Weak: 4 images per rank; strong: the 1-rank run's 4 in all.
                assert row["global_batch"] == (4 * n if s == "weak" else 4)
                assert row["images_per_s"] > 0 and row["peak_memory_bytes"] > 0
                assert row["allreduce_bytes_per_step"] > 0
    # Stage 3 all-reduces less than stage 1, at every point.
    for s in ("weak", "strong"):
        for n in (1, 2):
            b1 = json.loads((out / f"{s}-1-n{n}.json").read_text())["allreduce_bytes_per_step"]
            b3 = json.loads((out / f"{s}-3-n{n}.json").read_text())["allreduce_bytes_per_step"]
            assert b3 < b1


def test_submit_dry_run_writes_one_job_per_node_count(tmp_path):
    out = tmp_path / "s"
    p = scaling("--submit", "pbs", "--dry-run", "--out", str(out), "--nodes", "2 16",
                "--account", "Proj", "--", "deepspeed.zero_stage=1")
    assert p.returncode == 0, p.stderr
    assert f"qsub {out}/jobs/scaling-n2.pbs" in p.stdout
    job2 = (out / "jobs" / "scaling-n2.pbs").read_text()
    job16 = (out / "jobs" / "scaling-n16.pbs").read_text()
    assert "#PBS -l select=2:system=polaris" in job2 and "#PBS -q debug\n" in job2
    assert "#PBS -l select=16:system=polaris" in job16 and "#PBS -q prod" in job16
    assert "#PBS -A Proj" in job2 and "module load conda" in job2
    # Strong scaling keeps the smallest run's global batch: 16 x 2 nodes x 4.
    assert "scripts/scaling.sh --in-job --preset vit-large" in job16
    assert "--global-batch 128" in job16 and "-- deepspeed.zero_stage=1" in job16

    p = scaling("--submit", "slurm", "--dry-run", "--out", str(out), "--nodes", "4",
                "--venv", "venvs/prelora")
    assert p.returncode == 0, p.stderr
    job = (out / "jobs" / "scaling-n4.sbatch").read_text()
    assert "#SBATCH --nodes=4" in job and "#SBATCH --ntasks-per-node=4" in job
    assert "source venvs/prelora/bin/activate" in job
    assert f"sbatch {out}/jobs/scaling-n4.sbatch" in p.stdout


def test_in_job_under_pbs_builds_the_launch_line(tmp_path):
    """A faked 2-node PBS job: mpiexec is a fake that records its arguments
    and writes the rows prelora-bench would."""
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x3006c0s13b0n0\nx3006c0s13b0n0\nx3006c0s19b1n0\n")
    log = tmp_path / "mpiexec.args"
    fake = tmp_path / "mpiexec"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
d = args[args.index("--json-row-dir") + 1]
s = args[args.index("--scaling-row") + 1]
n = int(args[args.index("-n") + 1])
os.makedirs(d, exist_ok=True)
for st in args[args.index("--stages") + 1].split(","):
    open(os.path.join(d, f"{{s}}-{{st}}-n{{n}}.json"), "w").write("{{}}")
""")
    fake.chmod(0o755)
    # Polaris' high-speed-network name of rank 0's node resolves there.
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "getent").write_text('#!/bin/sh\n[ "$2" = x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov ]'
                                    ' && echo "10.0.0.1 $2"\n')
    (fakebin / "getent").chmod(0o755)
    out = tmp_path / "rows"
    p = scaling("--in-job", "--preset", "vit-large", "--out", str(out), "--global-batch", "64",
                extra_env={"PBS_NODEFILE": str(nodefile), "PRELORA_MPIEXEC": str(fake),
                           "PRELORA_MPI_FLAVOUR": "pals", "PRELORA_BENCH": "prelora-bench",
                           "PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    weak, strong = (line.split() for line in lines)
    head = ["-n", "8", "--ppn", "4", "--depth=8", "--cpu-bind", "depth", "--envall", "--hostfile",
            str(nodefile), f"{ROOT}/scripts/gpu_affinity.sh"]
    for argv, scaling_row in ((weak, "weak"), (strong, "strong")):
        assert argv[:len(head)] == head and os.path.basename(argv[len(head)]) == "prelora-bench"
        assert argv[len(head) + 1:len(head) + 7] == ["--preset", "vit-large", "--stages", "1,3",
                                                     "--scaling-row", scaling_row]
    assert weak[weak.index("--micro-batch") + 1] == "16"
    assert strong[strong.index("--global-batch") + 1] == "64"
    assert "master_addr=x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov" in p.stderr
    assert sorted(os.listdir(out)) == sorted(
        ["logs"] + [f"{s}-{st}-n8.json" for s in ("weak", "strong") for st in (1, 3)])
