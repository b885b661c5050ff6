"""``prelora-launch``: the scheduler's environment turned into one launch line
for any program (``prelora-train``, ``prelora-bench``, ``prelora-convert``...).

    prelora-launch [options] [--] PROGRAM [ARGS...]
    prelora-launch [options] [--] CONFIG.yaml [prelora-train args...]

This is launch code: with ``dist_init.py`` the only module that reads scheduler
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
- :func:`seconds_left`: the job's walltime left, for the stop timer;
- :func:`chain_break`, :func:`pbs_resubmission`, :func:`slurm_resubmission`:
  whether a job can queue its successor and the successor's submission
  line, every option of the running job repeated; :func:`chain_main` is
  scripts/resubmit.sh's entry point (submit, then confirm with qstat/squeue).

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

#: The address rank 0 offers for the rendezvous; read by dist_init.py.
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
#: PALS' CPUs per rank where the node's NUMA domains do not match the ranks
#: per node: 16 of a Polaris node's 64 hardware threads, room for the
#: reference config's 8 DataLoader workers.
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
#: The aws-ofi-nccl plugin ALCF documents for NCCL over Slingshot on Polaris,
#: pinned: a newer install beside it is not the one NCCL was tested with.
OFI_NCCL_DIR = "/soft/libraries/aws-ofi-nccl/v1.9.1-aws/lib"
#: hwloc, which the plugin needs; ALCF puts it on LD_LIBRARY_PATH with it.
HWLOC_DIR = "/soft/libraries/hwloc/lib/"
#: Where Linux lists each NUMA domain's CPUs.
NUMA_CPULIST_GLOB = "/sys/devices/system/node/node[0-9]*/cpulist"
#: PBS queues that hold one job per user, running or queued (Polaris'
#: debug-scaling): a job there cannot queue its successor.
ONE_JOB_PER_USER_QUEUES = ("debug-scaling",)

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
  --depth D             CPUs per rank (PBS: mpiexec --depth D --cpu-bind
                        depth under PALS; by default each rank is bound to
                        one NUMA domain when the node has one per rank, else
                        depth 16; -bind-to core:D under Hydra, PE=D under
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
  PBS, Cray PALS (Polaris): mpiexec -n NODES*PPN --ppn PPN
      --cpu-bind list:CPUS0:CPUS1:... --envall --hostfile $PBS_NODEFILE
      scripts/gpu_affinity.sh PROGRAM ...   (local rank r on NUMA domain r,
      whose cores on Polaris are next to GPU 3-r, the GPU gpu_affinity.sh
      gives it; --depth=D --cpu-bind depth with --depth, or when the node's
      NUMA domains are not one per rank)
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
                        directory, put on LD_LIBRARY_PATH with
                        /soft/libraries/hwloc/lib/; default: the plugin
                        already on LD_LIBRARY_PATH, else
                        /soft/libraries/aws-ofi-nccl/v1.9.1-aws/lib (the
                        version ALCF documents). Without a plugin the launch
                        says so in one line and leaves NCCL_NET and the other
                        NCCL_* network settings unset: with NCCL_NET="AWS
                        Libfabric" a plugin that fails to load stops NCCL.
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


def _run_status(argv: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
    """Exit status and stdout+stderr of ``argv``; 127 when it cannot start."""
    try:
        p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return 127, str(e)
    return p.returncode, p.stdout


def _numa_cpus() -> list[str]:
    """This node's NUMA domains' CPU lists ("0-7,32-39"), in domain order;
    domains without CPUs are left out."""
    def number(path: str) -> int:
        return int(re.search(r"node(\d+)", path).group(1))

    out = []
    for path in sorted(glob.glob(NUMA_CPULIST_GLOB), key=number):
        try:
            cpus = Path(path).read_text().strip()
        except OSError:
            return []
        if cpus:
            out.append(cpus)
    return out


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
    stdout when it exits 0 (None otherwise); ``run(argv)`` its exit status
    and stdout+stderr; ``resolves(name)``: the host name resolves here;
    ``glob(pattern)``; ``hostname()``; ``now()`` in seconds since the epoch;
    ``numa_cpus()``: this node's NUMA domains' CPU lists, in domain order.
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
    numa_cpus: Callable[[], list[str]] = _numa_cpus
    run: Callable[[Sequence[str]], tuple[int, str]] = _run_status


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
    numa_cpus: list[str] = field(default_factory=list)
    """PBS: the node's NUMA domains' CPU lists, in domain order (empty: unknown)."""
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
                           nodefile=nodefile, job_id=env.get("PBS_JOBID") or None,
                           numa_cpus=probes.numa_cpus())
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
    cpu_lists: list[str] = field(default_factory=list)
    """PALS: local rank r is bound to cpu_lists[r] (one NUMA domain each);
    empty: --depth binding."""


def resolve_layout(alloc: Allocation, opts: Options) -> Layout:
    """The options with the allocation's defaults filled in (the defaults are
    listed in :data:`USAGE`). Raises :class:`UsageError`."""
    launcher = opts.launcher or ("srun" if alloc.scheduler == "slurm" else "mpiexec")
    if launcher == "srun" and alloc.scheduler != "slurm":
        raise UsageError("--launcher srun needs a Slurm job")
    cpu_lists: list[str] = []
    if alloc.scheduler == "pbs":
        ppn = opts.ppn or alloc.gpus_per_node or PBS_DEFAULT_PPN
        depth = opts.depth or (PALS_DEFAULT_DEPTH if alloc.mpi == "pals" else None)
        if alloc.mpi == "pals" and not opts.depth and len(alloc.numa_cpus) == ppn:
            # One NUMA domain per rank: on Polaris domain r holds the cores
            # next to GPU 3 - r, the one gpu_affinity.sh gives local rank r.
            cpu_lists = list(alloc.numa_cpus)
            depth = min(len(cpu_set(c)) for c in cpu_lists)
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
                  opts.stop_before if opts.stop_before is not None else stop, cpu_lists)


def cpu_set(text: str) -> set[int]:
    """The CPUs of a Linux CPU list ("0-7,32-39")."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def numa_warning(alloc: Allocation, layout: Layout) -> Optional[str]:
    """A warning when PALS' --depth binding puts a GPU rank's CPUs in more
    than one NUMA domain (its loader then works across the socket from its
    GPU); None when fine or unknown."""
    if (alloc.scheduler != "pbs" or alloc.mpi != "pals" or layout.cpu_lists
            or not alloc.numa_cpus or not layout.depth or alloc.gpus_per_node == 0):
        return None
    domains = [cpu_set(c) for c in alloc.numa_cpus]
    split = [r for r in range(layout.ranks_per_node)
             if sum(1 for d in domains
                    if d & set(range(r * layout.depth, (r + 1) * layout.depth))) > 1]
    if not split:
        return None
    return (f"--depth {layout.depth} --cpu-bind depth gives local rank(s) "
            f"{', '.join(map(str, split))} CPUs in two NUMA domains, away from their GPU "
            f"(--ppn {len(domains)} without --depth binds each rank to one NUMA domain)")


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


def _ofi_nccl_plugin(env: dict, probes: Probes, out: LaunchEnv) -> bool:
    """Put the aws-ofi-nccl plugin (libnccl-net*.so) and the hwloc it needs
    on LD_LIBRARY_PATH; False (and one warning) when there is no plugin."""
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]

    def has_plugin(d: str) -> bool:
        return bool(d) and bool(probes.glob(os.path.join(d, "libnccl-net*.so*")))

    given = env.get("PRELORA_OFI_NCCL_DIR", "")
    plugin = given or next((d for d in dirs if has_plugin(d)), "") or OFI_NCCL_DIR
    if not has_plugin(plugin):
        out.ofi_nccl = "missing"
        out.warnings.append(
            f"no aws-ofi-nccl plugin (libnccl-net*.so) in {plugin} or on LD_LIBRARY_PATH: "
            "NCCL_NET and the other NCCL_* network settings are left unset (with "
            'NCCL_NET="AWS Libfabric" a plugin that fails to load stops NCCL), so NCCL uses its '
            "slower socket transport; set PRELORA_OFI_NCCL_DIR to the plugin's lib directory")
        return False
    out.ofi_nccl = plugin
    present = {d.rstrip("/") for d in dirs}
    add = [d for d in (HWLOC_DIR if probes.glob(HWLOC_DIR) else "", plugin)
           if d and d.rstrip("/") not in present]
    if add:
        out.set["LD_LIBRARY_PATH"] = ":".join(add + dirs)
    return True


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
        nccl = dict((name, env.get(name) or default) for name, default in NCCL_SETTINGS)
        if (opts.nccl_env and nccl["NCCL_NET"] == "AWS Libfabric"
                and not _ofi_nccl_plugin(env, probes, out)):
            out.unset.extend(nccl)
        elif opts.nccl_env:
            out.set.update(nccl)
        else:
            out.unset.extend(nccl)
        for name, default in FI_SETTINGS:
            out.set[name] = env.get(name) or default
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
        if alloc.mpi == "pals" and layout.cpu_lists:
            cmd += ["--ppn", ppn, "--cpu-bind", "list:" + ":".join(layout.cpu_lists),
                    "--envall", "--hostfile", alloc.nodefile]
        elif alloc.mpi == "pals":
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
        binding = {"pals": f"numa:{d}" if layout.cpu_lists else f"depth:{d}"}.get(
            alloc.mpi, f"core:{d}" if d else "none")
        nccl = ("on" if opts.nccl_env else "off") if alloc.gpus_per_node > 0 else "n/a"
        nccl = "off(no-plugin)" if lenv.ofi_nccl == "missing" else nccl
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
# The job chain: whether a job can queue its successor, the successor's
# submission line, and whether the scheduler really holds it.


def parse_qstat_full(text: str) -> dict[str, str]:
    """``qstat -f`` output as attribute -> value; PBS wraps a long value onto
    lines that start with a tab, which are joined back."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("\t") and key is not None:
            out[key] += line[1:]
            continue
        name, sep, value = line.strip().partition(" = ")
        key = name if sep else None
        if sep:
            out[name] = value
    return out


def parse_variable_list(value: str) -> dict[str, str]:
    """PBS' Variable_List ("A=1,B=x\\,y") as a dict; a comma inside a value
    is escaped with a backslash."""
    items, cur, i = [], "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            cur += value[i + 1]
            i += 2
            continue
        if value[i] == ",":
            items.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    items.append(cur)
    return dict(item.split("=", 1) for item in items if "=" in item)


def job_info(env: dict, probes: Optional[Probes] = None) -> dict[str, str]:
    """This PBS job's attributes from ``qstat -f`` ({} when unknown)."""
    probes = probes or Probes()
    qstat = probes.which("qstat", env.get("PATH"))
    if not qstat or not env.get("PBS_JOBID"):
        return {}
    return parse_qstat_full(probes.ok([qstat, "-f", env["PBS_JOBID"]]) or "")


def chain_break(env: dict, info: dict) -> Optional[str]:
    """Why this PBS job cannot queue its successor (its queue holds one job
    per user); None when it can."""
    queues = {env.get("PBS_QUEUE"), env.get("PBS_O_QUEUE"), info.get("queue")}
    queue = next((q for q in ONE_JOB_PER_USER_QUEUES if q in queues), None)
    if queue is None:
        return None
    return (f"queue {queue} holds one job per user, running or queued: this job cannot queue "
            "its successor, so the chain ends with it (submit chains to prod)")


#: The resources a PBS job asked for that its successor asks for again;
#: the others in Resource_List (ncpus, nodect, per-file-system flags) PBS
#: and the site's hooks derive from these.
CARRIED_RESOURCES = ("select", "place", "walltime", "filesystems")


def _qsub_v(variables: dict[str, str]) -> str:
    """qsub -v's list; a value holding a comma is quoted."""
    words = []
    for name, value in variables.items():
        if "," in value:
            if "'" in value:
                raise UsageError(f"cannot pass {name} to qsub -v: its value holds both a comma "
                                 "and a quote")
            value = f"'{value}'"
        words.append(f"{name}={value}")
    return ",".join(words)


def pbs_resubmission(env: dict, info: dict, script: str, names: Sequence[str],
                     left: int) -> tuple[list[str], list[str]]:
    """The qsub line of this job's successor and notes about it.

    Every submission option of this job is carried from ``info`` (its
    ``qstat -f``): -A, -q (the queue it was submitted to, e.g. prod, not the
    execution queue prod routed it to), -N, -j, -l of
    :data:`CARRIED_RESOURCES` and the -v variables; then the current values
    of ``names`` (the template's variables), PRELORA_MAX_RESUBMITS=``left``
    and PRELORA_SUBMIT_ARGS, whose words come last and so win.
    """
    notes = []
    given = parse_variable_list(info.get("Variable_List", ""))
    argv = ["qsub", "-W", f"depend=afterany:{env['PBS_JOBID']}"]
    account = info.get("Account_Name") or env.get("PBS_ACCOUNT")
    queue = env.get("PBS_O_QUEUE") or given.get("PBS_O_QUEUE") or info.get("queue")
    argv += ["-A", account] if account else []
    argv += ["-q", queue] if queue else []
    argv += ["-N", info["Job_Name"]] if info.get("Job_Name") else []
    argv += ["-j", info["Join_Path"]] if info.get("Join_Path", "n") != "n" else []
    for name in CARRIED_RESOURCES:
        value = info.get(f"Resource_List.{name}")
        argv += ["-l", f"{name}={value}"] if value else []
    if not info:
        notes.append("qstat -f gave nothing for this job: the successor gets the job script's "
                     "#PBS lines, with -q/-A from the environment and PRELORA_SUBMIT_ARGS")
    variables = {"PRELORA_MAX_RESUBMITS": str(left)}
    variables.update((k, v) for k, v in given.items() if not k.startswith("PBS_O_"))
    for name in [*names, "PRELORA_SUBMIT_ARGS"]:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"--vars: '{name}' is not a variable name")
        if name in env:
            variables[name] = env[name]
    variables["PRELORA_MAX_RESUBMITS"] = str(left)
    argv += env.get("PRELORA_SUBMIT_ARGS", "").split()
    return argv + ["-v", _qsub_v(variables), script], notes


def slurm_resubmission(env: dict, time_limit: Optional[str], script: str,
                       left: int) -> list[str]:
    """The sbatch line of this job's successor: this job's shape, account,
    partition, QOS, name and ``time_limit``, then PRELORA_SUBMIT_ARGS."""
    argv = ["sbatch", f"--dependency=afterany:{env['SLURM_JOB_ID']}",
            f"--nodes={env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES') or 1}"]
    for var, option in (("SLURM_NTASKS_PER_NODE", "--ntasks-per-node"),
                        ("SLURM_CPUS_PER_TASK", "--cpus-per-task"),
                        ("SLURM_GPUS_PER_NODE", "--gpus-per-node"),
                        ("SLURM_JOB_ACCOUNT", "--account"), ("SLURM_JOB_PARTITION", "--partition"),
                        ("SLURM_JOB_QOS", "--qos"), ("SLURM_JOB_NAME", "--job-name")):
        argv += [f"{option}={env[var]}"] if env.get(var) else []
    argv += [f"--time={time_limit}"] if time_limit else []
    argv += env.get("PRELORA_SUBMIT_ARGS", "").split()
    return argv + [f"--export=ALL,PRELORA_MAX_RESUBMITS={left}", script]


def submitted_id(output: str) -> Optional[str]:
    """The job id in qsub's or sbatch's output."""
    m = re.search(r"Submitted batch job (\S+)", output)
    if m:
        return m.group(1)
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines and " " not in lines[-1] else None


def chain_main(argv: Optional[Sequence[str]] = None, env: Optional[dict] = None,
               probes: Optional[Probes] = None) -> int:
    """scripts/resubmit.sh's decisions (one line each on stdout):

    ``check``: at job start, say whether this job can queue its successor.
    ``submit [--dry-run] [--vars "NAME ..."] --left N SCRIPT``: submit this
    job's successor with every option of this job, then confirm with
    qstat/squeue that the scheduler holds it. Exit 0 done (or nothing to
    do), 1 when the submission failed or vanished, 2 usage.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ) if env is None else env
    probes = probes or Probes()

    def say(text: str, error: bool = False) -> None:
        print(f"resubmit.sh: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    pbs = bool(env.get("PBS_JOBID"))
    if args[:1] == ["check"]:
        why = chain_break(env, job_info(env, probes)) if pbs else None
        if why and env.get("PRELORA_MAX_RESUBMITS", "20") != "0":
            say(why)
        return 0
    if args[:1] != ["submit"]:
        say("usage: chain_main check | submit [--dry-run] [--vars NAMES] --left N SCRIPT", True)
        return 2
    dry_run, names, left, rest = False, [], None, args[1:]
    while rest and rest[0].startswith("--"):
        option = rest.pop(0)
        if option == "--dry-run":
            dry_run = True
        elif option in ("--vars", "--left") and rest:
            value = rest.pop(0)
            names, left = (value.split(), left) if option == "--vars" else (names, value)
        else:
            say(f"bad option {option}", error=True)
            return 2
    if len(rest) != 1 or left is None or not left.isdigit():
        say("submit needs --left N and one SCRIPT", error=True)
        return 2
    script = rest[0]
    try:
        if pbs:
            info = job_info(env, probes)
            why = chain_break(env, info)
            if why:
                say(f"no resubmission: {why}")
                return 0
            cmd, notes = pbs_resubmission(env, info, script, names, int(left))
        elif env.get("SLURM_JOB_ID"):
            squeue = probes.which("squeue", env.get("PATH"))
            limit = probes.ok([squeue, "-h", "-j", env["SLURM_JOB_ID"], "-o", "%l"]) if squeue \
                else None
            limit = (limit or "").strip()
            cmd, notes = slurm_resubmission(env, limit if parse_duration(limit) else None,
                                            script, int(left)), []
        else:
            say("not inside a PBS or Slurm job (neither PBS_JOBID nor SLURM_JOB_ID is set)", True)
            return 2
    except UsageError as e:
        say(str(e), error=True)
        return 2
    for note in notes:
        say(f"note: {note}")
    if dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"+ {shlex.join(cmd)}", flush=True)
    status, out = probes.run(cmd)
    out = out.strip()
    if status != 0:
        say(f"error: submission failed (exit {status}): {out}", error=True)
        return 1
    job = submitted_id(out)
    check = [probes.which("qstat" if pbs else "squeue", env.get("PATH")) or
             ("qstat" if pbs else "squeue")]
    check += [job] if pbs else ["-h", "-j", job or ""]
    status, seen = probes.run(check) if job else (1, "")
    if status != 0 or not seen.strip():
        say(f"error: {'qsub' if pbs else 'sbatch'} answered '{out}' but "
            f"{os.path.basename(check[0])} does not show job {job}: the successor is not queued "
            "and the chain ends here (a prod job that fits no execution queue, e.g. over its "
            "walltime limit, vanishes like this); fix the request, then submit again", error=True)
        return 1
    say(f"submitted: {out}")
    say(f"{os.path.basename(check[0])} shows job {job} in the queue")
    return 0


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
        warnings += [w for w in (depth_warning(layout.depth, program),
                                 numa_warning(alloc, layout)) if w]
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
