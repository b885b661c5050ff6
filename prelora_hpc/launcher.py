"""``prelora-launch``: the scheduler's environment turned into one launch line
for any program (``prelora-train``, ``prelora-bench``, ``prelora-convert``...).

    prelora-launch [options] [--] PROGRAM [ARGS...]
    prelora-launch [options] [--] CONFIG.yaml [prelora-train args...]

This is launch code: with ``launch.py`` the only module that reads scheduler
and MPI environment variables. It runs before any rank exists, so it imports
neither mpi4py nor torch. The decisions are pure functions of an environment
dict and a :class:`Probes` (the commands and look-ups they need), testable
without a scheduler:

- :func:`detect_allocation`: where we are (PBS, Slurm or a workstation), the
  nodes, the GPUs per node, which mpiexec and which MPI it belongs to;
- :func:`resolve_layout`: ranks per node, ranks, CPUs per rank, stop margin;
- :func:`launch_env`: what the ranks get exported (rendezvous address,
  TMPDIR, NCCL/libfabric settings and the aws-ofi-nccl plugin, Hydra's
  remote-shell watch) and warnings;
- :func:`launch_line`: the argv of mpiexec or srun around the program;
- :func:`seconds_left`: the job's walltime left, for the stop timer.

:func:`main` prints the line (``--dry-run``, ``--print``) or runs it and
returns the program's exit status (85: stopped on a walltime signal after a
checkpoint, resubmit; 130: interrupted), 2 on a usage error.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

#: The address rank 0 offers for the rendezvous; read by launch.py.
MASTER_ADDR_VAR = "PRELORA_MASTER_ADDR"
#: Polaris' high-speed-network name suffix (the management interface is much
#: slower): PBS' default for PRELORA_HSN_SUFFIX.
POLARIS_HSN_SUFFIX = ".hsn.cm.polaris.alcf.anl.gov"
#: What an mpiexec can be under PBS.
MPI_FLAVOURS = ("pals", "hydra", "openmpi")
#: gpu_affinity.sh (one GPU per rank, set before CUDA initialises) and
#: node_watch.sh (Hydra's remote shell that names a lost node).
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
#: PBS ranks per node when the node shows no GPU.
PBS_DEFAULT_PPN = 4
#: PALS' CPUs per rank: 16 of a Polaris node's 64 hardware threads, room for
#: the reference config's 8 DataLoader workers (ALCF's example pairs
#: --depth=16 with 8 workers).
PALS_DEFAULT_DEPTH = 16
#: Seconds before the PBS walltime at which the ranks get SIGTERM; PBS has no
#: early warning of its own (Slurm jobs use #SBATCH --signal).
PBS_DEFAULT_STOP_BEFORE_S = 300
#: Ranks on a workstation when neither --np nor NP says.
LOCAL_DEFAULT_NP = 2
#: NCCL over Slingshot through the aws-ofi-nccl plugin (PBS with GPUs).
NCCL_SETTINGS = (("NCCL_NET_GDR_LEVEL", "PHB"), ("NCCL_CROSS_NIC", "1"),
                 ("NCCL_COLLNET_ENABLE", "1"), ("NCCL_NET", "AWS Libfabric"))
#: libfabric settings kept even with --no-nccl-env.
FI_SETTINGS = (("FI_CXI_DISABLE_HOST_REGISTER", "1"), ("FI_MR_CACHE_MONITOR", "userfaultfd"),
               ("FI_CXI_DEFAULT_CQ_SIZE", "131072"))
#: Variables Open MPI is told to pass on (it passes only those), before the
#: ones this launch sets.
OPENMPI_FORWARDED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "DS_ACCELERATOR")
#: Where Polaris installs the aws-ofi-nccl plugin, one directory a version.
OFI_NCCL_GLOB = "/soft/libraries/aws-ofi-nccl/*/lib"

USAGE = """\
usage: prelora-launch [options] [--] PROGRAM [ARGS...]
       prelora-launch [options] [--] CONFIG.yaml [prelora-train args...]
       prelora-launch [options] --layout

Start PROGRAM on every rank of the allocation it runs in (PBS, Slurm, or
this machine): one mpiexec or srun line, one rank per GPU. A YAML config in
PROGRAM's place means `prelora-train --config CONFIG ...` (scripts/launch.sh
and the job templates use that form). The exit status is PROGRAM's (through
the launcher): 0 finished, 85 stopped on a walltime signal after
checkpointing (resubmit), 130 interrupted; 2 is a usage error here.

  prelora-launch -- prelora-train --config configs/quickstart.yaml
  prelora-launch --dry-run -- prelora-bench --preset vit-large
  prelora-launch --np 4 -- prelora-convert --help

options:
  --dry-run             print the command (and comment lines describing the
                        layout, the exported variables and warnings) instead
                        of running it
  --print               print only the command, one line, instead of running it
  --layout              print the layout (scheduler=... nodes=... ranks=...)
                        as one line and exit; no PROGRAM
  --local               launch on this machine as on a workstation, even
                        inside a PBS or Slurm job
  --np N                total ranks (default: nodes x ranks per node under a
                        scheduler; $NP or 2 on a workstation)
  --ppn N               ranks per node (default: PBS: the GPUs nvidia-smi
                        lists, else 4; Slurm: SLURM_NTASKS_PER_NODE, else
                        GPUs per node, else 1)
  --depth D             CPUs per rank (PBS: mpiexec --depth under PALS,
                        default 16; -bind-to core:D under Hydra, PE=D under
                        Open MPI, no binding by default; Slurm: srun -c,
                        default SLURM_CPUS_PER_TASK). For prelora-train a
                        depth not above the config's data.num_workers gets a
                        warning: the DataLoader workers then share the rank's
                        cores.
  --launcher L          mpiexec or srun (Slurm default: srun; elsewhere
                        mpiexec, the only choice)
  --no-nccl-env         PBS with GPUs: do not export the four NCCL_* settings
                        for Slingshot, and unset them if the environment
                        already has them (some DeepSpeed workloads hang with
                        them); the FI_* libfabric settings stay
  --stop-before S       signal the ranks (SIGTERM) S seconds before the job's
                        walltime ends, so the trainer checkpoints and exits 85
                        in time (default 300 under PBS, which has no early
                        warning of its own; 0 elsewhere: Slurm jobs use
                        #SBATCH --signal). 0 disables it.
  -h, --help            show this help

Where it runs decides the line, and under PBS also which MPI's mpiexec it
is (`mpiexec --version`; PRELORA_MPI_FLAVOUR overrides; one that names no
MPI gets the Cray PALS options, with a warning):
  PBS, Cray PALS (Polaris): mpiexec -n NODES*PPN --ppn PPN --depth=D
      --cpu-bind depth --envall --hostfile $PBS_NODEFILE
      scripts/gpu_affinity.sh PROGRAM ...
  PBS, MPICH Hydra: mpiexec -n N -ppn PPN -hosts H1,H2,... [-bind-to core:D]
      -envall scripts/gpu_affinity.sh PROGRAM ...   (each host once: the
      node file repeats a host per slot); on several hosts Hydra's remote
      shell goes through scripts/node_watch.sh, which names a node the job
      lost
  PBS, Open MPI: mpiexec -n N --map-by ppr:PPN:node[:PE=D] --bind-to
      core|none --hostfile $PBS_NODEFILE -x VAR... scripts/gpu_affinity.sh ...
  Slurm (SLURM_JOB_ID set): srun --mpi=pmi2 -n N --ntasks-per-node PPN
      --cpu-bind=cores [-c D] [--gpus-per-task=1 --gpu-bind=none]
      PROGRAM ...   (or mpiexec -n N --ppn PPN with --launcher mpiexec)
  Otherwise: mpiexec -n NP PROGRAM ...

Environment read here:
  PRELORA_HSN_SUFFIX    appended to rank 0's short host name to form
                        PRELORA_MASTER_ADDR, the address of the rendezvous;
                        default under PBS ".hsn.cm.polaris.alcf.anl.gov"
                        (Polaris' high-speed network), empty elsewhere. Set
                        it empty to use the name as the node file or Slurm
                        lists it. Under PBS the suffixed name is used only
                        where it resolves; otherwise the node's own name.
  PRELORA_MASTER_ADDR   left alone when already set
  PRELORA_MPI_FLAVOUR   pals, hydra or openmpi: what mpiexec is, when
                        `mpiexec --version` cannot tell (or to override it)
  PRELORA_OFI_NCCL_DIR  (PBS with GPUs) the aws-ofi-nccl plugin's lib
                        directory, put first on LD_LIBRARY_PATH; default:
                        the newest /soft/libraries/aws-ofi-nccl/*/lib if the
                        plugin is not on LD_LIBRARY_PATH already.
                        NCCL_NET="AWS Libfabric" fails to initialise without
                        it: a launch that finds none says so.
  PRELORA_TMPDIR        (PBS) TMPDIR for the ranks (default /tmp: PBS'
                        per-job directory makes DataLoader socket paths too
                        long, "AF_UNIX path too long")
  PRELORA_MPIEXEC       the mpiexec to use (default: the one installed next
                        to PROGRAM, e.g. PyPI's MPICH in a venv, else the
                        first on PATH, e.g. Cray PALS on Polaris)
  PRELORA_SRUN_MPI      srun's --mpi plugin (default pmi2; empty: the site's
                        default, e.g. cray_shasta on Perlmutter)
  NP                    ranks on a workstation when --np is not given
"""


class UsageError(Exception):
    """A wrong option, value or environment: one line, exit status 2."""


# --------------------------------------------------------------------------- #
# What the decisions need from the machine, replaceable in tests.


def _run_text(argv: Sequence[str], timeout: float = 20.0) -> Optional[str]:
    """stdout and stderr of ``argv`` together; None when it cannot start."""
    try:
        p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout


def _run_ok(argv: Sequence[str], timeout: float = 30.0) -> Optional[str]:
    """stdout of ``argv`` when it succeeds, else None."""
    try:
        p = subprocess.run(list(argv), capture_output=True, stdin=subprocess.DEVNULL,
                           text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _resolves(name: str) -> bool:
    getent = shutil.which("getent")
    if getent:
        return _run_ok([getent, "hosts", name]) is not None
    try:
        socket.gethostbyname(name)
    except OSError:
        return False
    return True


@dataclass
class Probes:
    """The commands and look-ups of a launch decision.

    ``which(name, path)`` finds a command on a PATH string; ``output(argv)``
    is a command's stdout+stderr (None: it could not start); ``ok(argv)`` its
    stdout when it exits 0 (None otherwise); ``resolves(name)``: the host
    name resolves here; ``glob(pattern)``; ``hostname()``; ``now()`` in
    seconds since the epoch.
    """

    which: Callable[[str, Optional[str]], Optional[str]] = \
        lambda name, path: shutil.which(name, path=path)
    output: Callable[[Sequence[str]], Optional[str]] = _run_text
    ok: Callable[[Sequence[str]], Optional[str]] = _run_ok
    resolves: Callable[[str], bool] = _resolves
    glob: Callable[[str], list[str]] = glob.glob
    hostname: Callable[[], str] = socket.gethostname
    now: Callable[[], float] = time.time
    realpath: Callable[[str], str] = os.path.realpath


# --------------------------------------------------------------------------- #
# Options.


@dataclass
class Options:
    """prelora-launch's options (None: the allocation's default)."""

    dry_run: bool = False
    print_only: bool = False
    layout_only: bool = False
    local: bool = False
    np: Optional[int] = None
    ppn: Optional[int] = None
    depth: Optional[int] = None
    launcher: Optional[str] = None
    nccl_env: bool = True
    stop_before: Optional[int] = None
    help: bool = False

    @property
    def shows_only(self) -> bool:
        """The line is printed, never run."""
        return self.dry_run or self.print_only or self.layout_only


_VALUE_OPTIONS = {"--np": "np", "--ppn": "ppn", "--depth": "depth", "--launcher": "launcher",
                  "--stop-before": "stop_before"}
_FLAG_OPTIONS = {"--dry-run": ("dry_run", True), "--print": ("print_only", True),
                 "--layout": ("layout_only", True), "--local": ("local", True),
                 "--no-nccl-env": ("nccl_env", False), "-h": ("help", True),
                 "--help": ("help", True)}


def _whole(option: str, text: str, positive: bool) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise UsageError(f"{option} must be a whole number, got '{text}'")
    value = int(text)
    if positive and value == 0:
        raise UsageError(f"{option} must be > 0")
    return value


def parse_args(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """Options and the program's argv (a leading CONFIG.yaml/.yml becomes
    ``prelora-train --config CONFIG``). Options end at ``--`` or at the first
    word that is not one. Raises :class:`UsageError`."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, inline = a.partition("=")
        if a == "--":
            i += 1
            break
        if a in _FLAG_OPTIONS:
            key, value = _FLAG_OPTIONS[a]
            setattr(opts, key, value)
        elif name in _VALUE_OPTIONS:
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise UsageError(f"{name} needs a value")
            key = _VALUE_OPTIONS[name]
            if key == "launcher":
                if value not in ("mpiexec", "srun"):
                    raise UsageError(f"--launcher must be mpiexec or srun, got '{value}'")
                opts.launcher = value
            else:
                setattr(opts, key, _whole(name, value, positive=key != "stop_before"))
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a} (see --help)")
        else:
            break
        i += 1
    program = args[i:]
    if opts.help or opts.layout_only:
        return opts, program
    if not program:
        raise UsageError("missing PROGRAM (usage: prelora-launch [options] -- PROGRAM [ARGS...];"
                         " see --help)")
    if program[0].endswith((".yaml", ".yml")):
        program = ["prelora-train", "--config", *program]
    return opts, program


def config_of(program_argv: Sequence[str]) -> Optional[str]:
    """The ``--config`` path of a prelora-train command line, else None."""
    words = list(program_argv)
    name = os.path.basename(words[0]) if words else ""
    if name == "prelora" and words[1:2] == ["train"]:
        words = words[1:]
    elif name != "prelora-train":
        return None
    for i, w in enumerate(words):
        if w == "--config" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--config="):
            return w.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- #
# Where we are.


@dataclass
class Allocation:
    """The nodes of the job and the launchers found for them."""

    scheduler: str
    """"pbs", "slurm" or "local"."""
    hosts: list[str]
    """Each node once, in the scheduler's order; rank 0 runs on hosts[0]."""
    nnodes: int
    gpus_per_node: int
    mpiexec: str
    mpi: Optional[str] = None
    """PBS: "pals", "hydra" or "openmpi"; None elsewhere (not asked)."""
    srun: str = "srun"
    nodefile: Optional[str] = None
    job_id: Optional[str] = None
    ntasks_per_node: Optional[int] = None
    """Slurm's SLURM_NTASKS_PER_NODE."""
    cpus_per_task: Optional[int] = None
    """Slurm's SLURM_CPUS_PER_TASK."""
    local_np: Optional[str] = None
    """A workstation's $NP, as written."""
    warnings: list[str] = field(default_factory=list)


def _uint(text: Optional[str]) -> Optional[int]:
    return int(text) if text is not None and re.fullmatch(r"[0-9]+", text) else None


def count_gpus(env: dict, probes: Probes) -> int:
    """The GPUs nvidia-smi lists on this node (0 without nvidia-smi)."""
    smi = probes.which("nvidia-smi", env.get("PATH"))
    if not smi:
        return 0
    text = probes.output([smi, "-L"]) or ""
    return sum(1 for line in text.splitlines() if line.startswith("GPU "))


def find_program(program: str, env: dict, probes: Probes) -> Optional[str]:
    """The program's path (a name is looked up on PATH); None: not found."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    return probes.which(program, env.get("PATH"))


def find_mpiexec(program_path: Optional[str], env: dict, probes: Probes) -> str:
    """PRELORA_MPIEXEC, else the mpiexec beside the program (it belongs to the
    MPI its mpi4py was built with, e.g. PyPI's MPICH in a venv), else the
    first on PATH (the site's)."""
    if env.get("PRELORA_MPIEXEC"):
        return env["PRELORA_MPIEXEC"]
    if program_path:
        beside = os.path.join(os.path.dirname(program_path), "mpiexec")
        if os.access(beside, os.X_OK):
            return beside
    return probes.which("mpiexec", env.get("PATH")) or "mpiexec"


def mpi_flavour(mpiexec: str, env: dict, probes: Probes) -> Optional[str]:
    """Which MPI ``mpiexec`` belongs to: "pals" (Cray PALS), "hydra" (MPICH,
    Intel MPI) or "openmpi"; None when it does not say. PRELORA_MPI_FLAVOUR
    overrides (anything else there is a :class:`UsageError`)."""
    forced = env.get("PRELORA_MPI_FLAVOUR")
    if forced:
        if forced not in MPI_FLAVOURS:
            raise UsageError(f"PRELORA_MPI_FLAVOUR must be pals, hydra or openmpi, got '{forced}'")
        return forced
    version = "\n".join((probes.output([mpiexec, "--version"]) or "").splitlines()[:20])
    path = probes.realpath(probes.which(mpiexec, env.get("PATH")) or mpiexec)
    if "HYDRA" in version or "Intel(R) MPI" in version:
        return "hydra"
    if "Open MPI" in version or "OpenRTE" in version or "open-mpi" in version:
        return "openmpi"
    if "PALS" in version or "pals" in version or "/pals/" in path:
        return "pals"
    return None


def _unique_hosts(text: str) -> list[str]:
    hosts: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] not in hosts:
            hosts.append(words[0])
    return hosts


def detect_allocation(env: dict, probes: Optional[Probes] = None,
                      program_path: Optional[str] = None, local: bool = False) -> Allocation:
    """Where this launch runs, from ``env`` (the environment as a dict).

    PBS when PBS_NODEFILE is set (the node file lists a host once per MPI
    slot; each is kept once, in order), else Slurm when SLURM_JOB_ID is set
    (hosts from ``scontrol show hostnames``), else this machine; ``local``
    forces the last. Under PBS the mpiexec's MPI is detected; one that names
    none is taken for Cray PALS with a warning. Raises :class:`UsageError`.
    """
    probes = probes or Probes()
    mpiexec = find_mpiexec(program_path, env, probes)
    if env.get("PBS_NODEFILE") and not local:
        nodefile = env["PBS_NODEFILE"]
        try:
            hosts = _unique_hosts(Path(nodefile).read_text())
        except OSError:
            raise UsageError(f"PBS_NODEFILE={nodefile} is not readable") from None
        if not hosts:
            raise UsageError(f"PBS_NODEFILE={nodefile} lists no hosts")
        alloc = Allocation("pbs", hosts, len(hosts), count_gpus(env, probes), mpiexec,
                           nodefile=nodefile, job_id=env.get("PBS_JOBID") or None)
        alloc.mpi = mpi_flavour(mpiexec, env, probes)
        if alloc.mpi is None:
            # A PBS site whose mpiexec names no MPI is most likely Cray's.
            alloc.warnings.append(
                f"'{mpiexec} --version' names none of Cray PALS, MPICH Hydra, Open MPI: using "
                "Cray PALS options (set PRELORA_MPI_FLAVOUR=pals|hydra|openmpi)")
            alloc.mpi = "pals"
        return alloc
    if env.get("SLURM_JOB_ID") and not local:
        hosts = []
        scontrol = probes.which("scontrol", env.get("PATH"))
        if scontrol and env.get("SLURM_JOB_NODELIST"):
            hosts = _unique_hosts(probes.ok([scontrol, "show", "hostnames",
                                             env["SLURM_JOB_NODELIST"]]) or "")
        hosts = hosts or [probes.hostname()]
        nnodes = _uint(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or len(hosts)
        # Slurm's view of the GPUs it gave the job wins over what the node has.
        gpus = env.get("SLURM_GPUS_ON_NODE")
        ngpu = (_uint(gpus) or 0) if gpus is not None else count_gpus(env, probes)
        return Allocation("slurm", hosts, nnodes, ngpu, mpiexec,
                          srun=probes.which("srun", env.get("PATH")) or "srun",
                          job_id=env["SLURM_JOB_ID"],
                          ntasks_per_node=_uint(env.get("SLURM_NTASKS_PER_NODE")),
                          cpus_per_task=_uint(env.get("SLURM_CPUS_PER_TASK")))
    return Allocation("local", [probes.hostname()], 1, count_gpus(env, probes), mpiexec,
                      local_np=env.get("NP") or None)


# --------------------------------------------------------------------------- #
# The layout, the environment and the line.


@dataclass
class Layout:
    """Ranks and binding of one launch."""

    launcher: str
    """"mpiexec" or "srun"."""
    ranks_per_node: int
    ranks: int
    depth: Optional[int]
    """CPUs per rank; None: the launcher's default binding."""
    stop_before: int
    """Seconds before the walltime at which the ranks get SIGTERM; 0: never."""


def resolve_layout(alloc: Allocation, opts: Options) -> Layout:
    """The options with the allocation's defaults filled in (the defaults are
    listed in :data:`USAGE`). Raises :class:`UsageError`."""
    launcher = opts.launcher or ("srun" if alloc.scheduler == "slurm" else "mpiexec")
    if launcher == "srun" and alloc.scheduler != "slurm":
        raise UsageError("--launcher srun needs a Slurm job")
    if alloc.scheduler == "pbs":
        ppn = opts.ppn or alloc.gpus_per_node or PBS_DEFAULT_PPN
        depth = opts.depth or (PALS_DEFAULT_DEPTH if alloc.mpi == "pals" else None)
        stop = PBS_DEFAULT_STOP_BEFORE_S
    elif alloc.scheduler == "slurm":
        ppn = opts.ppn or alloc.ntasks_per_node or alloc.gpus_per_node or 1
        depth = opts.depth or alloc.cpus_per_task
        stop = 0
    else:
        np = opts.np
        if np is None:
            np = _uint(alloc.local_np) if alloc.local_np is not None else LOCAL_DEFAULT_NP
            if not np:
                raise UsageError(f"NP must be a whole number > 0, got '{alloc.local_np}'")
        return Layout(launcher, np, np, opts.depth,
                      opts.stop_before if opts.stop_before is not None else 0)
    return Layout(launcher, ppn, opts.np or alloc.nnodes * ppn, depth,
                  opts.stop_before if opts.stop_before is not None else stop)


@dataclass
class LaunchEnv:
    """What the ranks' environment gets: ``set`` (exported, in order) and
    ``unset`` (removed), with the warnings of these choices and the
    aws-ofi-nccl plugin found ("missing"; None: not needed)."""

    set: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ofi_nccl: Optional[str] = None

    def apply(self, env: dict) -> dict:
        """``env`` with these changes."""
        out = {k: v for k, v in env.items() if k not in self.unset}
        out.update(self.set)
        return out


def _master_addr(alloc: Allocation, env: dict, probes: Probes, out: LaunchEnv) -> None:
    if env.get(MASTER_ADDR_VAR) or not alloc.hosts:
        return
    first = alloc.hosts[0]
    short = first.split(".", 1)[0]
    if alloc.scheduler == "pbs":
        # Over the high-speed network where the node has one under that name
        # (Polaris); elsewhere over the node's own name.
        suffix = env.get("PRELORA_HSN_SUFFIX", POLARIS_HSN_SUFFIX)
        master = first
        if suffix:
            if probes.resolves(short + suffix):
                master = short + suffix
            else:
                out.warnings.append(f"{short}{suffix} does not resolve here: "
                                    f"the rendezvous uses {first}")
        out.set[MASTER_ADDR_VAR] = master
    else:
        suffix = env.get("PRELORA_HSN_SUFFIX", "")
        out.set[MASTER_ADDR_VAR] = short + suffix if suffix else first


def _ofi_nccl_plugin(env: dict, probes: Probes, out: LaunchEnv) -> None:
    """NCCL loads the aws-ofi-nccl plugin (libnccl-net*.so) from
    LD_LIBRARY_PATH and fails to initialise without it when NCCL_NET names it."""
    ld_path = env.get("LD_LIBRARY_PATH", "")

    def has_plugin(d: str) -> bool:
        return bool(d) and bool(probes.glob(os.path.join(d, "libnccl-net*.so*")))

    given = env.get("PRELORA_OFI_NCCL_DIR", "")
    plugin = given
    if not plugin:
        plugin = next((d for d in ld_path.split(":") if has_plugin(d)), "")
    if not plugin:
        found = sorted(probes.glob(OFI_NCCL_GLOB), key=_version_key)
        plugin = found[-1] if found else ""
    if plugin and has_plugin(plugin):
        if plugin not in ld_path.split(":"):
            out.set["LD_LIBRARY_PATH"] = f"{plugin}:{ld_path}" if ld_path else plugin
        out.ofi_nccl = plugin
        return
    out.ofi_nccl = "missing"
    where = f"in {given} " if given else ""
    out.warnings.append(
        f'NCCL_NET="AWS Libfabric" but no aws-ofi-nccl plugin (libnccl-net*.so) {where}on '
        "LD_LIBRARY_PATH: NCCL will fail to initialise; set PRELORA_OFI_NCCL_DIR to the plugin's "
        "lib directory, or --no-nccl-env")


def _version_key(path: str) -> list:
    """A sort key ordering 1.9 before 1.10, as ``sort -V``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path)]


def launch_env(alloc: Allocation, opts: Options, env: dict, probes: Optional[Probes] = None,
               scripts_dir: Path = SCRIPTS_DIR) -> LaunchEnv:
    """The variables exported to (or removed from) the ranks' environment.

    Values already in ``env`` are kept (a conda module's NCCL settings, a
    given PRELORA_MASTER_ADDR). PBS: the rendezvous address, TMPDIR, with
    GPUs the NCCL/libfabric settings and the aws-ofi-nccl plugin, under
    Hydra on several hosts its remote shell wrapped by node_watch.sh. Slurm:
    the rendezvous address. A workstation: nothing.
    """
    probes = probes or Probes()
    out = LaunchEnv()
    if alloc.scheduler == "local":
        return out
    _master_addr(alloc, env, probes, out)
    if alloc.scheduler != "pbs":
        return out
    # DataLoader workers make AF_UNIX sockets under TMPDIR; PBS' per-job
    # directory makes their paths too long.
    out.set["TMPDIR"] = env.get("PRELORA_TMPDIR") or "/tmp"
    if alloc.gpus_per_node > 0:
        if opts.nccl_env:
            for name, default in NCCL_SETTINGS:
                out.set[name] = env.get(name) or default
        else:
            out.unset.extend(name for name, _ in NCCL_SETTINGS)
        for name, default in FI_SETTINGS:
            out.set[name] = env.get(name) or default
        if opts.nccl_env and out.set["NCCL_NET"] == "AWS Libfabric":
            _ofi_nccl_plugin(env, probes, out)
    watch = str(scripts_dir / "node_watch.sh")
    shell = env.get("HYDRA_LAUNCHER") or "ssh"
    # Hydra reaches the other hosts through a remote shell; node_watch.sh
    # runs it and names a node whose proxy dies, which Hydra does not.
    if (alloc.mpi == "hydra" and alloc.nnodes > 1 and shell in ("ssh", "rsh")
            and env.get("HYDRA_LAUNCHER_EXEC") != watch):
        ppn = resolve_layout(alloc, opts).ranks_per_node
        out.set["PRELORA_REMOTE_SHELL"] = env.get("HYDRA_LAUNCHER_EXEC") or shell
        out.set["PRELORA_JOB_HOSTS"] = " ".join(alloc.hosts)
        out.set["PRELORA_JOB_PPN"] = str(ppn)
        out.set["HYDRA_LAUNCHER"] = shell
        out.set["HYDRA_LAUNCHER_EXEC"] = watch
    return out


def launch_line(alloc: Allocation, opts: Options, program_argv: Sequence[str],
                env: Optional[dict] = None, exported: Sequence[str] = (),
                scripts_dir: Path = SCRIPTS_DIR) -> list[str]:
    """The argv that starts ``program_argv`` on every rank.

    Under PBS the program runs behind scripts/gpu_affinity.sh, which sets
    the rank's CUDA_VISIBLE_DEVICES before CUDA initialises. ``env`` is the
    ranks' environment (srun's --mpi plugin comes from PRELORA_SRUN_MPI in
    it) and ``exported`` the names this launch sets: Open MPI passes on just
    the variables it is told to.
    """
    layout = resolve_layout(alloc, opts)
    n, ppn, depth = str(layout.ranks), str(layout.ranks_per_node), layout.depth
    program = list(program_argv)
    if alloc.scheduler == "pbs":
        cmd = [alloc.mpiexec, "-n", n]
        if alloc.mpi == "pals":
            cmd += ["--ppn", ppn, f"--depth={depth}", "--cpu-bind", "depth", "--envall",
                    "--hostfile", alloc.nodefile]
        elif alloc.mpi == "hydra":
            cmd += ["-ppn", ppn, "-hosts", ",".join(alloc.hosts)]
            cmd += ["-bind-to", f"core:{depth}"] if depth else []
            cmd += ["-envall"]
        else:
            cmd += (["--map-by", f"ppr:{ppn}:node:PE={depth}", "--bind-to", "core"] if depth
                    else ["--map-by", f"ppr:{ppn}:node", "--bind-to", "none"])
            cmd += ["--hostfile", alloc.nodefile]
            names = dict.fromkeys([*OPENMPI_FORWARDED, *exported])
            for name in names:
                if name in (env or {}) or name in exported:
                    cmd += ["-x", name]
        return cmd + [str(scripts_dir / "gpu_affinity.sh"), *program]
    if alloc.scheduler == "slurm":
        if layout.launcher == "mpiexec":
            # Hydra (MPICH) finds the allocation itself and starts its
            # proxies through srun.
            return [alloc.mpiexec, "-n", n, "--ppn", ppn, *program]
        cmd = [alloc.srun]
        mpi = (env or {}).get("PRELORA_SRUN_MPI", "pmi2")
        cmd += [f"--mpi={mpi}"] if mpi else []
        cmd += ["-n", n, "--ntasks-per-node", ppn, "--cpu-bind=cores"]
        # srun no longer inherits --cpus-per-task from the job (Slurm 22.05+).
        cmd += ["-c", str(depth)] if depth else []
        # One GPU per task for Slurm's bookkeeping, but every task sees all of
        # the node's GPUs so NCCL can use NVLink between them; the trainer
        # picks its device from its local rank.
        if 0 < layout.ranks_per_node <= alloc.gpus_per_node:
            cmd += ["--gpus-per-task=1", "--gpu-bind=none"]
        return cmd + program
    return [alloc.mpiexec, "-n", n, *program]


def describe(alloc: Allocation, opts: Options, lenv: LaunchEnv, env: dict) -> str:
    """The layout as one line of key=value words (no stop timer)."""
    layout = resolve_layout(alloc, opts)
    if alloc.scheduler == "pbs":
        d = layout.depth
        binding = {"pals": f"depth:{d}"}.get(alloc.mpi, f"core:{d}" if d else "none")
        nccl = ("on" if opts.nccl_env else "off") if alloc.gpus_per_node > 0 else "n/a"
        where = f"mpi={alloc.mpi} binding={binding} nccl_env={nccl}"
        where += f" ofi_nccl={lenv.ofi_nccl}" if lenv.ofi_nccl else ""
    elif alloc.scheduler == "slurm" and layout.launcher == "srun":
        where = f"binding=cores{f':{layout.depth}' if layout.depth else ''}"
    elif alloc.scheduler == "slurm":
        where = "binding=launcher-default"
    else:
        where = "binding=none"
    master = lenv.set.get(MASTER_ADDR_VAR) or env.get(MASTER_ADDR_VAR) or "auto"
    return (f"scheduler={alloc.scheduler} nodes={alloc.nnodes} "
            f"ranks_per_node={layout.ranks_per_node} ranks={layout.ranks} "
            f"gpus_per_node={alloc.gpus_per_node} {where} master_addr={master}")


def depth_warning(depth: Optional[int], program_argv: Sequence[str]) -> Optional[str]:
    """A warning when prelora-train's DataLoader workers (its config's
    data.num_workers, after its section.key=value overrides) would share a
    rank's ``depth`` CPUs with it; None when fine or unknown."""
    config = config_of(program_argv)
    if not depth or not config or not os.path.isfile(config):
        return None
    from .config import ConfigError, load_config

    overrides = [a for a in program_argv if a.startswith("data.num_workers=")]
    try:
        workers = load_config(config, overrides).data.num_workers
    except (ConfigError, OSError, ValueError):
        return None
    if depth > workers:
        return None
    return (f"--depth {depth} is not above data.num_workers={workers}: each rank's DataLoader "
            f"workers share its {depth} core(s) with it (use a depth of at least {workers + 1})")


# --------------------------------------------------------------------------- #
# The stop timer.


def parse_duration(text: str) -> Optional[int]:
    """Seconds in "HH:MM:SS", "MM:SS", "D-HH:MM:SS" or "SS"; None if not one."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(?:(\d+):)?(\d+):)?(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _qstat_field(info: str, key: str) -> Optional[str]:
    for line in info.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep and name == key:
            return value.strip()
    return None


def seconds_left(alloc: Allocation, env: dict, probes: Optional[Probes] = None) -> Optional[int]:
    """Seconds before the scheduler ends this job; None if unknown.

    PBS: ``qstat -f`` walltime less the time since the job's start (its
    resources_used counter lags by MoM's update interval, so it is only the
    fallback); Slurm: ``squeue -o %L``.
    """
    probes = probes or Probes()
    if alloc.scheduler == "pbs":
        qstat = probes.which("qstat", env.get("PATH"))
        if not qstat or not alloc.job_id:
            return None
        info = probes.ok([qstat, "-f", alloc.job_id])
        walltime = parse_duration(_qstat_field(info or "", "Resource_List.walltime") or "")
        if walltime is None:
            return None
        elapsed = None
        stime = _qstat_field(info, "stime")
        if stime:
            try:
                started = time.mktime(time.strptime(" ".join(stime.split()),
                                                    "%a %b %d %H:%M:%S %Y"))
                elapsed = int(probes.now() - started)
            except ValueError:
                pass
        if elapsed is None:
            elapsed = parse_duration(_qstat_field(info, "resources_used.walltime") or "") or 0
        return walltime - elapsed
    if alloc.scheduler == "slurm":
        squeue = probes.which("squeue", env.get("PATH"))
        if not squeue:
            return None
        return parse_duration(probes.ok([squeue, "-h", "-j", alloc.job_id, "-o", "%L"]) or "")
    return None


def stop_timer(alloc: Allocation, layout: Layout, env: dict,
               probes: Optional[Probes] = None) -> tuple[Optional[int], str]:
    """Seconds from now to the ranks' SIGTERM (None: no timer) and the
    layout line's note about it."""
    if layout.stop_before <= 0 or alloc.scheduler == "local":
        return None, "stop_before=off"
    left = seconds_left(alloc, env, probes)
    if left is None:
        return None, (f"stop_before={layout.stop_before}s "
                      "(walltime unknown: relying on the scheduler's signal)")
    stop_in = max(left - layout.stop_before, 1)
    return stop_in, f"stop_before={layout.stop_before}s (SIGTERM in {stop_in}s)"


# --------------------------------------------------------------------------- #
# The plan and running it.


@dataclass
class Plan:
    """One launch, decided: the argv, the ranks' environment changes, the
    layout line, warnings, and when to send the stop signal."""

    argv: list[str]
    env: LaunchEnv
    description: str
    warnings: list[str]
    stop_in: Optional[int]
    stop_before: int


def plan(opts: Options, program_argv: Sequence[str], env: dict, probes: Optional[Probes] = None,
         scripts_dir: Path = SCRIPTS_DIR) -> Plan:
    """Everything :func:`main` prints or runs, from ``env`` alone. Raises
    :class:`UsageError` (a missing program or config is one unless the line
    is only shown)."""
    probes = probes or Probes()
    warnings: list[str] = []
    program = list(program_argv)
    path = None
    if program:
        config = config_of(program)
        if config and not os.path.isfile(config):
            if not opts.shows_only:
                raise UsageError(f"config {config} does not exist")
            warnings.append(f"config {config} does not exist here")
        path = find_program(program[0], env, probes)
        if path is None:
            if not opts.shows_only:
                raise UsageError(f"{program[0]} is not on PATH: activate the environment it is "
                                 "installed in")
            warnings.append(f"{program[0]} is not on PATH here")
        else:
            program[0] = path
    alloc = detect_allocation(env, probes, path, local=opts.local)
    layout = resolve_layout(alloc, opts)
    lenv = launch_env(alloc, opts, env, probes, scripts_dir)
    warnings = alloc.warnings + warnings + lenv.warnings
    argv = launch_line(alloc, opts, program, lenv.apply(env), list(lenv.set), scripts_dir)
    if alloc.scheduler == "pbs":
        w = depth_warning(layout.depth, program)
        warnings += [w] if w else []
    stop_in, note = (None, "") if opts.layout_only else stop_timer(alloc, layout, env, probes)
    description = describe(alloc, opts, lenv, env) + (f" {note}" if note else "")
    return Plan(argv, lenv, description, warnings, stop_in, layout.stop_before)


def _note(text: str) -> None:
    print(f"prelora-launch: {text}", file=sys.stderr, flush=True)


def _exit_status(returncode: int) -> int:
    """A child's status as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def run(p: Plan, env: dict) -> int:
    """Run the launch line; return its exit status. Without a stop timer the
    launcher replaces this process (signals reach it directly)."""
    child_env = p.env.apply(env)
    sys.stdout.flush()
    sys.stderr.flush()
    if p.stop_in is None:
        try:
            os.execvpe(p.argv[0], p.argv, child_env)
        except OSError as e:
            _note(f"cannot run {p.argv[0]}: {e.strerror}")
            return 127
    # With a stop timer the launcher runs as a child: signals reaching this
    # process are passed on, and the exit status is the launcher's.
    try:
        child = subprocess.Popen(p.argv, env=child_env)
    except OSError as e:
        _note(f"cannot run {p.argv[0]}: {e.strerror}")
        return 127

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def stop():
        _note(f"walltime ends in {p.stop_before}s: asking the trainer to checkpoint and stop")
        forward(signal.SIGTERM, None)

    timer = threading.Timer(p.stop_in, stop)
    timer.daemon = True
    timer.start()
    try:
        return _exit_status(child.wait())
    finally:
        timer.cancel()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``prelora-launch``: print or run the launch line (see :data:`USAGE`)."""
    env = dict(os.environ)
    try:
        opts, program = parse_args(sys.argv[1:] if argv is None else argv)
        if opts.help:
            print(USAGE, end="")
            return 0
        p = plan(opts, program, env)
    except UsageError as e:
        _note(str(e))
        return 2
    if opts.layout_only:
        for w in p.warnings:
            _note(f"warning: {w}")
        print(p.description)
        return 0
    line = shlex.join(p.argv)
    if opts.print_only:
        for w in p.warnings:
            _note(f"warning: {w}")
        print(line)
        return 0
    if opts.dry_run:
        print(f"# {p.description}")
        if p.env.set:
            print("# env: " + " ".join(shlex.quote(f"{k}={v}") for k, v in p.env.set.items()))
        for w in p.warnings:
            print(f"# warning: {w}")
        print(line)
        return 0
    for w in p.warnings:
        _note(f"warning: {w}")
    print(f"# {p.description}\n+ {line}", file=sys.stderr, flush=True)
    return run(p, env)


if __name__ == "__main__":
    sys.exit(main())
