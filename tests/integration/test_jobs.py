"""Job templates and launch scripts: scripts/launch.sh reaching prelora-launch
under faked PBS and Slurm environments (the launch decisions case by case are
tests/unit/test_launch_plan.py), exit statuses and the walltime stop through it,
per-rank GPU affinity, the resubmission decision, signal handling of both
templates end to end (with fake schedulers and a fake trainer), and one real
2-rank training run through scripts/launch.sh.

No scheduler is needed: qsub, qstat, sbatch, scancel, scontrol, srun, mpiexec
and nvidia-smi are small fakes on PATH that record how they were called.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch.sh"
AFFINITY = ROOT / "scripts" / "gpu_affinity.sh"
NODE_WATCH = ROOT / "scripts" / "node_watch.sh"
RESUBMIT = ROOT / "scripts" / "resubmit.sh"
STAGE = ROOT / "scripts" / "stage_data.sh"
VENV_CHECK = ROOT / "scripts" / "venv_versions.py"
PBS = ROOT / "jobs" / "polaris.pbs"
CONVERT = ROOT / "jobs" / "convert.pbs"
SBATCH = ROOT / "jobs" / "slurm.sbatch"
CONFIG = "configs/vit_large_imagenet1k.yaml"

HOSTS = ["x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov", "x3006c0s19b1n0.hsn.cm.polaris.alcf.anl.gov"]

# Variables of a real job or launcher that must not leak into the fakes.
_LEAKY = ("PBS_", "SLURM_", "PRELORA_", "PMI_", "PALS_", "OMPI_", "MPI_LOCALRANKID",
          "CUDA_VISIBLE_DEVICES", "NCCL_", "FI_")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY) and k != "NP"}

# The fake trainer: records how it was started, exits 85 when SIGTERM or
# SIGUSR1 arrives (as prelora-train does after its checkpoint), else
# FAKE_EXIT after FAKE_RUN_S seconds.
FAKE_TRAINER = """\
#!{python}
import os, signal, sys, time
log = os.environ["FAKE_LOG"]
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda num, frame: got.append(num))
with open(os.path.join(log, "trainer.args"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
open(os.path.join(log, "ready"), "w").close()
deadline = time.time() + float(os.environ.get("FAKE_RUN_S", "30"))
while not got and time.time() < deadline:
    time.sleep(0.05)
with open(os.path.join(log, "trainer.result"), "a") as f:
    f.write("signals=%s cuda=%s\\n" % (got, os.environ.get("CUDA_VISIBLE_DEVICES", "-")))
sys.exit(85 if got else int(os.environ.get("FAKE_EXIT", "0")))
"""


class Fakes:
    """A directory of fake commands put first on PATH, and a log directory."""

    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "fakebin"
        self.log = tmp_path / "log"
        self.bin.mkdir()
        self.log.mkdir()
        self.tmp = tmp_path

    def add(self, name: str, body: str) -> Path:
        p = self.bin / name
        p.write_text(body if body.startswith("#!") else "#!/bin/bash\n" + textwrap.dedent(body))
        p.chmod(0o755)
        return p

    def gpus(self, n: int) -> None:
        if n:
            lines = "".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i})'\n" for i in range(n))
            self.add("nvidia-smi", lines)
        else:
            # What nvidia-smi says on a node whose driver finds no GPU.
            self.add("nvidia-smi", "echo 'No devices were found'; exit 6\n")

    def trainer(self) -> Path:
        return self.add("prelora-train", FAKE_TRAINER.format(python=sys.executable))

    def recorder(self, name: str, stdout: str = "", then: str = "") -> None:
        """A command that appends its arguments, one per line, to log/NAME.args."""
        self.add(name, f"""
            printf '%s\\n' "$@" >> "$FAKE_LOG/{name}.args"; echo '--' >> "$FAKE_LOG/{name}.args"
            {f"echo {shlex.quote(stdout)}" if stdout else ""}
            {then}
        """)

    def args(self, name: str) -> list[str]:
        p = self.log / f"{name}.args"
        return p.read_text().splitlines() if p.exists() else []

    def env(self, **extra) -> dict:
        env = _clean_env()
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_LOG"] = str(self.log)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def mpiexec(self, flavour: str, body: str = "exit 0") -> Path:
        """A fake mpiexec that answers --version as FLAVOUR's does, else runs BODY.

        Cray PALS' is installed under /opt/cray/pals/VERSION/bin on Polaris:
        the fake lives under such a path too, linked from the fake bin.
        """
        version = {"pals": "", "hydra": "HYDRA build details:\n    Version: 5.0.2",
                   "openmpi": "mpiexec (Open MPI) 5.0.5", "unknown": "mpiexec 1.0"}[flavour]
        script = f'[ "$1" = --version ] && {{ printf "{version}\\n"; exit 0; }}\n{textwrap.dedent(body)}'
        if flavour != "pals":
            return self.add("mpiexec", script)
        real = self.tmp / "opt" / "cray" / "pals" / "1.4" / "bin" / "mpiexec"
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_text("#!/bin/bash\n" + script)
        real.chmod(0o755)
        link = self.bin / "mpiexec"
        link.unlink(missing_ok=True)
        link.symlink_to(real)
        return link

    def resolvable(self, *names: str) -> None:
        """A fake getent: only NAMES resolve (as on a node whose hosts file has them)."""
        listed = " ".join(shlex.quote(n) for n in names)
        self.add("getent", f"""
            [ "$1" = hosts ] || exit 2
            for n in {listed}; do [ "$2" = "$n" ] && {{ echo "10.0.0.1 $n"; exit 0; }}; done
            exit 2
        """)

    def nodefile(self, hosts=HOSTS, slots=4) -> Path:
        p = self.tmp / "nodefile"
        # PBS writes each host once per MPI slot.
        p.write_text("".join(f"{h}\n" for h in hosts for _ in range(slots)))
        return p


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def run(cmd, env, timeout=60, **kw):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def dry_run(fakes, env, *launch_args, train_args=("--output-dir", "runs/x")):
    """scripts/launch.sh --dry-run; returns (comment lines, command as argv)."""
    r = run([LAUNCH, "--dry-run", *launch_args, "--", CONFIG, *train_args], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 1, r.stdout
    return "\n".join(comments), shlex.split(commands[0])


def follows(argv, *seq):
    """True if the tokens seq appear consecutively in argv."""
    n = len(seq)
    return any(tuple(argv[i:i + n]) == seq for i in range(len(argv) - n + 1))


# --------------------------------------------------------------------------- #
# Syntax and content of the files themselves.


@pytest.mark.parametrize("path", [LAUNCH, AFFINITY, RESUBMIT, NODE_WATCH, STAGE, PBS, SBATCH,
                                  CONVERT, ROOT / "scripts" / "polaris_venv.sh"],
                         ids=lambda p: p.name)
def test_scripts_parse(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", [LAUNCH, AFFINITY, RESUBMIT, NODE_WATCH, STAGE, VENV_CHECK,
                                  ROOT / "scripts" / "stage_data.py",
                                  ROOT / "scripts" / "polaris_venv.sh"], ids=lambda p: p.name)
def test_scripts_are_executable(path):
    assert os.access(path, os.X_OK)


def test_pbs_template_directives():
    text = PBS.read_text()
    for directive in ("#PBS -A ", "#PBS -q ", "#PBS -l select=", "system=polaris",
                      "#PBS -l place=scatter", "#PBS -l walltime=",
                      "#PBS -l filesystems=home:eagle", "#PBS -j oe"):
        assert directive in text, directive


def test_slurm_template_directives():
    text = SBATCH.read_text()
    for directive in ("#SBATCH -A ", "#SBATCH -q ", "#SBATCH -C gpu", "#SBATCH --nodes=",
                      "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                      "#SBATCH --cpus-per-task=32", "#SBATCH -t ", "#SBATCH --signal=B:USR1@300"):
        assert directive in text, directive
    assert "SLURM_SUBMIT_DIR" in text and "scripts/resubmit.sh" in text


@pytest.mark.parametrize("path", [LAUNCH, AFFINITY, RESUBMIT, NODE_WATCH, STAGE, PBS, SBATCH,
                                  CONVERT], ids=lambda p: p.name)
def test_no_personal_paths(path):
    text = path.read_text()
    for bad in ("/home/", "/Users/", "/global/homes/", "/work/main"):
        assert bad not in text, f"{path.name} mentions {bad}"


def test_reference_config_keeps_its_global_batch_on_any_node_count():
    """The reference run's 4096 images per step hold on 1 to 64 Polaris nodes
    (4 ranks each), the accumulation derived; a count that cannot keep it is
    refused in one line."""
    from prelora_hpc.config import load_config
    from prelora_hpc.engine import BatchSizeError, accumulation_steps, global_batch

    cfg = load_config(ROOT / CONFIG)
    for nodes in (1, 2, 8, 32, 64):
        assert global_batch(cfg, 4 * nodes) == 4096
    assert accumulation_steps(cfg, 8) == 32 and accumulation_steps(cfg, 256) == 1
    with pytest.raises(BatchSizeError) as e:
        global_batch(cfg, 4 * 3)
    assert "\n" not in str(e.value) and "4096" in str(e.value)


# --------------------------------------------------------------------------- #
# scripts/launch.sh --dry-run: the wrapper reaches prelora-launch, whose
# decisions tests/unit/test_launch_plan.py checks case by case; here they run
# against real (fake) commands: nvidia-smi, mpiexec --version, getent, scontrol.


def polaris(fakes, gpus=4):
    """A Polaris node: Cray PALS' mpiexec, GPUs, high-speed-network names that
    resolve, the aws-ofi-nccl plugin (in a directory PRELORA_OFI_NCCL_DIR names)."""
    fakes.gpus(gpus)
    fakes.trainer()
    fakes.mpiexec("pals")
    fakes.resolvable(*HOSTS, "x3006c0s13b0n0.hsn.example")
    plugin = fakes.tmp / "aws-ofi-nccl" / "lib"
    plugin.mkdir(parents=True, exist_ok=True)
    (plugin / "libnccl-net.so").write_text("")
    return plugin


def env_line(comments: str) -> dict:
    """The variables a dry run lists in its "# env:" line."""
    line = next(c for c in comments.splitlines() if c.startswith("# env: "))
    return dict(w.split("=", 1) for w in shlex.split(line[len("# env: "):]))


def test_launch_pbs(fakes):
    plugin = polaris(fakes)
    nodefile = fakes.nodefile()
    comments, argv = dry_run(fakes, fakes.env(PBS_NODEFILE=nodefile, PBS_JOBID="1.polaris",
                                              PRELORA_OFI_NCCL_DIR=plugin))
    assert follows(argv, "-n", "8") and follows(argv, "--ppn", "4") and "--cpu-bind" in argv
    assert "--envall" in argv and follows(argv, "--hostfile", str(nodefile))
    # The affinity wrapper comes right before the trainer.
    i = argv.index(str(AFFINITY))
    assert argv[i + 1] == str(fakes.bin / "prelora-train")
    assert argv[i + 2:] == ["--config", CONFIG, "--output-dir", "runs/x"]
    assert "nodes=2" in comments and "ranks_per_node=4" in comments and "ranks=8" in comments
    assert "mpi=pals" in comments and f"ofi_nccl={plugin}" in comments
    assert "master_addr=x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov" in comments
    exported = env_line(comments)
    assert exported["NCCL_NET"] == "AWS Libfabric" and exported["NCCL_NET_GDR_LEVEL"] == "PHB"
    assert exported["LD_LIBRARY_PATH"].split(":")[0] == str(plugin)
    assert exported["FI_CXI_DEFAULT_CQ_SIZE"] == "131072" and exported["TMPDIR"] == "/tmp"
    assert "warning: --depth" not in comments


def test_launch_pbs_hydra_and_depth_warning(fakes):
    """mpiexec --version names Hydra; the config's workers are read for the warning."""
    fakes.gpus(0)
    fakes.trainer()
    fakes.mpiexec("hydra")
    fakes.resolvable("emu0", "emu1")
    nodefile = fakes.nodefile(hosts=["emu0", "emu1"], slots=2)
    comments, argv = dry_run(fakes, fakes.env(PBS_NODEFILE=nodefile), "--ppn", "2", "--depth", "8")
    assert follows(argv, "-hosts", "emu0,emu1") and follows(argv, "-bind-to", "core:8")
    assert "mpi=hydra" in comments and "master_addr=emu0 " in comments
    assert "warning: --depth 8 is not above data.num_workers=8" in comments
    assert env_line(comments)["HYDRA_LAUNCHER_EXEC"] == str(NODE_WATCH)


def test_launch_pbs_stop_timer_from_qstat(fakes):
    fakes.gpus(0)
    fakes.add("qstat", """
        cat <<EOT
        Job Id: $2
            Resource_List.walltime = 01:00:00
            resources_used.walltime = 00:00:00
            stime = $(date -d '-100 seconds' '+%a %b %e %H:%M:%S %Y')
        EOT
    """)
    env = fakes.env(PBS_NODEFILE=fakes.nodefile(), PBS_JOBID="1.polaris")
    comments, _ = dry_run(fakes, env)
    # 3600 s walltime - 100 s elapsed - 300 s margin, give or take a second.
    assert "stop_before=300s (SIGTERM in 32" in comments, comments
    comments, _ = dry_run(fakes, env, "--stop-before", "0")
    assert "stop_before=off" in comments


def test_launch_slurm(fakes):
    fakes.gpus(4)
    fakes.trainer()
    fakes.add("scontrol", '[ "$1 $2" = "show hostnames" ] && printf "nid001000\\nnid001001\\n"')
    env = fakes.env(SLURM_JOB_ID=42, SLURM_JOB_NUM_NODES=2, SLURM_NTASKS_PER_NODE=4,
                    SLURM_JOB_NODELIST="nid[001000-001001]", SLURM_CPUS_PER_TASK=32)
    comments, argv = dry_run(fakes, env)
    assert Path(argv[0]).name == "srun" and "--mpi=pmi2" in argv
    assert follows(argv, "-n", "8") and follows(argv, "--ntasks-per-node", "4")
    assert follows(argv, "-c", "32") and "--gpus-per-task=1" in argv
    i = argv.index(str(fakes.bin / "prelora-train"))
    assert argv[i + 1:] == ["--config", CONFIG, "--output-dir", "runs/x"]
    assert "master_addr=nid001000" in comments and "nodes=2" in comments


def test_launch_local_any_program(fakes):
    fakes.gpus(0)
    fakes.trainer()
    _, argv = dry_run(fakes, fakes.env())
    assert Path(argv[0]).name == "mpiexec" and argv[1:3] == ["-n", "2"]
    assert argv[3:] == [str(fakes.bin / "prelora-train"), "--config", CONFIG, "--output-dir", "runs/x"]
    _, argv = dry_run(fakes, fakes.env(NP=3), "--np", "4")
    assert argv[1:3] == ["-n", "4"]
    # Another program than the trainer, after "--".
    bench = fakes.add("prelora-bench", "exit 0")
    r = run([LAUNCH, "--print", "--", "prelora-bench", "--preset", "toy"], fakes.env())
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[1:] == ["-n", "2", str(bench), "--preset", "toy"]


def test_launch_without_prelora_launch_on_path(fakes):
    """Outside the venv the wrapper runs the package from this checkout."""
    python3 = shutil.which("python3", path="/usr/bin:/bin")
    if python3 is None:
        pytest.skip("no python3 in /usr/bin or /bin")
    fakes.trainer()
    env = fakes.env()
    env["PATH"] = f"{fakes.bin}{os.pathsep}/usr/bin{os.pathsep}/bin"
    comments, argv = dry_run(fakes, env)
    assert "scheduler=local" in comments and argv[-4:] == ["--config", CONFIG, "--output-dir", "runs/x"]


@pytest.mark.parametrize("args, option", [
    (["--bogus", "--", CONFIG], "--bogus"),
    (["--launcher", "srun", "--", CONFIG], "--launcher srun"),     # not in a Slurm job
    (["--ppn", "0", "--", CONFIG], "--ppn"),
    (["--"], "PROGRAM"),                                           # nothing to run
    (["--", "configs/does_not_exist.yaml"], "configs/does_not_exist.yaml"),   # only a dry run tolerates that
])
def test_launch_usage_errors(fakes, args, option):
    fakes.trainer()
    r = run([LAUNCH, *args], fakes.env())
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prelora-launch: ") and option in lines[0]


def test_launch_help():
    r = run([LAUNCH, "--help"], os.environ)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--no-nccl-env" in r.stdout


# --------------------------------------------------------------------------- #
# scripts/launch.sh for real, with a fake launcher and trainer.


@pytest.mark.parametrize("code", [0, 3, 85, 130])
def test_launch_propagates_exit_code(fakes, code):
    fakes.gpus(0)
    fakes.trainer()
    fakes.add("mpiexec", 'while [ $# -gt 0 ] && [[ $1 != */prelora-train ]]; do shift; done; exec "$@"')
    r = run([LAUNCH, "--", CONFIG], fakes.env(FAKE_RUN_S=0, FAKE_EXIT=code))
    assert r.returncode == code, r.stderr
    assert fakes.log.joinpath("trainer.args").read_text().split() == ["--config", CONFIG]


def test_launch_stops_before_pbs_walltime(fakes):
    """Under PBS launch.sh sends SIGTERM --stop-before seconds before the
    walltime that qstat reports; the trainer's 85 comes back out."""
    fakes.gpus(0)
    fakes.trainer()
    fakes.add("qstat", "printf '    Resource_List.walltime = 00:00:05\\n'")
    fakes.mpiexec("pals", 'while [ $# -gt 0 ] && [[ $1 != */gpu_affinity.sh ]]; do shift; done; exec "$@"')
    env = fakes.env(PBS_NODEFILE=fakes.nodefile(), PBS_JOBID="1.polaris", FAKE_RUN_S=30)
    t0 = time.monotonic()
    r = run([LAUNCH, "--stop-before", "4", "--", CONFIG], env)
    assert r.returncode == 85, r.stderr
    assert time.monotonic() - t0 < 20
    assert "asking the trainer to checkpoint and stop" in r.stderr
    assert "signals=[15]" in fakes.log.joinpath("trainer.result").read_text()


# --------------------------------------------------------------------------- #
# scripts/gpu_affinity.sh


@pytest.mark.parametrize("var", ["PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "SLURM_LOCALID",
                                 "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"])
def test_gpu_affinity_reverse_order(fakes, var):
    fakes.gpus(4)
    seen = []
    for local_rank in range(8):
        r = run([AFFINITY, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'], fakes.env(**{var: local_rank}))
        assert r.returncode == 0, r.stderr
        seen.append(r.stdout.strip())
    assert seen == ["3", "2", "1", "0", "3", "2", "1", "0"]


def test_gpu_affinity_leaves_things_alone(fakes):
    show = ["sh", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"; exit 7']
    fakes.gpus(4)
    # The user's own setting wins, even an empty one.
    assert run([AFFINITY, *show], fakes.env(PMI_LOCAL_RANK=0, CUDA_VISIBLE_DEVICES="1")).stdout.strip() == "1"
    assert run([AFFINITY, *show], fakes.env(PMI_LOCAL_RANK=0, CUDA_VISIBLE_DEVICES="")).stdout.strip() == ""
    # No local rank from the launcher.
    assert run([AFFINITY, *show], fakes.env()).stdout.strip() == "unset"
    # No GPU on the node; and the command's exit status comes through.
    fakes.gpus(0)
    r = run([AFFINITY, *show], fakes.env(PMI_LOCAL_RANK=2))
    assert r.stdout.strip() == "unset" and r.returncode == 7


# --------------------------------------------------------------------------- #
# scripts/node_watch.sh (Hydra's remote shell under launch.sh)


@pytest.mark.parametrize("ending, line", [
    ("exit 0", None),
    ("exit 3", None),                     # a proxy that ends with its job's failure
    ("kill -KILL $$", "lost node n1 (ranks 2-3): its MPI proxy ended (killed by signal 9)"),
    ("exit 255", "lost node n1 (ranks 2-3): lost the connection to it (REMOTE exited 255)"),
])
def test_node_watch_names_the_lost_node(fakes, ending, line):
    remote = fakes.add("fake-ssh", f"""
        printf '%s\\n' "$@" > "$FAKE_LOG/ssh.args"
        {ending}
    """)
    env = fakes.env(PRELORA_REMOTE_SHELL=remote, PRELORA_JOB_HOSTS="n0.example n1.example n2.example",
                    PRELORA_JOB_PPN=2)
    # As Hydra calls its launcher: ssh options, the host, the proxy command.
    r = run([NODE_WATCH, "-x", "-o", "BatchMode=yes", "n1", "/bin/proxy", "--port", "5"], env)
    code = {"exit 0": 0, "exit 3": 3, "exit 255": 255}.get(ending, 137)
    assert r.returncode == code
    assert fakes.log.joinpath("ssh.args").read_text().split() == [
        "-x", "-o", "BatchMode=yes", "n1", "/bin/proxy", "--port", "5"]
    if line is None:
        assert r.stderr == ""
    else:
        assert r.stderr.strip() == f"node_watch.sh: {line.replace('REMOTE', str(remote))}"


# --------------------------------------------------------------------------- #
# scripts/resubmit.sh


SCHEDULERS = {
    "pbs": dict(env={"PBS_JOBID": "100.polaris-pbs"}, submit="qsub", script=PBS, stdout="101.polaris-pbs"),
    "slurm": dict(env={"SLURM_JOB_ID": "100", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_PER_NODE": "4"},
                  submit="sbatch", script=SBATCH, stdout="Submitted batch job 101"),
}


def scheduler_lookup(fakes, known=("78.polaris-pbs", "101.polaris-pbs", "101", "6"), info=""):
    """Fake qstat and squeue: ``qstat -f JOB`` prints ``info``; ``qstat JOB``
    and ``squeue -j JOB`` find the jobs in ``known``; every call is logged."""
    ids = " ".join(known)
    fakes.add("qstat", f"""
        printf '%s\\n' "$*" >> "$FAKE_LOG/qstat.calls"
        if [ "$1" = -f ]; then printf '%s' {shlex.quote(info)}; exit 0; fi
        for j in {ids}; do [ "$1" = "$j" ] && {{ echo "$j prelora u 0 H prod"; exit 0; }}; done
        echo "qstat: Unknown Job Id $1" >&2; exit 153
    """)
    fakes.add("squeue", f"""
        job=""; while [ $# -gt 0 ]; do [ "$1" = -j ] && job=$2; shift; done
        for j in {ids}; do [ "$job" = "$j" ] && {{ echo "$j"; exit 0; }}; done
        exit 0
    """)


def resubmit(fakes, scheduler, code, left=None, extra_env=None, *args):
    s = SCHEDULERS[scheduler]
    scheduler_lookup(fakes)
    fakes.recorder(s["submit"], stdout=s["stdout"])
    env = fakes.env(**s["env"], **(extra_env or {}))
    if left is not None:
        env["PRELORA_MAX_RESUBMITS"] = str(left)
    r = run([RESUBMIT, "--exit-code", code, *args, "--", s["script"]], env)
    assert r.returncode == 0, r.stderr
    return r, fakes.args(s["submit"])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_resubmit_on_85_with_one_less(fakes, scheduler):
    r, args = resubmit(fakes, scheduler, 85, 5, {"PRELORA_RUN_DIR": "runs/a,b"},
                       "--vars", "PRELORA_RUN_DIR PRELORA_NOT_SET")
    assert args[-2:] == [str(SCHEDULERS[scheduler]["script"]), "--"]
    assert "shows job 101" in r.stdout and "in the queue" in r.stdout
    if scheduler == "pbs":
        assert args[args.index("-W") + 1] == "depend=afterany:100.polaris-pbs"
        carried = args[args.index("-v") + 1]
        assert carried.startswith("PRELORA_MAX_RESUBMITS=4,")
        assert "PRELORA_RUN_DIR='runs/a,b'" in carried     # a comma is quoted
        assert "PRELORA_NOT_SET" not in carried
    else:
        assert "--export=ALL,PRELORA_MAX_RESUBMITS=4" in args
        assert "--dependency=afterany:100" in args
        # The job's shape is repeated, whatever the #SBATCH lines say.
        for opt in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"):
            assert opt in args
    assert "submitted" in r.stdout


def test_resubmit_default_counter_and_submit_args(fakes):
    r, args = resubmit(fakes, "slurm", 85, None, {"PRELORA_SUBMIT_ARGS": "--constraint= -p cpu"})
    assert "--export=ALL,PRELORA_MAX_RESUBMITS=19" in args
    i = args.index("--constraint=")
    assert args[i + 1:i + 3] == ["-p", "cpu"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("code,message", [(0, "finished"), (1, "failed"), (2, "failed"), (137, "failed")])
def test_no_resubmit_unless_85(fakes, scheduler, code, message):
    r, args = resubmit(fakes, scheduler, code, 5)
    assert args == [] and message in r.stdout


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_no_resubmit_when_counter_exhausted(fakes, scheduler):
    r, args = resubmit(fakes, scheduler, 85, 0)
    assert args == [] and "limit is reached" in r.stdout


def test_no_resubmit_with_stop_file(fakes, tmp_path):
    stop = tmp_path / "NO_RESUBMIT"
    stop.touch()
    r, args = resubmit(fakes, "pbs", 85, 5, None, "--stop-file", str(stop))
    assert args == [] and "NO_RESUBMIT" in r.stdout
    assert not stop.exists()            # once only
    r, args = resubmit(fakes, "pbs", 85, 5, None, "--stop-file", str(stop))
    assert args != []


def test_resubmit_failure_and_usage(fakes):
    fakes.add("sbatch", "echo 'sbatch: error: invalid partition' >&2; exit 1")
    env = fakes.env(SLURM_JOB_ID=1)
    r = run([RESUBMIT, "--exit-code", 85, SBATCH], env)
    assert r.returncode == 1 and "invalid partition" in r.stderr
    r = run([RESUBMIT, "--exit-code", "x", SBATCH], env)
    assert r.returncode == 2
    r = run([RESUBMIT, "--exit-code", 85, SBATCH], fakes.env())   # not in a job
    assert r.returncode == 2 and "PBS_JOBID" in r.stderr


# --------------------------------------------------------------------------- #
# The templates end to end, with fake schedulers and a fake trainer.


def wait_for(path: Path, timeout=20.0):
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_slurm_template_forwards_usr1_and_resubmits(fakes, tmp_path):
    """#SBATCH --signal=B:USR1 reaches only the batch shell: its trap passes
    the signal to the job step, the trainer exits 85, the job resubmits."""
    fakes.gpus(0)
    fakes.trainer()
    fakes.add("scontrol", '[ "$1 $2" = "show hostnames" ] && echo localhost')
    # srun records its options and runs the trainer as the "step".
    fakes.add("srun", """
        printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
        while [ $# -gt 0 ] && [[ $1 != */prelora-train ]]; do shift; done
        echo $$ > "$FAKE_LOG/step.pid"
        exec "$@"
    """)
    fakes.recorder("scancel", then='[[ $1 == --signal=* ]] && kill -s "${1#--signal=}" "$(cat "$FAKE_LOG/step.pid")"')
    fakes.recorder("sbatch", stdout="Submitted batch job 6")
    env = fakes.env(SLURM_JOB_ID=5, SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES=1,
                    SLURM_NTASKS_PER_NODE=2, SLURM_JOB_NODELIST="localhost", SLURM_GPUS_ON_NODE=0,
                    PRELORA_VENV="", PRELORA_RUN_DIR=tmp_path / "run", PRELORA_CONFIG=CONFIG,
                    PRELORA_TRAIN_ARGS="run.epochs=2", PRELORA_MAX_RESUBMITS=3, FAKE_RUN_S=30)
    job = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(fakes.log / "ready")
        job.send_signal(signal.SIGUSR1)        # what --signal=B:USR1@300 does
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 85, out
    assert "signals=[10]" in fakes.log.joinpath("trainer.result").read_text()
    assert fakes.args("scancel")[:2] == ["--signal=USR1", "5"]
    srun = fakes.log.joinpath("srun.args").read_text().split()
    assert follows(srun, "-n", "2") and follows(srun, "--ntasks-per-node", "2")
    trainer = fakes.log.joinpath("trainer.args").read_text().split()
    assert trainer == ["--config", CONFIG, "--output-dir", str(tmp_path / "run"), "run.epochs=2"]
    sbatch = fakes.args("sbatch")
    assert "--export=ALL,PRELORA_MAX_RESUBMITS=2" in sbatch and "jobs/slurm.sbatch" in sbatch
    assert "--nodes=1" in sbatch and "--ntasks-per-node=2" in sbatch


def test_slurm_template_finished_run_does_not_resubmit(fakes, tmp_path):
    fakes.gpus(0)
    fakes.trainer()
    fakes.add("srun", 'while [ $# -gt 0 ] && [[ $1 != */prelora-train ]]; do shift; done; exec "$@"')
    fakes.recorder("sbatch", stdout="Submitted batch job 6")
    env = fakes.env(SLURM_JOB_ID=5, SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES=1,
                    SLURM_NTASKS_PER_NODE=2, PRELORA_VENV="", PRELORA_RUN_DIR=tmp_path / "run",
                    PRELORA_DATA_PATH="/data/in1k.h5", FAKE_RUN_S=0, FAKE_EXIT=0)
    r = run(["bash", SBATCH], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fakes.args("sbatch") == [] and "finished" in r.stdout
    trainer = fakes.log.joinpath("trainer.args").read_text().split()
    assert trainer[-1] == "data.path=/data/in1k.h5"


def pbs_fakes(fakes, walltime="01:00:00", info=""):
    """A Polaris job's commands: module and conda (recorded), qsub, qstat
    (``qstat -f`` prints ``info`` or the walltime), and Cray PALS' mpiexec,
    which records its options and runs the program behind the affinity
    wrapper: one process per node of $PBS_NODEFILE under --ppn 1 (each
    node seeing $FAKE_SCRATCH, when set, as its own directory
    $FAKE_SCRATCH/nodeI, as node-local disks are), else local rank 0 only."""
    fakes.gpus(4)
    fakes.trainer()
    fakes.recorder("module")
    fakes.recorder("conda")
    fakes.mpiexec("pals", """
        printf '%s\\n' "$@" > "$FAKE_LOG/mpiexec.args"
        echo "$*" >> "$FAKE_LOG/mpiexec.calls"
        ppn=4
        while [ $# -gt 0 ] && [[ $1 != */gpu_affinity.sh ]]; do [ "$1" = --ppn ] && ppn=$2; shift; done
        nodes=$(sort -u "$PBS_NODEFILE" | wc -l)
        node_args() {
            args=()
            for a in "$@"; do
                if [ -n "${FAKE_SCRATCH:-}" ]; then a=${a//$FAKE_SCRATCH/$FAKE_SCRATCH/node$i}; fi
                args+=("$a")
            done
        }
        if [ "$ppn" != 1 ]; then i=0; node_args "$@"; PMI_LOCAL_RANK=0 exec "${args[@]}"; fi
        for ((i = 0; i < nodes; i++)); do
            node_args "$@"
            PMI_RANK=$i PMI_LOCAL_RANK=0 "${args[@]}" || exit $?
        done
    """)
    fakes.recorder("qsub", stdout="78.polaris-pbs")
    scheduler_lookup(fakes, info=info or f"    Resource_List.walltime = {walltime}\n")


def pbs_env(fakes, tmp_path, **extra):
    base = dict(PBS_JOBID="77.polaris-pbs", PBS_NODEFILE=fakes.nodefile(), PBS_O_WORKDIR=ROOT,
                PRELORA_VENV="", PRELORA_RUN_DIR=tmp_path / "run", PRELORA_MAX_RESUBMITS=3,
                FAKE_RUN_S=30, PRELORA_MPIEXEC=fakes.bin / "mpiexec")
    return fakes.env(**{**base, **extra})


def test_pbs_template_stops_before_walltime_and_resubmits(fakes, tmp_path):
    pbs_fakes(fakes, walltime="00:00:05")
    env = pbs_env(fakes, tmp_path, PRELORA_LAUNCH_ARGS="--stop-before 4",
                  PRELORA_DATA_PATH="/lus/eagle/projects/P/in1k.h5")
    r = run(["bash", PBS], env)
    assert r.returncode == 85, r.stdout + r.stderr
    # The rank saw SIGTERM from launch.sh's timer, on the reversed GPU.
    assert fakes.log.joinpath("trainer.result").read_text().strip() == "signals=[15] cuda=3"
    mpiexec = fakes.log.joinpath("mpiexec.args").read_text().split()
    assert follows(mpiexec, "-n", "8") and "--cpu-bind" in mpiexec
    qsub = fakes.args("qsub")
    assert qsub[qsub.index("-W") + 1] == "depend=afterany:77.polaris-pbs"
    carried = qsub[qsub.index("-v") + 1].split(",")
    assert carried[0] == "PRELORA_MAX_RESUBMITS=2"
    assert f"PRELORA_RUN_DIR={tmp_path / 'run'}" in carried
    assert "PRELORA_DATA_PATH=/lus/eagle/projects/P/in1k.h5" in carried
    assert "PRELORA_LAUNCH_ARGS=--stop-before 4" in carried
    assert "jobs/polaris.pbs" in qsub


def test_pbs_template_survives_walltime_sigterm(fakes, tmp_path):
    """At the end of the walltime PBS sends SIGTERM to every process of the
    job: the batch shell must live on to resubmit."""
    pbs_fakes(fakes)
    env = pbs_env(fakes, tmp_path, PRELORA_LAUNCH_ARGS="--stop-before 0")
    job = subprocess.Popen(["bash", str(PBS)], env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(fakes.log / "ready")
        os.killpg(job.pid, signal.SIGTERM)
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 85, out
    assert "signals=[15]" in fakes.log.joinpath("trainer.result").read_text()
    assert fakes.args("qsub"), out


def test_pbs_template_failure_does_not_resubmit(fakes, tmp_path):
    pbs_fakes(fakes)
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=1)
    r = run(["bash", PBS], env)
    assert r.returncode == 1 and fakes.args("qsub") == []
    assert "failed" in r.stdout


# The first job was submitted with these options (prod, routed to small) and
# -v variables: `qstat -f` shows them.
FIRST_JOB = """Job Id: 77.polaris-pbs
    Job_Name = vitl
    queue = small
    Account_Name = MyProject
    Join_Path = oe
    Resource_List.filesystems = home:eagle
    Resource_List.nodect = 10
    Resource_List.place = scatter
    Resource_List.select = 10:system=polaris
    Resource_List.walltime = 02:30:00
    Variable_List = PBS_O_QUEUE=prod,PBS_O_WORKDIR=/lus/eagle/projects/MyProject/p,
	MY_SETTING=on
"""


def test_pbs_template_successor_repeats_the_first_jobs_options(fakes, tmp_path):
    """A job stopped for walltime submits a successor with every option the
    first qsub had (not only the #PBS lines or PRELORA_SUBMIT_ARGS), then
    finds it with qstat."""
    pbs_fakes(fakes, info=FIRST_JOB)
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=85, PBS_O_QUEUE="prod",
                  PRELORA_SUBMIT_ARGS="-m abe")
    r = run(["bash", PBS], env)
    assert r.returncode == 85, r.stdout + r.stderr
    qsub = fakes.args("qsub")
    for option in (("-A", "MyProject"), ("-q", "prod"), ("-N", "vitl"), ("-j", "oe"),
                   ("-l", "select=10:system=polaris"), ("-l", "place=scatter"),
                   ("-l", "walltime=02:30:00"), ("-l", "filesystems=home:eagle"), ("-m", "abe")):
        assert follows(qsub, *option), (option, qsub)
    carried = qsub[qsub.index("-v") + 1].split(",")
    assert "MY_SETTING=on" in carried and "PRELORA_MAX_RESUBMITS=2" in carried
    assert f"PRELORA_RUN_DIR={tmp_path / 'run'}" in carried
    assert "78.polaris-pbs" in fakes.log.joinpath("qstat.calls").read_text().split()
    assert "resubmit.sh: qstat shows job 78.polaris-pbs in the queue" in r.stdout


def test_pbs_template_says_when_the_successor_vanished(fakes, tmp_path):
    """qsub returned 0, but qstat does not know the new job (on Polaris a
    prod job that fits no execution queue): the job's output says so."""
    pbs_fakes(fakes)
    scheduler_lookup(fakes, known=())
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=85)
    r = run(["bash", PBS], env)
    assert r.returncode == 85 and fakes.args("qsub")
    assert "resubmit.sh: error: qsub answered '78.polaris-pbs' but qstat does not show job " \
           "78.polaris-pbs: the successor is not queued and the chain ends here" in r.stderr


def test_pbs_template_in_debug_scaling_says_the_chain_ends(fakes, tmp_path):
    """debug-scaling holds one job per user: the job says at its start that
    it cannot queue its successor, and does not try."""
    pbs_fakes(fakes)
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=85, PBS_QUEUE="debug-scaling",
                  PBS_O_QUEUE="debug-scaling")
    r = run(["bash", PBS], env)
    assert r.returncode == 85 and fakes.args("qsub") == []
    line = "resubmit.sh: queue debug-scaling holds one job per user, running or queued: this " \
           "job cannot queue its successor, so the chain ends with it (submit chains to prod)"
    assert line in r.stdout
    assert r.stdout.index(line) < r.stdout.index("polaris.pbs: prelora-train exited")
    assert "no resubmission: queue debug-scaling" in r.stdout


def fake_venv(tmp_path, torch_version=None):
    """A venv directory whose activate script changes nothing, with a record
    of its torch and DeepSpeed (this environment's, or ``torch_version``)."""
    venv = tmp_path / "venvs" / "conda-2025-09-25"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("# the conda module's python stays first on PATH\n")
    r = run([sys.executable, VENV_CHECK, "record", venv], os.environ)
    assert r.returncode == 0, r.stderr
    if torch_version:
        record = venv / "prelora-versions.txt"
        record.write_text(re.sub(r"^torch \S+", f"torch {torch_version}", record.read_text(), flags=re.M))
    return venv


def test_pbs_template_pins_the_module_and_checks_the_venv(fakes, tmp_path):
    """The job loads the pinned conda module and activates the venv named
    after it; a venv whose torch is not the one it was built on is refused
    in one line before anything runs."""
    pbs_fakes(fakes)
    fake_venv(tmp_path)
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=0,
                  PRELORA_VENV=tmp_path / "venvs" / "conda-2025-09-25")
    r = run(["bash", PBS], env)
    assert r.returncode == 0, r.stdout + r.stderr
    module = fakes.args("module")
    assert module[:3] == ["use", "/soft/modulefiles", "--"] and module[3:5] == ["load", "conda/2025-09-25"]
    shutil.rmtree(tmp_path / "venvs")
    venv = fake_venv(tmp_path, torch_version="1.0.0")
    fakes.log.joinpath("trainer.args").unlink()
    r = run(["bash", PBS], env)
    assert r.returncode == 1 and not fakes.log.joinpath("trainer.args").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"venv_versions.py: {venv} was built on other versions than this environment has "
        "(torch 1.0.0 -> ")


def test_venv_default_is_named_after_the_module(fakes, tmp_path):
    """Without PRELORA_VENV the job activates venvs/<module>; a venv built
    before the record existed is refused."""
    pbs_fakes(fakes)
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copytree(ROOT / "jobs", root / "jobs")
    (root / "venvs" / "conda-2024-04-29" / "bin").mkdir(parents=True)
    (root / "venvs" / "conda-2024-04-29" / "bin" / "activate").write_text("echo activated $BASH_SOURCE\n")
    env = pbs_env(fakes, tmp_path, PRELORA_ROOT=root, PRELORA_CONDA_MODULE="conda/2024-04-29",
                  FAKE_RUN_S=0, FAKE_EXIT=0)
    del env["PRELORA_VENV"]
    r = run(["bash", root / "jobs" / "polaris.pbs"], env)
    assert r.returncode == 1
    assert "activated venvs/conda-2024-04-29/bin/activate" in r.stdout
    assert r.stderr.strip() == ("venv_versions.py: venvs/conda-2024-04-29 has no record of the torch "
                                "and DeepSpeed it was built on: rebuild it with scripts/polaris_venv.sh")


@pytest.mark.parametrize("shards", [0, 2])
def test_pbs_template_stages_the_data_on_every_node(fakes, tmp_path, shards):
    """PRELORA_STAGE_DIR: one copy per node (two fake nodes, each seeing its
    own directory as a node-local disk), verified, and the ranks read it."""
    pbs_fakes(fakes)
    eagle = tmp_path / "eagle"
    eagle.mkdir()
    if shards:
        src = eagle / "imagenet1k"
        src.mkdir()
        for i in range(shards):
            (src / f"shard-0000{i}-of-0000{shards}.h5").write_bytes(os.urandom(3_000_000 + i))
    else:
        src = eagle / "imagenet1k.h5"
        src.write_bytes(os.urandom(5_000_000))
    scratch = tmp_path / "local" / "scratch"
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=85, PRELORA_DATA_PATH=src,
                  PRELORA_STAGE_DIR=scratch, FAKE_SCRATCH=scratch)
    r = run(["bash", PBS], env)
    assert r.returncode == 85, r.stdout + r.stderr
    stage_call = fakes.log.joinpath("mpiexec.calls").read_text().splitlines()[0].split()
    assert follows(stage_call, "-n", "2") and follows(stage_call, "--ppn", "1")
    files = sorted(src.iterdir()) if shards else [src]
    for node in ("node0", "node1"):
        copy = scratch / node / src.name
        copies = sorted(copy.iterdir()) if shards else [copy]
        assert [c.read_bytes() for c in copies] == [f.read_bytes() for f in files]
        assert not [p for p in (scratch / node).rglob(".*partial*")]
    assert r.stdout.count("verified (size, CRC-32)") == 2
    trainer = fakes.log.joinpath("trainer.args").read_text().split()
    assert trainer[-1] == f"data.path={scratch / 'node0' / src.name}"
    # The successor is given the shared path, not a node's copy, and stages again.
    qsub = fakes.args("qsub")
    carried = qsub[qsub.index("-v") + 1].split(",")
    assert f"PRELORA_DATA_PATH={src}" in carried and f"PRELORA_STAGE_DIR={scratch}" in carried


def test_stage_data_refuses_a_missing_source(fakes, tmp_path):
    pbs_fakes(fakes)
    env = pbs_env(fakes, tmp_path, FAKE_RUN_S=0, FAKE_EXIT=0,
                  PRELORA_DATA_PATH=tmp_path / "nothing.h5", PRELORA_STAGE_DIR=tmp_path / "scratch")
    r = run(["bash", PBS], env)
    assert r.returncode == 1 and not fakes.log.joinpath("trainer.args").exists()
    assert f"{tmp_path / 'nothing.h5'} does not exist" in r.stderr


def test_convert_job(fakes, tmp_path):
    """jobs/convert.pbs on two fake nodes: the line asks for 16 ranks, 8 per
    node; here one real rank writes every shard, which is what the job's
    prelora-convert command produces."""
    from PIL import Image

    pbs_fakes(fakes)
    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.JPEG", format="JPEG")
    out = tmp_path / "eagle" / "imagenet1k"
    env = pbs_env(fakes, tmp_path, PRELORA_SRC=src, PRELORA_OUT=out, PRELORA_SHARDS=4)
    r = run(["bash", CONVERT], env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    mpiexec = fakes.log.joinpath("mpiexec.args").read_text().split()
    assert follows(mpiexec, "-n", "16") and follows(mpiexec, "--ppn", "8")
    assert Path(mpiexec[mpiexec.index(str(AFFINITY)) + 1]).name == "prelora-convert"
    assert sorted(p.name for p in out.iterdir()) == [f"shard-0000{i}-of-00004.h5" for i in range(4)]
    assert "convert.pbs: prelora-convert exited with 0" in r.stdout


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pbs_template_on_two_nodes_derives_the_accumulation(fakes, tmp_path):
    """jobs/polaris.pbs as shipped, with the reference config, under a fake
    PBS of 2 Polaris nodes (4 GPUs each): the template's launch line asks for
    8 ranks, and those 8 ranks (real ones, on this machine's CPUs, started by
    the venv's MPICH in place of PALS) reach training with the accumulation
    derived for them, 16 x 32 x 8 = 4096.

    Exercised: the template, prelora-launch's line, the reference config's
    batch settings, the trainer's start and one optimizer step. Not
    exercised: ViT-L, ImageNet, bf16, GPUs, NCCL, two machines. The model,
    data, precision and step count are replaced through PRELORA_TRAIN_ARGS
    (the template's override hook) by a tiny fp32 ViT on synthetic images,
    one step.
    """
    real_mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if real_mpiexec is None or shutil.which("prelora-train") is None:
        pytest.skip("the venv's mpiexec and prelora-train are needed (run `make test`)")
    pbs_fakes(fakes)
    fakes.trainer().unlink()                    # the real trainer this time
    fakes.mpiexec("pals", f"""
        printf '%s\\n' "$@" > "$FAKE_LOG/mpiexec.args"
        n=$2
        while [ $# -gt 0 ] && [[ $1 != */gpu_affinity.sh ]]; do shift; done
        # Hydra would read the fake node file and ssh to its hosts: all ranks here.
        exec env -u PBS_NODEFILE -u PBS_JOBID {real_mpiexec} -n "$n" "$@"
    """)
    tiny = ("model.name=vit_tiny_patch16_224 model.img_size=16 model.patch_size=8 model.embed_dim=16 "
            "model.depth=1 model.num_heads=1 model.num_classes=10 data.source=synthetic "
            "data.num_workers=0 data.auto_augment=null data.synthetic_train_size=4096 "
            "data.synthetic_val_size=64 logging.tensorboard=false run.max_steps=1 "
            "deepspeed.precision=fp32")
    env = pbs_env(fakes, tmp_path, PRELORA_TRAIN_ARGS=tiny, PRELORA_MASTER_ADDR="127.0.0.1",
                  DS_ACCELERATOR="cpu")
    r = run(["bash", PBS], env, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    mpiexec = fakes.log.joinpath("mpiexec.args").read_text().split()
    assert follows(mpiexec, "-n", "8") and follows(mpiexec, "--ppn", "4")
    out = r.stdout + r.stderr
    assert "global batch 4096 = 16 micro x 32 accum (auto) x 8 ranks" in out, out[-3000:]
    assert "training finished (exit 0): no resubmission" in out


# --------------------------------------------------------------------------- #
# A real run: two MPI ranks on this machine through scripts/launch.sh.


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_through_launch_sh(tmp_path):
    if shutil.which("prelora-train") is None:
        pytest.skip("prelora-train is not on PATH (activate the venv, or run `make test`)")
    if not (ROOT / "configs" / "quickstart.yaml").exists():
        pytest.skip("configs/quickstart.yaml is missing")
    env = _clean_env()
    env.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path / "run"
    r = run([LAUNCH, "--np", "2", "--", "configs/quickstart.yaml", "--output-dir", out,
             "run.max_steps=4"], env, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "scheduler=local" in r.stderr and "ranks=2" in r.stderr
    assert out.is_dir() and any(out.iterdir())
