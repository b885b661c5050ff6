"""prelora-launch's decisions (prelora_hpc/launch_plan.py) from environment
dicts and faked probes: the launch line, the ranks' environment, the layout
line, warnings and usage errors under PBS (Cray PALS, MPICH Hydra, Open
MPI), Slurm and a workstation; the stop timer; exit statuses.

No scheduler and no MPI: nvidia-smi, mpiexec --version, getent, qstat,
squeue and scontrol are answers of a :class:`FakeProbes`.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prelora_hpc import launch_plan
from prelora_hpc.launch_plan import Options, UsageError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "vit_large_imagenet1k.yaml")
AFFINITY = str(ROOT / "scripts" / "gpu_affinity.sh")
NODE_WATCH = str(ROOT / "scripts" / "node_watch.sh")
HOSTS = ["x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov", "x3006c0s19b1n0.hsn.cm.polaris.alcf.anl.gov"]
BIN = "/fake/bin"
TRAIN = f"{BIN}/prelora-train"
PROGRAM = ["prelora-train", "--config", CONFIG, "--output-dir", "runs/x"]
NOW = 1_900_000_000.0

#: ALCF's table of a Polaris node: each GPU and the CPUs (hardware threads) of
#: the NUMA domain next to it.
POLARIS_GPU_CPUS = {3: "0-7,32-39", 2: "8-15,40-47", 1: "16-23,48-55", 0: "24-31,56-63"}
#: What Linux lists under /sys/devices/system/node on a Polaris node.
POLARIS_NUMA = ["0-7,32-39", "8-15,40-47", "16-23,48-55", "24-31,56-63"]
PLUGIN = "/soft/libraries/aws-ofi-nccl/v1.9.1-aws/lib"
HWLOC = "/soft/libraries/hwloc/lib/"
POLARIS_FILES = (f"{PLUGIN}/libnccl-net.so", "/soft/libraries/aws-ofi-nccl/v1.10.0/lib/libnccl-net.so",
                 HWLOC)

VERSIONS = {"pals": "", "hydra": "HYDRA build details:\n    Version: 5.0.2",
            "openmpi": "mpiexec (Open MPI) 5.0.5", "unknown": "mpiexec 1.0"}


class FakeProbes(launch_plan.Probes):
    """A node with ``gpus`` GPUs, an mpiexec of ``mpi`` (Cray PALS' lives
    under /opt/cray/pals/, as on Polaris), the commands ``commands`` on PATH
    and the host names ``resolvable``; ``answers`` maps a command's name to
    what it prints."""

    def __init__(self, gpus=0, mpi="pals", resolvable=(), commands=(), answers=None,
                 glob=None, numa=(), files=()):
        on_path = {"prelora-train", "prelora-bench", "mpiexec", "nvidia-smi", *commands}
        answers = dict(answers or {})

        def which(name, path=None):
            if os.sep in name:
                return name
            return f"{BIN}/{name}" if name in on_path else None

        def output(argv):
            name = os.path.basename(argv[0])
            if name == "nvidia-smi":
                return "".join(f"GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i})\n"
                               for i in range(gpus)) or "No devices were found\n"
            if name == "mpiexec" and argv[1:] == ["--version"]:
                return VERSIONS[mpi]
            return answers.get(name)

        def ok(argv):
            a = answers.get(os.path.basename(argv[0]))
            return a(argv) if callable(a) else a

        super().__init__(
            which=which, output=output, ok=ok, resolves=lambda n: n in resolvable,
            glob=glob or (lambda pattern: [f for f in files if fnmatch.fnmatch(f, pattern)
                                           or f == pattern]),
            hostname=lambda: "workstation", now=lambda: NOW, numa_cpus=lambda: list(numa),
            realpath=lambda p: "/opt/cray/pals/1.4/bin/mpiexec" if mpi == "pals" and
            p == f"{BIN}/mpiexec" else p)


def polaris(gpus=4, files=POLARIS_FILES):
    """A Polaris node: Cray PALS, GPUs, four NUMA domains, the aws-ofi-nccl
    plugin and hwloc under /soft, high-speed-network names that resolve."""
    return FakeProbes(gpus=gpus, mpi="pals", resolvable=(*HOSTS, "x3006c0s13b0n0.hsn.example"),
                      numa=POLARIS_NUMA, files=files)


def nodefile(tmp_path, hosts=HOSTS, slots=4) -> str:
    p = tmp_path / "nodefile"
    # PBS writes each host once per MPI slot.
    p.write_text("".join(f"{h}\n" for h in hosts for _ in range(slots)))
    return str(p)


def plan(env, probes, opts=None, program=PROGRAM):
    return launch_plan.plan(opts or Options(dry_run=True), program, env, probes)


def follows(argv, *seq):
    """True if the tokens seq appear consecutively in argv."""
    n = len(seq)
    return any(tuple(argv[i:i + n]) == seq for i in range(len(argv) - n + 1))


# --------------------------------------------------------------------------- #
# PBS


def test_pbs_with_gpus_on_polaris(tmp_path):
    nf = nodefile(tmp_path)
    p = plan({"PBS_NODEFILE": nf, "PBS_JOBID": "1.polaris"}, polaris())
    argv = p.argv
    assert argv[0] == f"{BIN}/mpiexec"
    assert follows(argv, "-n", "8") and follows(argv, "--ppn", "4")
    # One NUMA domain per rank: 16 hardware threads, more than the reference
    # config's 8 DataLoader workers.
    assert follows(argv, "--cpu-bind", "list:" + ":".join(POLARIS_NUMA))
    assert "--envall" in argv and follows(argv, "--hostfile", nf)
    # The affinity wrapper comes right before the program.
    i = argv.index(AFFINITY)
    assert argv[i + 1:] == [TRAIN, "--config", CONFIG, "--output-dir", "runs/x"]
    d = p.description
    assert "scheduler=pbs nodes=2 ranks_per_node=4 ranks=8 gpus_per_node=4" in d
    assert f"mpi=pals binding=numa:16 nccl_env=on ofi_nccl={PLUGIN}" in d
    assert "master_addr=x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov" in d
    s = p.env.set
    assert s["NCCL_NET"] == "AWS Libfabric" and s["NCCL_NET_GDR_LEVEL"] == "PHB"
    assert s["NCCL_CROSS_NIC"] == "1" and s["NCCL_COLLNET_ENABLE"] == "1"
    assert s["FI_CXI_DEFAULT_CQ_SIZE"] == "131072" and s["FI_MR_CACHE_MONITOR"] == "userfaultfd"
    assert s["TMPDIR"] == "/tmp" and s["PRELORA_MASTER_ADDR"] == HOSTS[0]
    assert p.warnings == []


def pals_binding(argv, local_rank):
    """The CPUs Cray PALS binds a local rank to, for the mpiexec line argv:
    ``--cpu-bind list:A:B:...`` gives local rank r the r-th list (round
    robin), ``--cpu-bind depth`` (or core) with ``--depth=D`` the D CPUs
    from r x D on, ``none`` or no option the whole node."""
    words = " ".join(argv).replace("--cpu-bind=", "--cpu-bind ").replace("--depth ", "--depth=") \
        .replace(" -d ", " --depth=").split()
    bind = words[words.index("--cpu-bind") + 1] if "--cpu-bind" in words else "none"
    depth = next((int(w.split("=")[1]) for w in words if w.startswith("--depth=")), 1)
    if bind.startswith("list:"):
        lists = bind[len("list:"):].split(":")
        return launch_plan.cpu_set(lists[local_rank % len(lists)])
    if bind in ("depth", "core"):
        return set(range(local_rank * depth, (local_rank + 1) * depth))
    assert bind == "none", f"binding {bind} is not modelled here"
    return set(range(64))


def gpu_of(local_rank, tmp_path):
    """The GPU scripts/gpu_affinity.sh gives a local rank on a 4-GPU node."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA A100-SXM4-40GB\"; done\n")
    smi.chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PMI_LOCAL_RANK": str(local_rank)}
    out = subprocess.run([AFFINITY, "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def misplaced_ranks(argv, tmp_path):
    """Local ranks whose CPUs are not all in the NUMA domain of their GPU
    (ALCF's table), for a 4-rank-per-node line."""
    return [r for r in range(4) if not pals_binding(argv, r)
            <= launch_plan.cpu_set(POLARIS_GPU_CPUS[gpu_of(r, tmp_path)])]


def test_polaris_ranks_sit_next_to_their_gpu(tmp_path):
    """On a Polaris node (faked PBS, 4 ranks per node) every local rank's
    CPUs, as PALS binds them for the line prelora-launch builds, lie in the
    NUMA domain of the GPU gpu_affinity.sh gives it."""
    env = {"PBS_NODEFILE": nodefile(tmp_path), "PBS_JOBID": "1.polaris"}
    argv = plan(env, polaris()).argv
    assert misplaced_ranks(argv, tmp_path) == []
    assert all(len(pals_binding(argv, r)) == 16 for r in range(4))
    # --depth 8 (ALCF's depth example) also keeps each rank by its GPU.
    argv = plan(env, polaris(), Options(dry_run=True, depth=8)).argv
    assert "--depth=8" in argv and misplaced_ranks(argv, tmp_path) == []
    # --depth 16 under depth binding spans two NUMA domains per rank, and
    # ranks 1 and 2 get none of the CPUs next to their GPU: the check sees
    # it, and so does the launch.
    p = plan(env, polaris(), Options(dry_run=True, depth=16))
    assert misplaced_ranks(p.argv, tmp_path) == [0, 1, 2, 3]
    assert [r for r in range(4) if not pals_binding(p.argv, r)
            & launch_plan.cpu_set(POLARIS_GPU_CPUS[gpu_of(r, tmp_path)])] == [1, 2]
    assert any("local rank(s) 0, 1, 2, 3 CPUs in two NUMA domains" in w for w in p.warnings)


def test_polaris_dry_run_output(tmp_path, monkeypatch, capsys):
    """What `prelora-launch --dry-run` prints inside a Polaris PBS job."""
    monkeypatch.setattr(launch_plan, "Probes", lambda: polaris())
    for k in list(os.environ):
        if k.startswith(("PBS_", "PRELORA_", "NCCL_", "LD_LIBRARY_PATH")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PBS_NODEFILE", nodefile(tmp_path))
    assert launch_plan.main(["--dry-run", "--", CONFIG, "--output-dir", "runs/x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"# scheduler=pbs nodes=2 ranks_per_node=4 ranks=8 gpus_per_node=4 mpi=pals "
                      f"binding=numa:16 nccl_env=on ofi_nccl={PLUGIN} master_addr={HOSTS[0]} "
                      "stop_before=300s (walltime unknown: relying on the scheduler's signal)")
    exported = dict(w.split("=", 1) for w in shlex.split(out[1][len("# env: "):]))
    assert exported["LD_LIBRARY_PATH"] == f"{HWLOC}:{PLUGIN}"
    assert exported["NCCL_NET"] == "AWS Libfabric"
    assert shlex.split(out[-1]) == [
        f"{BIN}/mpiexec", "-n", "8", "--ppn", "4", "--cpu-bind", "list:" + ":".join(POLARIS_NUMA),
        "--envall", "--hostfile", os.environ["PBS_NODEFILE"], AFFINITY, TRAIN, "--config", CONFIG,
        "--output-dir", "runs/x"]
    assert len(out) == 3          # no warning


def test_pbs_options(tmp_path):
    nf = nodefile(tmp_path)
    env = {"PBS_NODEFILE": nf, "NCCL_NET": "AWS Libfabric", "NCCL_CROSS_NIC": "0"}
    p = plan(env, polaris(), Options(dry_run=True, nccl_env=False, ppn=2, depth=16))
    assert follows(p.argv, "-n", "4") and follows(p.argv, "--ppn", "2") and "--depth=16" in p.argv
    assert not any(k.startswith("NCCL_") for k in p.env.set)
    # --no-nccl-env removes the ones the environment already has.
    ranks_env = p.env.apply(env)
    assert not any(k.startswith("NCCL_") for k in ranks_env)
    assert p.env.set["FI_MR_CACHE_MONITOR"] == "userfaultfd"
    assert p.env.ofi_nccl is None and "nccl_env=off" in p.description     # no plugin asked for
    # A value already in the environment (a conda module's) is kept.
    p = plan({"PBS_NODEFILE": nf, "NCCL_NET_GDR_LEVEL": "SYS"}, polaris())
    assert p.env.set["NCCL_NET_GDR_LEVEL"] == "SYS"
    # Another network name suffix, or none.
    p = plan({"PBS_NODEFILE": nf, "PRELORA_HSN_SUFFIX": ".hsn.example"}, polaris())
    assert "master_addr=x3006c0s13b0n0.hsn.example " in p.description
    p = plan({"PBS_NODEFILE": nf, "PRELORA_HSN_SUFFIX": ""}, polaris())
    assert f"master_addr={HOSTS[0]} " in p.description
    # Another site's TMPDIR.
    p = plan({"PBS_NODEFILE": nf, "PRELORA_TMPDIR": "/local/scratch"}, polaris())
    assert p.env.set["TMPDIR"] == "/local/scratch"
    # --np over the layout's count.
    p = plan({"PBS_NODEFILE": nf}, polaris(), Options(dry_run=True, np=3))
    assert follows(p.argv, "-n", "3") and "ranks=3" in p.description


def test_pbs_without_gpus(tmp_path):
    p = plan({"PBS_NODEFILE": nodefile(tmp_path, slots=1)}, polaris(gpus=0))
    assert follows(p.argv, "-n", "8") and follows(p.argv, "--ppn", "4")   # the default
    assert not any(k.startswith(("NCCL_", "FI_")) for k in p.env.set)
    assert "nccl_env=n/a" in p.description and "gpus_per_node=0" in p.description


def test_pbs_rendezvous_name_only_where_it_resolves(tmp_path):
    """The Polaris high-speed-network suffix is added only where the name
    resolves; another PBS site's node keeps its own name."""
    probes = FakeProbes(mpi="pals", resolvable=("emu0", "emu1"))
    nf = nodefile(tmp_path, hosts=["emu0", "emu1"], slots=2)
    p = plan({"PBS_NODEFILE": nf}, probes)
    assert "master_addr=emu0 " in p.description and p.env.set["PRELORA_MASTER_ADDR"] == "emu0"
    assert "emu0.hsn.cm.polaris.alcf.anl.gov does not resolve here: the rendezvous uses emu0" \
        in p.warnings
    # A name the user gives is taken as it is.
    p = plan({"PBS_NODEFILE": nf, "PRELORA_MASTER_ADDR": "10.1.2.3"}, probes)
    assert "master_addr=10.1.2.3 " in p.description and "PRELORA_MASTER_ADDR" not in p.env.set
    assert not any("does not resolve" in w for w in p.warnings)


def test_pbs_mpich_hydra(tmp_path):
    """PBS with MPICH's mpiexec (Hydra): its own options, each host once, and
    the remote shell wrapped so a lost node is named."""
    probes = FakeProbes(mpi="hydra", resolvable=("emu0", "emu1"))
    nf = nodefile(tmp_path, hosts=["emu0", "emu1"], slots=2)
    p = plan({"PBS_NODEFILE": nf}, probes, Options(dry_run=True, ppn=2))
    argv = p.argv
    assert follows(argv, "-n", "4") and follows(argv, "-ppn", "2")
    assert follows(argv, "-hosts", "emu0,emu1") and "-envall" in argv
    # No PALS options, which Hydra refuses ("unable to parse user arguments").
    assert not any(a.startswith(("--depth", "--cpu-bind", "--ppn", "--hostfile")) for a in argv)
    assert "-bind-to" not in argv
    assert "mpi=hydra binding=none" in p.description
    s = p.env.set
    assert s["HYDRA_LAUNCHER_EXEC"] == NODE_WATCH and s["HYDRA_LAUNCHER"] == "ssh"
    assert s["PRELORA_REMOTE_SHELL"] == "ssh" and s["PRELORA_JOB_PPN"] == "2"
    assert s["PRELORA_JOB_HOSTS"] == "emu0 emu1"
    assert argv[argv.index(AFFINITY) + 1] == TRAIN
    # A binding when asked; a site's own remote shell is kept behind the watch.
    p = plan({"PBS_NODEFILE": nf, "HYDRA_LAUNCHER_EXEC": "/opt/rsh"}, probes,
             Options(dry_run=True, ppn=2, depth=4))
    assert follows(p.argv, "-bind-to", "core:4") and p.env.set["PRELORA_REMOTE_SHELL"] == "/opt/rsh"
    assert "binding=core:4" in p.description
    # Already behind the watch, or another launcher than a remote shell: left alone.
    for extra in ({"HYDRA_LAUNCHER_EXEC": NODE_WATCH}, {"HYDRA_LAUNCHER": "slurm"}):
        p = plan({"PBS_NODEFILE": nf, **extra}, probes)
        assert "HYDRA_LAUNCHER_EXEC" not in p.env.set
    # One host: nothing to watch.
    p = plan({"PBS_NODEFILE": nodefile(tmp_path, hosts=["emu0"], slots=2)}, probes)
    assert follows(p.argv, "-hosts", "emu0") and "HYDRA_LAUNCHER_EXEC" not in p.env.set


def test_pbs_open_mpi(tmp_path):
    probes = FakeProbes(mpi="openmpi")
    nf = nodefile(tmp_path, hosts=["n0", "n1"], slots=2)
    env = {"PBS_NODEFILE": nf, "PATH": "/usr/bin", "DS_ACCELERATOR": "cpu"}
    p = plan(env, probes, Options(dry_run=True, ppn=2, depth=8))
    argv = p.argv
    assert follows(argv, "-n", "4") and follows(argv, "--map-by", "ppr:2:node:PE=8")
    assert follows(argv, "--bind-to", "core") and follows(argv, "--hostfile", nf)
    # Open MPI forwards only the variables it is told to: those set, and this launch's.
    assert follows(argv, "-x", "PATH") and follows(argv, "-x", "DS_ACCELERATOR")
    assert follows(argv, "-x", "PRELORA_MASTER_ADDR") and follows(argv, "-x", "TMPDIR")
    assert not follows(argv, "-x", "PYTHONPATH")
    assert "mpi=openmpi binding=core:8" in p.description
    p = plan(env, probes, Options(dry_run=True, ppn=2))
    assert follows(p.argv, "--map-by", "ppr:2:node") and follows(p.argv, "--bind-to", "none")


def test_pbs_unknown_mpi_falls_back_to_pals_and_says_so(tmp_path):
    nf = nodefile(tmp_path)
    p = plan({"PBS_NODEFILE": nf}, FakeProbes(mpi="unknown"))
    assert "--cpu-bind" in p.argv and "mpi=pals" in p.description
    assert any("names none of Cray PALS, MPICH Hydra, Open MPI" in w and
               "PRELORA_MPI_FLAVOUR" in w for w in p.warnings)
    p = plan({"PBS_NODEFILE": nf, "PRELORA_MPI_FLAVOUR": "hydra"}, FakeProbes(mpi="unknown"))
    assert "-ppn" in p.argv and "mpi=hydra" in p.description
    assert not any("names none" in w for w in p.warnings)
    with pytest.raises(UsageError, match="PRELORA_MPI_FLAVOUR must be pals, hydra or openmpi"):
        plan({"PBS_NODEFILE": nf, "PRELORA_MPI_FLAVOUR": "mvapich"}, FakeProbes(mpi="unknown"))


@pytest.mark.parametrize("version, flavour", [
    ("HYDRA build details:", "hydra"), ("Intel(R) MPI Library for Linux", "hydra"),
    ("mpiexec (Open MPI) 5.0.5", "openmpi"), ("mpiexec (OpenRTE) 4.1", "openmpi"),
    ("PALS 1.2.12", "pals"), ("mpiexec 1.0", None),
])
def test_mpi_flavour_from_the_version_text(version, flavour):
    probes = FakeProbes(mpi="unknown")
    probes.output = lambda argv: version
    assert launch_plan.mpi_flavour("/usr/bin/mpiexec", {}, probes) == flavour


def test_pbs_warns_when_depth_does_not_exceed_workers(tmp_path):
    env = {"PBS_NODEFILE": nodefile(tmp_path)}
    # The reference config has 8 workers per rank.
    p = plan(env, polaris(gpus=0), Options(dry_run=True, depth=8))
    assert "--depth 8 is not above data.num_workers=8: each rank's DataLoader workers share its " \
           "8 core(s) with it (use a depth of at least 9)" in p.warnings
    p = plan(env, polaris(gpus=0), Options(dry_run=True, depth=8),
             program=[*PROGRAM, "data.num_workers=4"])
    assert not any(w.startswith("--depth") for w in p.warnings)
    p = plan(env, polaris(gpus=0), Options(dry_run=True, depth=9))
    assert not any(w.startswith("--depth") for w in p.warnings)
    # Only prelora-train's config counts (prelora-bench runs no DataLoader workers).
    p = plan(env, polaris(gpus=0), Options(dry_run=True, depth=8),
             program=["prelora-bench", "--config", CONFIG])
    assert not any(w.startswith("--depth") for w in p.warnings)


def test_pbs_aws_ofi_nccl_plugin(tmp_path):
    """NCCL_NET="AWS Libfabric" needs the aws-ofi-nccl plugin: the pinned
    v1.9.1-aws install (not the newest beside it) and hwloc go on
    LD_LIBRARY_PATH; a plugin the module put there is kept."""
    nf = nodefile(tmp_path)
    p = plan({"PBS_NODEFILE": nf, "LD_LIBRARY_PATH": "/usr/lib"}, polaris())
    assert p.env.set["LD_LIBRARY_PATH"] == f"{HWLOC}:{PLUGIN}:/usr/lib"
    assert p.env.set["NCCL_NET"] == "AWS Libfabric" and not p.env.unset
    # Already on LD_LIBRARY_PATH (a module loaded it): kept, hwloc added.
    other = "/opt/site/ofi-nccl/lib"
    probes = polaris(files=(*POLARIS_FILES, f"{other}/libnccl-net.so.0"))
    p = plan({"PBS_NODEFILE": nf, "LD_LIBRARY_PATH": f"/usr/lib:{other}"}, probes)
    assert f"ofi_nccl={other}" in p.description
    assert p.env.set["LD_LIBRARY_PATH"] == f"{HWLOC}:/usr/lib:{other}"
    # Both there: nothing to add.
    p = plan({"PBS_NODEFILE": nf, "LD_LIBRARY_PATH": f"{HWLOC}:{PLUGIN}"}, polaris())
    assert "LD_LIBRARY_PATH" not in p.env.set
    # The user's directory wins.
    p = plan({"PBS_NODEFILE": nf, "PRELORA_OFI_NCCL_DIR": other}, probes)
    assert p.env.set["LD_LIBRARY_PATH"] == f"{HWLOC}:{other}"
    # --no-nccl-env: no NCCL_NET, no plugin needed.
    p = plan({"PBS_NODEFILE": nf}, polaris(files=()), Options(dry_run=True, nccl_env=False))
    assert "ofi_nccl" not in p.description and not p.warnings


def test_pbs_without_the_plugin_leaves_nccl_net_unset(tmp_path, monkeypatch, capfd):
    """No plugin: one line says so before mpiexec starts, and the ranks get
    no NCCL_NET (NCCL would stop on a plugin that fails to load), even one
    the environment had."""
    nf = nodefile(tmp_path)
    env = {"PBS_NODEFILE": nf, "NCCL_NET": "AWS Libfabric", "NCCL_CROSS_NIC": "1"}
    p = plan(env, polaris(files=()))
    ranks = p.env.apply(env)
    assert not any(k.startswith("NCCL_") for k in ranks)
    assert ranks["FI_MR_CACHE_MONITOR"] == "userfaultfd" and "LD_LIBRARY_PATH" not in ranks
    assert "nccl_env=off(no-plugin) ofi_nccl=missing" in p.description
    (line,) = [w for w in p.warnings if "aws-ofi-nccl" in w]
    assert line.startswith(f"no aws-ofi-nccl plugin (libnccl-net*.so) in {PLUGIN} or on "
                           "LD_LIBRARY_PATH: NCCL_NET and the other NCCL_* network settings are "
                           "left unset")
    # A real launch prints that line before mpiexec runs.
    monkeypatch.setattr(launch_plan, "Probes", lambda: polaris(files=()))
    for k in list(os.environ):
        if k.startswith(("PBS_", "PRELORA_", "NCCL_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PBS_NODEFILE", nf)
    monkeypatch.setenv("NCCL_NET", "AWS Libfabric")
    monkeypatch.setenv("PRELORA_MPIEXEC", str(ROOT / "tests" / "no-such-mpiexec"))
    code = launch_plan.main(["--stop-before", "0", "--", "prelora-bench"])
    err = capfd.readouterr().err
    assert code == 127                       # the (missing) mpiexec: nothing ran
    assert f"prelora-launch: warning: {line}\n" in err
    assert err.index("aws-ofi-nccl") < err.index("+ ")


def qstat_answer(walltime="01:00:00", used="00:00:00", started_ago=100):
    text = (f"Job Id: 1.polaris\n    Resource_List.walltime = {walltime}\n"
            f"    resources_used.walltime = {used}\n")
    if started_ago is None:
        return text
    return text + time.strftime("    stime = %a %b %e %H:%M:%S %Y\n", time.localtime(NOW - started_ago))


def test_pbs_stop_timer_from_qstat(tmp_path):
    env = {"PBS_NODEFILE": nodefile(tmp_path), "PBS_JOBID": "1.polaris"}
    probes = FakeProbes(commands=["qstat"], answers={"qstat": qstat_answer()})
    p = plan(env, probes)
    # 3600 s walltime - 100 s elapsed - 300 s margin.
    assert p.description.endswith("stop_before=300s (SIGTERM in 3200s)") and p.stop_in == 3200
    p = plan(env, probes, Options(dry_run=True, stop_before=0))
    assert p.description.endswith("stop_before=off") and p.stop_in is None
    # Without a start time, the (lagging) used-walltime counter.
    probes = FakeProbes(commands=["qstat"],
                        answers={"qstat": qstat_answer(used="00:10:00", started_ago=None)})
    assert plan(env, probes).stop_in == 3600 - 600 - 300
    # Past the margin already: at once.
    probes = FakeProbes(commands=["qstat"], answers={"qstat": qstat_answer(walltime="00:05:00")})
    assert plan(env, probes).stop_in == 1
    # No qstat: the scheduler's own signal.
    p = plan(env, FakeProbes())
    assert p.stop_in is None and "walltime unknown: relying on the scheduler's signal" in p.description


@pytest.mark.parametrize("text, seconds", [("01:00:00", 3600), ("05:30", 330), ("42", 42),
                                           ("1-02:00:00", 93600), ("UNLIMITED", None), ("", None)])
def test_parse_duration(text, seconds):
    assert launch_plan.parse_duration(text) == seconds


# --------------------------------------------------------------------------- #
# Slurm and a workstation


def slurm_probes(gpus=4):
    return FakeProbes(gpus=gpus, commands=["srun", "scontrol"],
                      answers={"scontrol": "nid001000\nnid001001\n"})


SLURM = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4",
         "SLURM_JOB_NODELIST": "nid[001000-001001]", "SLURM_CPUS_PER_TASK": "32"}


def test_slurm():
    p = plan(dict(SLURM), slurm_probes())
    argv = p.argv
    assert argv[0] == f"{BIN}/srun" and "--mpi=pmi2" in argv
    assert follows(argv, "-n", "8") and follows(argv, "--ntasks-per-node", "4")
    assert "--cpu-bind=cores" in argv and follows(argv, "-c", "32")
    assert "--gpus-per-task=1" in argv and "--gpu-bind=none" in argv
    assert AFFINITY not in argv
    i = argv.index(TRAIN)
    assert argv[i + 1:] == ["--config", CONFIG, "--output-dir", "runs/x"]
    assert "master_addr=nid001000" in p.description and "nodes=2" in p.description
    assert "binding=cores:32" in p.description and p.stop_in is None
    # Through mpiexec instead of srun.
    p = plan(dict(SLURM), slurm_probes(), Options(dry_run=True, launcher="mpiexec"))
    assert p.argv[:6] == [f"{BIN}/mpiexec", "-n", "8", "--ppn", "4", TRAIN]
    assert "binding=launcher-default" in p.description
    # A CPU partition: no GPU options; the site's own srun MPI plugin.
    env = {**SLURM, "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1", "PRELORA_SRUN_MPI": ""}
    p = plan(env, slurm_probes(gpus=0))
    assert follows(p.argv, "-n", "2") and not any(a.startswith(("--gpu", "--mpi")) for a in p.argv)
    # Slurm's count of the job's GPUs wins over the node's; GPUs give the ranks per node.
    env = {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2"}
    p = plan(env, FakeProbes(gpus=4, commands=["srun"]))
    assert follows(p.argv, "--ntasks-per-node", "2") and "master_addr=workstation" in p.description
    # A high-speed-network suffix, when given.
    p = plan({**SLURM, "PRELORA_HSN_SUFFIX": "-hsn"}, slurm_probes())
    assert p.env.set["PRELORA_MASTER_ADDR"] == "nid001000-hsn"


def test_slurm_stop_timer_from_squeue():
    probes = slurm_probes()
    probes.ok = lambda argv: "15:00\n" if os.path.basename(argv[0]) == "squeue" else "nid001000\n"
    probes.which = lambda name, path=None: f"{BIN}/{name}"
    p = plan(dict(SLURM), probes, Options(dry_run=True, stop_before=60))
    assert p.stop_in == 840
    assert plan(dict(SLURM), probes).stop_in is None        # 0 by default: #SBATCH --signal


def test_local():
    p = plan({}, FakeProbes())
    assert p.argv == [f"{BIN}/mpiexec", "-n", "2", TRAIN, "--config", CONFIG, "--output-dir", "runs/x"]
    assert p.description.startswith("scheduler=local nodes=1 ranks_per_node=2 ranks=2")
    assert p.env.set == {}
    assert plan({"NP": "3"}, FakeProbes()).argv[1:3] == ["-n", "3"]
    assert plan({"NP": "3"}, FakeProbes(), Options(dry_run=True, np=4)).argv[1:3] == ["-n", "4"]
    with pytest.raises(UsageError, match="NP must be a whole number > 0, got 'x'"):
        plan({"NP": "x"}, FakeProbes())
    # --local inside a job: this machine only.
    p = plan({"SLURM_JOB_ID": "1", "NP": "3"}, FakeProbes(), Options(dry_run=True, local=True))
    assert "scheduler=local" in p.description and p.argv[1:3] == ["-n", "3"]


def test_any_program():
    p = plan({}, FakeProbes(), program=["prelora-bench", "--preset", "vit-large"])
    assert p.argv == [f"{BIN}/mpiexec", "-n", "2", f"{BIN}/prelora-bench", "--preset", "vit-large"]


def test_prefers_the_mpiexec_beside_the_program(tmp_path):
    for name in ("prelora-train", "mpiexec"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    probes = FakeProbes()
    probes.which = lambda name, path=None: str(tmp_path / name) if name == "prelora-train" \
        else f"{BIN}/{name}"
    assert plan({}, probes).argv[0] == str(tmp_path / "mpiexec")
    p = plan({"PRELORA_MPIEXEC": "/opt/site/bin/mpiexec"}, probes)
    assert p.argv[0] == "/opt/site/bin/mpiexec"
    # No mpiexec beside it: the first on PATH.
    (tmp_path / "mpiexec").unlink()
    assert plan({}, probes).argv[0] == f"{BIN}/mpiexec"


# --------------------------------------------------------------------------- #
# Options and usage errors


def test_parse_args():
    opts, program = launch_plan.parse_args(["--np=4", "--ppn", "2", "--dry-run", "--", "prelora-bench",
                                         "--np", "9"])
    assert (opts.np, opts.ppn, opts.dry_run) == (4, 2, True)
    assert program == ["prelora-bench", "--np", "9"]
    # A config in the program's place means prelora-train, with or without "--".
    for argv in (["--", "c.yaml", "x=1"], ["c.yaml", "x=1"]):
        assert launch_plan.parse_args(argv)[1] == ["prelora-train", "--config", "c.yaml", "x=1"]
    assert launch_plan.parse_args(["--stop-before", "0", "--no-nccl-env", "true"])[0].nccl_env is False
    assert launch_plan.config_of(["/x/prelora", "train", "--config=a.yaml"]) == "a.yaml"
    assert launch_plan.config_of(["prelora-bench", "--config", "a.yaml"]) is None


@pytest.mark.parametrize("args, message", [
    (["--bogus", "--", "c.yaml"], "unknown option --bogus (see --help)"),
    (["--launcher", "aprun", "--", "c.yaml"], "--launcher must be mpiexec or srun, got 'aprun'"),
    (["--ppn", "0", "--", "c.yaml"], "--ppn must be > 0"),
    (["--np", "two", "--", "c.yaml"], "--np must be a whole number, got 'two'"),
    (["--depth"], "--depth needs a value"),
    (["--"], "missing PROGRAM"),
])
def test_usage_errors_in_the_options(args, message):
    with pytest.raises(UsageError) as e:
        launch_plan.parse_args(args)
    assert str(e.value).startswith(message)


def test_usage_errors_of_the_launch(tmp_path):
    probes = FakeProbes()
    with pytest.raises(UsageError, match="--launcher srun needs a Slurm job"):
        plan({}, probes, Options(launcher="srun"))
    with pytest.raises(UsageError, match="--launcher srun needs a Slurm job"):
        plan({"PBS_NODEFILE": nodefile(tmp_path)}, probes, Options(launcher="srun"))
    # A missing config or program: only a dry run tolerates it, with a warning.
    missing = ["prelora-train", "--config", "configs/does_not_exist.yaml"]
    with pytest.raises(UsageError, match="config configs/does_not_exist.yaml does not exist"):
        plan({}, probes, Options(), program=missing)
    assert "config configs/does_not_exist.yaml does not exist here" in \
        plan({}, probes, program=missing).warnings
    with pytest.raises(UsageError, match="prelora-nothing is not on PATH: activate"):
        plan({}, probes, Options(), program=["prelora-nothing"])
    with pytest.raises(UsageError, match="PBS_NODEFILE=/no/such/file is not readable"):
        plan({"PBS_NODEFILE": "/no/such/file"}, probes)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="lists no hosts"):
        plan({"PBS_NODEFILE": str(tmp_path / "empty")}, probes)


def test_main_usage_error_is_one_line_and_exit_2(capsys):
    assert launch_plan.main(["--ppn", "x", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err == "prelora-launch: --ppn must be a whole number, got 'x'\n"


def test_main_help(capsys):
    assert launch_plan.main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--dry-run", "--print", "--layout", "--no-nccl-env", "--stop-before", "--local"):
        assert option in out


@pytest.fixture
def workstation(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("PBS_", "SLURM_", "PRELORA_")) or k == "NP":
            monkeypatch.delenv(k)
    monkeypatch.setenv("PRELORA_MPIEXEC", "/opt/mpi/bin/mpiexec")


def test_main_prints_the_line(workstation, capsys):
    true = launch_plan.find_program("true", dict(os.environ), launch_plan.Probes())
    assert launch_plan.main(["--print", "--np", "3", "--", "true", "a b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [shlex.join(["/opt/mpi/bin/mpiexec", "-n", "3", true, "a b"])]
    assert launch_plan.main(["--dry-run", "--", "true"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# scheduler=local nodes=1 ranks_per_node=2 ranks=2 ")
    assert shlex.split(out[-1]) == ["/opt/mpi/bin/mpiexec", "-n", "2", true]
    assert launch_plan.main(["--layout", "--np", "4"]) == 0
    assert capsys.readouterr().out.startswith("scheduler=local nodes=1 ranks_per_node=4 ranks=4 ")


def test_main_dry_run_lists_the_ranks_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PBS_NODEFILE", nodefile(tmp_path))
    monkeypatch.setenv("PRELORA_MPI_FLAVOUR", "pals")
    monkeypatch.setenv("PRELORA_HSN_SUFFIX", "")
    monkeypatch.setenv("PRELORA_TMPDIR", "/scratch dir")
    monkeypatch.delenv("PRELORA_MASTER_ADDR", raising=False)
    assert launch_plan.main(["--dry-run", "--", "true"]) == 0
    out = capsys.readouterr().out.splitlines()
    env_line = next(line for line in out if line.startswith("# env: "))
    assert shlex.split(env_line[len("# env: "):]) == [f"PRELORA_MASTER_ADDR={HOSTS[0]}",
                                                      "TMPDIR=/scratch dir"]


# --------------------------------------------------------------------------- #
# Running the line: exit status and the stop timer


def _plan(argv, stop_in, stop_before=1):
    return launch_plan.Plan(argv, launch_plan.LaunchEnv(), "", [], stop_in, stop_before)


@pytest.mark.parametrize("code", [0, 3, 85])
def test_run_passes_the_exit_status_through(code):
    p = _plan([sys.executable, "-c", f"raise SystemExit({code})"], stop_in=60)
    assert launch_plan.run(p, dict(os.environ)) == code


def test_run_stops_the_program_before_the_walltime(capfd):
    """The stop timer sends SIGTERM; the program's 85 (checkpointed) comes out."""
    prog = "trap 'kill $!; exit 85' TERM; sleep 30 & wait; exit 1"
    t0 = time.monotonic()
    assert launch_plan.run(_plan(["sh", "-c", prog], stop_in=1, stop_before=4),
                        dict(os.environ)) == 85
    assert time.monotonic() - t0 < 20
    assert "walltime ends in 4s: asking the trainer to checkpoint and stop" in capfd.readouterr().err


def test_exit_status_of_a_signalled_program():
    assert launch_plan.run(_plan([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
                              stop_in=60), dict(os.environ)) == 128 + signal.SIGKILL


# --------------------------------------------------------------------------- #
# The job chain: the successor's submission and its confirmation

# `qstat -f` of a job submitted to prod and routed to small; PBS wraps long
# values onto tab-indented lines and escapes commas inside -v values.
QSTAT_F = """Job Id: 77.polaris-pbs-01
    Job_Name = vitl
    job_state = R
    queue = small
    Account_Name = MyProject
    Join_Path = oe
    Keep_Files = doe
    Resource_List.eagle_fs = True
    Resource_List.filesystems = home:eagle
    Resource_List.ncpus = 640
    Resource_List.nodect = 10
    Resource_List.place = scatter
    Resource_List.select = 10:system=polaris
    Resource_List.walltime = 03:00:00
    Variable_List = PBS_O_HOME=/home/u,PBS_O_QUEUE=prod,PBS_O_WORKDIR=/lus/eagle/pr
\tojects/MyProject/prelora_hpc,PRELORA_RUN_DIR=/lus/eagle/projects/MyProject/ru
\tns/a,PRELORA_NOTE=a\\,b,MY_SETTING=1
    stime = Wed Dec  2 01:00:00 2026
"""


def test_parse_qstat_full():
    info = launch_plan.parse_qstat_full(QSTAT_F)
    assert info["Resource_List.select"] == "10:system=polaris" and info["queue"] == "small"
    assert launch_plan.parse_variable_list(info["Variable_List"]) == {
        "PBS_O_HOME": "/home/u", "PBS_O_QUEUE": "prod",
        "PBS_O_WORKDIR": "/lus/eagle/projects/MyProject/prelora_hpc",
        "PRELORA_RUN_DIR": "/lus/eagle/projects/MyProject/runs/a", "PRELORA_NOTE": "a,b",
        "MY_SETTING": "1"}


def test_pbs_successor_repeats_every_option():
    """The successor asks for what this job asked for: account, the queue it
    was submitted to (prod, not the execution queue small), name, resources
    and -v variables; the template's variables at their current values;
    PRELORA_SUBMIT_ARGS last, so it wins."""
    env = {"PBS_JOBID": "77.polaris-pbs-01", "PRELORA_RUN_DIR": "/lus/eagle/projects/MyProject/runs/a",
           "PRELORA_CONFIG": "configs/x.yaml", "PRELORA_SUBMIT_ARGS": "-l walltime=02:00:00"}
    argv, notes = launch_plan.pbs_resubmission(env, launch_plan.parse_qstat_full(QSTAT_F),
                                            "jobs/polaris.pbs", ["PRELORA_RUN_DIR", "PRELORA_CONFIG",
                                                                 "PRELORA_UNSET"], 4)
    assert notes == []
    assert argv[:3] == ["qsub", "-W", "depend=afterany:77.polaris-pbs-01"]
    for option in (("-A", "MyProject"), ("-q", "prod"), ("-N", "vitl"), ("-j", "oe"),
                   ("-l", "select=10:system=polaris"), ("-l", "place=scatter"),
                   ("-l", "walltime=03:00:00"), ("-l", "filesystems=home:eagle")):
        assert follows(argv, *option), option
    # Resources PBS and the site derive are not asked for again.
    assert not any(a.startswith(("ncpus", "nodect", "eagle_fs")) for a in argv)
    assert argv.index("walltime=02:00:00") > argv.index("walltime=03:00:00")
    assert argv[-3] == "-v" and argv[-1] == "jobs/polaris.pbs"
    carried = argv[-2].split(",")
    assert carried[0] == "PRELORA_MAX_RESUBMITS=4"
    assert set(carried[1:]) == {"PRELORA_RUN_DIR=/lus/eagle/projects/MyProject/runs/a",
                                "PRELORA_NOTE='a", "b'", "MY_SETTING=1",
                                "PRELORA_CONFIG=configs/x.yaml",
                                "PRELORA_SUBMIT_ARGS=-l walltime=02:00:00"}
    # Without qstat's answer: the queue and account from the environment, and a note.
    argv, notes = launch_plan.pbs_resubmission({**env, "PBS_O_QUEUE": "prod", "PBS_ACCOUNT": "P"}, {},
                                            "jobs/polaris.pbs", [], 0)
    assert follows(argv, "-A", "P") and follows(argv, "-q", "prod") and "select" not in " ".join(argv)
    assert notes and "#PBS lines" in notes[0]


def test_debug_scaling_cannot_chain():
    for queue in ("debug", "prod", "small"):
        assert launch_plan.chain_break({"PBS_QUEUE": queue}, {}) is None
    why = launch_plan.chain_break({"PBS_QUEUE": "debug-scaling"}, {})
    assert why.startswith("queue debug-scaling holds one job per user") and "prod" in why
    assert launch_plan.chain_break({}, {"queue": "debug-scaling"}) == why


def chain_probes(qsub=(0, "78.polaris-pbs-01\n"), known=True, queue="small"):
    """A PBS job's commands: qstat -f answers QSTAT_F (in ``queue``), qsub
    answers ``qsub``, qstat JOBID finds the new job when ``known``."""
    calls = []

    def run(argv):
        calls.append(list(argv))
        if os.path.basename(argv[0]) == "qsub":
            return qsub
        return (0, "78.polaris-pbs-01 prelora u 0 H prod\n") if known else \
            (153, "qstat: Unknown Job Id 78.polaris-pbs-01\n")

    probes = FakeProbes(commands=["qstat", "qsub"],
                        answers={"qstat": QSTAT_F.replace("queue = small", f"queue = {queue}")})
    probes.run = run
    return probes, calls


ENV = {"PBS_JOBID": "77.polaris-pbs-01", "PRELORA_MAX_RESUBMITS": "3"}
SUBMIT = ["submit", "--vars", "PRELORA_RUN_DIR", "--left", "2", "jobs/polaris.pbs"]


def test_chain_submits_and_confirms(capsys):
    probes, calls = chain_probes()
    assert launch_plan.chain_main(SUBMIT, dict(ENV), probes) == 0
    out = capsys.readouterr().out
    assert calls[0][0] == "qsub" and follows(calls[0], "-q", "prod")
    assert calls[1] == [f"{BIN}/qstat", "78.polaris-pbs-01"]
    assert "resubmit.sh: submitted: 78.polaris-pbs-01\nresubmit.sh: qstat shows job 78.polaris-pbs-01 " \
           "in the queue" in out


def test_chain_reports_a_successor_that_vanished(capsys):
    """qsub returned 0 but qstat does not know the job (a prod job that fits
    no execution queue): an error, exit 1."""
    probes, _ = chain_probes(known=False)
    assert launch_plan.chain_main(SUBMIT, dict(ENV), probes) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "resubmit.sh: error: qsub answered '78.polaris-pbs-01' but qstat does not show job "
        "78.polaris-pbs-01: the successor is not queued and the chain ends here")
    probes, _ = chain_probes(qsub=(38, "qsub: Job violates queue and/or server resource limits"))
    assert launch_plan.chain_main(SUBMIT, dict(ENV), probes) == 1
    assert "submission failed (exit 38): qsub: Job violates" in capsys.readouterr().err


def test_chain_in_debug_scaling(capsys):
    """At job start the job says it cannot queue its successor; at its end
    it does not try."""
    probes, calls = chain_probes(queue="debug-scaling")
    env = {**ENV, "PBS_QUEUE": "debug-scaling"}
    assert launch_plan.chain_main(["check"], env, probes) == 0
    assert capsys.readouterr().out.startswith(
        "resubmit.sh: queue debug-scaling holds one job per user, running or queued: this job "
        "cannot queue its successor, so the chain ends with it")
    assert launch_plan.chain_main(SUBMIT, env, probes) == 0
    assert calls == [] and "no resubmission: queue debug-scaling" in capsys.readouterr().out
    # Nothing to say where the job may chain, or may not resubmit at all.
    assert launch_plan.chain_main(["check"], {**ENV, "PBS_QUEUE": "prod"}, chain_probes()[0]) == 0
    assert launch_plan.chain_main(["check"], {**env, "PRELORA_MAX_RESUBMITS": "0"}, probes) == 0
    assert capsys.readouterr().out == ""
