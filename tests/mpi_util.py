"""Launching real MPI ranks from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


def mpiexec() -> str:
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec is not on PATH (make test puts the venv's MPICH there)")
    return exe


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("DS_ACCELERATOR", "cpu")
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_mpi(args: list[str], np: int = 2, timeout: float = 300, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
    """``mpiexec -n np ARGS`` from the repository root; output captured as text."""
    cmd = [mpiexec(), "-n", str(np), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n"
                             f"{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def run_mpi_together(jobs: list[tuple[list[str], int]], timeout: float = 300
                     ) -> list[subprocess.CompletedProcess]:
    """Independent launches ``(ARGS, np)`` at the same time, each as ``run_mpi``
    runs and checks it; their results in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: run_mpi(job[0], np=job[1], timeout=timeout), jobs))


def train_cmd(out_dir, *overrides, config="configs/vit_tiny_cpu.yaml") -> list[str]:
    exe = shutil.which("prelora-train") or str(Path(sys.executable).parent / "prelora-train")
    return [exe, "--config", config, "--output-dir", str(out_dir), *overrides]


def script_cmd(name: str, *args) -> list[str]:
    return [sys.executable, str(SCRIPTS / name), *map(str, args)]
