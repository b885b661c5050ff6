"""The emulated cluster for the tests in this directory.

``emu_cluster`` starts two emulated nodes (tests/integration/cluster/cluster.sh: network
namespaces joined by a rate-capped switch) once per session and stops them
at the end, unless a cluster was up before the session (then it is someone's
and stays). Where it cannot run (not root, no network namespaces, or
PRELORA_CLUSTER=0) every test using it is skipped with the reason. What the
tests measured is printed in a "cluster" section of the terminal summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from summary import Section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CLUSTER_SH = HERE / "cluster.sh"
NSEXEC = HERE / "nsexec"
CANNOT_RUN = 77
NODES = 2
RATE = os.environ.get("PRELORA_CLUSTER_RATE", "1gbit")

#: The "cluster" section of the terminal summary, as the tests record it.
_summary = Section("cluster")

# Variables of an enclosing job or launch that must not reach the emulated job.
_FOREIGN = ("SLURM_", "PRELORA_", "PMI_", "PALS_", "OMPI_", "PBS_", "HYDRA_", "MPIR_",
            "CUDA_VISIBLE_DEVICES", "NCCL_", "FI_", "GLOO_", "MASTER_", "LOCAL_")


def _cluster(*args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@dataclass
class EmuCluster:
    """The running emulated cluster and how to run things on it."""

    hosts: list[str]
    rate: str
    summary: Section = field(default_factory=lambda: _summary)

    def env(self, **extra) -> dict:
        """A clean environment for a job on the cluster (nothing of an
        enclosing job), with this Python's environment first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = "1"
        # Hydra reaches the other nodes through nsexec instead of ssh.
        env["HYDRA_LAUNCHER"] = "ssh"
        env["HYDRA_LAUNCHER_EXEC"] = str(NSEXEC)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def on(self, node: str, *cmd) -> list[str]:
        """The argv that runs ``cmd`` on ``node``."""
        return ["bash", str(CLUSTER_SH), "exec", node, "--", *map(str, cmd)]

    def kill(self, node: str) -> None:
        r = _cluster("kill", node)
        assert r.returncode == 0, r.stdout + r.stderr

    def link_bytes(self, node: str) -> int:
        """Bytes sent plus received on ``node``'s link so far."""
        r = subprocess.run(self.on(node, "cat", "/sys/class/net/eth0/statistics/rx_bytes",
                                   "/sys/class/net/eth0/statistics/tx_bytes"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return sum(int(x) for x in r.stdout.split())


@pytest.fixture(scope="session")
def emu_cluster():
    if os.environ.get("PRELORA_CLUSTER") == "0":
        pytest.skip("emulated-cluster tests disabled (PRELORA_CLUSTER=0)")
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                           f"{os.environ.get('PATH', '')}")
    if mpiexec is None:
        pytest.skip("mpiexec is not installed (make test puts the venv's MPICH on PATH)")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "HYDRA" not in version:
        pytest.skip(f"{mpiexec} is not MPICH's Hydra, which the emulated cluster launches through")
    was_up = _cluster("status").returncode == 0
    r = _cluster("start", "--nodes", str(NODES), "--rate", RATE, timeout=600)
    if r.returncode == CANNOT_RUN:
        pytest.skip((r.stderr.strip().splitlines() or ["cluster.sh: cannot run here"])[-1])
    if r.returncode != 0:
        pytest.fail(f"tests/integration/cluster/cluster.sh start failed (exit {r.returncode}):\n"
                    f"{r.stdout}{r.stderr}", pytrace=False)
    hosts = _cluster("hosts").stdout.split()
    _summary["nodes"] = f"{len(hosts)} ({', '.join(hosts)}), links capped at {RATE} (tc tbf)"
    try:
        yield EmuCluster(hosts, RATE)
    finally:
        if not was_up:
            r = _cluster("stop")
            assert r.returncode == 0, f"tests/integration/cluster/cluster.sh stop failed:\n{r.stdout}{r.stderr}"

