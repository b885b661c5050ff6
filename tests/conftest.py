"""Shared fixtures.

Slurm: ``slurm_cluster`` starts a real single-node Slurm on this machine
(tests/slurm/cluster.sh) once per session and stops it at the end, unless it
was already up before the session (then it is someone's cluster and stays).
Where Slurm cannot run here (not root, no apt, packages not installable, or
PRELORA_SLURM=0) every test using it is skipped with the reason. The jobs the
tests saw are listed in a "Slurm jobs" section of the terminal summary, so
their ids and states show in a plain ``pytest -ra`` run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import summary
from summary import Section

CLUSTER_SH = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
#: cluster.sh's exit status for "cannot run on this machine".
CANNOT_RUN = 77

# Variables of an enclosing job or launch that must not reach sbatch: a test
# session started inside a real Slurm job would otherwise talk to that cluster.
_FOREIGN = ("SLURM_", "PRELORA_", "PMI_", "PALS_", "OMPI_", "PBS_")

#: The "Slurm jobs" section of the terminal summary.
_jobs_seen = Section("Slurm jobs")

# DeepSpeed's CPU communication op is built once, at install, into the venv
# (see the Makefile); a test run started without make uses that build too,
# and so does every process the tests start, instead of building it again.
_EXTENSIONS = Path(sys.prefix) / "torch_extensions"
if "TORCH_EXTENSIONS_DIR" not in os.environ and _EXTENSIONS.is_dir():
    os.environ["TORCH_EXTENSIONS_DIR"] = str(_EXTENSIONS)


@dataclass
class SlurmCluster:
    """The running cluster: where it lives and how to reach it."""

    dir: Path
    conf: Path
    jobs: Section = field(default_factory=lambda: _jobs_seen)

    def env(self, **extra) -> dict:
        """This process' environment for the Slurm commands, pointed at the cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def log_tail(self, name: str, lines: int = 20) -> str:
        p = self.dir / "log" / name
        if not p.exists():
            return f"({p} missing)"
        return f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def seen(self, line: str) -> None:
        """Record a job for the terminal summary."""
        self.jobs.append(line)


def _cluster(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("PRELORA_SLURM") == "0":
        pytest.skip("Slurm tests disabled (PRELORA_SLURM=0)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
    directory = Path(env.get("PRELORA_SLURM_DIR", "/tmp/prelora-slurm"))
    was_up = _cluster("status", env=env).returncode == 0
    r = _cluster("start", env=env)
    if r.returncode == CANNOT_RUN:
        reason = (r.stderr.strip().splitlines() or ["cluster.sh: cannot run here"])[-1]
        pytest.skip(reason)
    if r.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh start failed (exit {r.returncode}):\n"
                    f"{r.stdout}{r.stderr}", pytrace=False)
    yield SlurmCluster(directory, directory / "slurm.conf")
    if not was_up:
        r = _cluster("stop", env=env)
        assert r.returncode == 0, f"tests/slurm/cluster.sh stop failed:\n{r.stdout}{r.stderr}"


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """vit_tiny_cpu trained on 2 ranks to the end, uninterrupted: 16 steps,
    stage 2 from step 4 and stage 3 from step 6, a constant learning rate (so
    run.max_steps elsewhere does not change the schedule), a step record per
    step. Shared by the tests that only read it (resume, export)."""
    from mpi_util import run_mpi, train_cmd

    out = tmp_path_factory.mktemp("uninterrupted")
    run_mpi(train_cmd(out, "optim.schedule=constant", "logging.interval_steps=1"))
    return out


# Soak tests (tests/test_soak.py) report what they survived here, so the
# figure shows in a plain ``pytest -ra`` run.
_soak = Section("Soak")


@pytest.fixture
def soak_report() -> Section:
    """The "Soak" section of the terminal summary (``append(line)``)."""
    return _soak


# Sections of the terminal summary (tests/summary.py): every report carries
# the lines written while it was made, so that they reach the process that
# prints the summary, which under pytest-xdist is not the one that ran the test.
_sections: dict[str, dict[str, str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    item.user_properties.extend((summary.PROPERTY, entry) for entry in summary.take_pending())
    yield


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == summary.PROPERTY:
            section, key, line = value
            _sections.setdefault(section, {})[key] = line


def pytest_terminal_summary(terminalreporter):
    for section, lines in _sections.items():
        terminalreporter.write_sep("-", section)
        for line in lines.values():
            terminalreporter.write_line(line)
