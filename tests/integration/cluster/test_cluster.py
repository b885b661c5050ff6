"""Multi-node jobs on emulated nodes of this machine (tests/integration/cluster/cluster.sh).

Each test runs jobs/polaris.pbs unchanged as an emulated PBS job on node 0:
PBS_NODEFILE lists the emulated hosts, scripts/launch.sh finds MPICH's Hydra
as mpiexec and builds its line, and Hydra reaches node 1 through nsexec (an
ssh stand-in that enters the node's namespaces). So the ranks of one node
share a host name and a network namespace, those of the other node have
another one, and every collective between them crosses a rate-capped link.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prelora_hpc import checkpoint as ckpt
from prelora_hpc.config import load_config

pytestmark = [pytest.mark.cluster, pytest.mark.mpi, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
PBS = ROOT / "jobs" / "polaris.pbs"
PROBE = Path(__file__).resolve().parent / "probe_train.py"
PPN = 2

# The quick start, shrunk: a smaller ViT, loose thresholds and short windows
# so all three stages pass in a few steps; no DataLoader worker processes.
QUICK = ["model.depth=2", "model.embed_dim=48", "data.num_workers=0", "prelora.window_steps=2",
         "prelora.k=2", "prelora.tau=100", "prelora.zeta=100", "prelora.warmup_windows=1",
         "logging.interval_steps=1", "optim.schedule=constant"]


def job_bin(tmp_path: Path, trainer: str | None = None) -> Path:
    """Commands a Polaris job expects that this machine lacks: `module` and
    `conda` (ALCF's environment modules, a no-op here), and optionally a
    stand-in prelora-train."""
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    for name in ("module", "conda"):
        (b / name).write_text("#!/bin/sh\nexit 0\n")
        (b / name).chmod(0o755)
    if trainer:
        (b / "prelora-train").write_text(f"#!/bin/sh\nexec {sys.executable} {trainer} \"$@\"\n")
        (b / "prelora-train").chmod(0o755)
    return b


def pbs_job(cluster, tmp_path: Path, hosts: list[str], run_dir: Path, config: str,
            train_args: list[str], trainer: str | None = None, job_id="1.emu") -> tuple[list[str], dict]:
    """argv and environment of jobs/polaris.pbs as PBS would start it on hosts[0]."""
    nodefile = tmp_path / f"nodefile.{job_id}"
    # PBS lists a host once per MPI slot.
    nodefile.write_text("".join(f"{h}\n" for h in hosts for _ in range(PPN)))
    b = job_bin(tmp_path, trainer)
    env = cluster.env(PBS_NODEFILE=nodefile, PBS_JOBID=job_id, PBS_O_WORKDIR=ROOT,
                      PBS_ENVIRONMENT="PBS_BATCH",
                      PRELORA_VENV="", PRELORA_CONFIG=config, PRELORA_RUN_DIR=run_dir,
                      PRELORA_LAUNCH_ARGS=f"--ppn {PPN}", PRELORA_MAX_RESUBMITS=0,
                      PRELORA_TRAIN_ARGS=" ".join(train_args))
    env["PATH"] = f"{b}{os.pathsep}{env['PATH']}"
    return cluster.on(hosts[0], "bash", PBS), env


def tail(text: str, n=4000) -> str:
    return text[-n:]


# Receives N bytes on port 5599 and prints the seconds from first to last byte.
SINK = """
import socket, sys, time
n = int(sys.argv[1]); s = socket.create_server(("0.0.0.0", 5599)); print("ready", flush=True)
c, _ = s.accept(); got = len(c.recv(1 << 20)); t0 = time.monotonic()
while got < n:
    b = c.recv(1 << 20)
    if not b: break
    got += len(b)
print(got, time.monotonic() - t0, flush=True)
"""
SOURCE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5599)); s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def test_nodes_resolve_each_other_over_a_capped_link(emu_cluster):
    """Each node has its own host name, resolves every node's name to its
    address on the private link, and that link carries no more than its cap."""
    c = emu_cluster
    for node in c.hosts:
        r = subprocess.run(c.on(node, "bash", "-c", "hostname; getent hosts " + " ".join(c.hosts)),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert lines[0] == node
        addrs = {ln.split()[1]: ln.split()[0] for ln in lines[1:] if ln.strip()}
        assert sorted(addrs) == sorted(c.hosts) and len(set(addrs.values())) == len(c.hosts)
        assert not any(a.startswith("127.") for a in addrs.values())
    # 25 MB from node 0 to node 1: at 1 Gbit/s that is 0.2 s, never much faster.
    n = 25_000_000
    sink = subprocess.Popen(c.on(c.hosts[1], sys.executable, "-c", SINK, n), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        r = subprocess.run(c.on(c.hosts[0], sys.executable, "-c", SOURCE, c.hosts[1], n),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        got, seconds = sink.stdout.readline().split()
    finally:
        sink.kill()
        sink.wait()
    assert int(got) == n
    rate_bits = {"gbit": 1e9, "mbit": 1e6}
    unit = next(u for u in rate_bits if c.rate.endswith(u))
    cap = float(c.rate[:-len(unit)]) * rate_bits[unit]
    measured = n * 8 / float(seconds)
    assert measured < cap * 1.15, f"{measured / 1e6:.0f} Mbit/s over a {c.rate} link"
    c.summary["link"] = f"{measured / 1e6:.0f} Mbit/s measured over a {c.rate} cap"


@pytest.fixture(scope="module")
def three_stages(emu_cluster, tmp_path_factory):
    """One 2 x 2 job through the three stages, a checkpoint after every step."""
    c = emu_cluster
    tmp = tmp_path_factory.mktemp("three_stages")
    run_dir = tmp / "run"
    argv, env = pbs_job(c, tmp, c.hosts, run_dir, "configs/quickstart.yaml", THREE_STAGES,
                        trainer=str(PROBE))
    before = c.link_bytes(c.hosts[1])
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, tail(out)
    return run_dir, out, took, c.link_bytes(c.hosts[1]) - before


THREE_STAGES = [*QUICK, "run.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep_last=20"]


def step_losses(run_dir):
    from run_helpers import read_metrics

    out = {}
    for rec in read_metrics(run_dir, "step"):
        out[rec["step"]] = rec["loss"]      # a resumed run's records override
    return out


def test_pbs_job_across_two_nodes_runs_three_stages(emu_cluster, three_stages):
    """2 nodes x 2 ranks through the real template and launch line: per-node
    local ranks, node 0's name as the rendezvous on every node, gloo on the
    inter-node link, DeepSpeed's shared-memory op off, and the same rank-0
    decision and weights on both nodes after the three stages."""
    c = emu_cluster
    run_dir, out, took, crossed = three_stages

    # The launch line launch.sh chose for Hydra on this PBS "site".
    assert f"scheduler=pbs nodes=2 ranks_per_node={PPN} ranks=4" in out, tail(out)
    assert "mpi=hydra" in out and f"master_addr={c.hosts[0]} " in out
    assert "--depth" not in out.split("+ ", 1)[1].splitlines()[0]

    ranks = [json.loads((run_dir / "probe" / f"rank{i}.json").read_text()) for i in range(4)]
    for rec in ranks:
        node = c.hosts[rec["rank"] // PPN]
        assert rec["hostname"] == node and rec["dist_hostname"] == node
        assert (rec["local_rank"], rec["local_size"]) == (rec["rank"] % PPN, PPN), rec
        assert rec["world_size"] == 4 and rec["backend"] == "gloo"
        assert rec["env"]["MASTER_ADDR"] == c.hosts[0]
        assert rec["env"]["GLOO_SOCKET_IFNAME"] == "eth0"
        # DeepSpeed's shared-memory all-reduce is on only when LOCAL_SIZE
        # equals the world size: across nodes it must not be.
        assert rec["env"]["LOCAL_SIZE"] == str(PPN)
        assert rec["env"]["TMPDIR"] == "/tmp"
        assert rec["code"] == 0 and rec["stage"] == 3
    # Rank 0 decided; every rank on both nodes trained with its decision.
    assert ranks[0]["rank_map"], "no rank map: stage 2 never started"
    for rec in ranks[1:]:
        assert rec["rank_map"] == ranks[0]["rank_map"]
        assert rec["lora_ranks"] == ranks[0]["lora_ranks"]
        assert rec["param_sha256"] == ranks[0]["param_sha256"]
    assert "switch to stage 2" in out and "switch to stage 3" in out
    # The gradients crossed the emulated link (hundreds of KB per step).
    assert crossed > 2_000_000, f"only {crossed} bytes crossed {c.hosts[1]}'s link"
    c.summary["ranks per node"] = f"{PPN} (4 ranks); three stages in {took:.0f} s, " \
                                  f"{crossed / 1e6:.1f} MB over {c.hosts[1]}'s link"


def test_checkpoint_written_across_nodes_resumes_exactly(emu_cluster, three_stages, tmp_path):
    """A 2 x 2 job resumed from the step-5 checkpoint of another (mid stage 2,
    before the switch to stage 3) repeats that run's losses exactly."""
    c = emu_cluster
    ref_dir = three_stages[0]
    ref = step_losses(ref_dir)
    assert sorted(ref) == list(range(1, 9))
    (point,) = (ref_dir / "checkpoints").glob("step00000005*")
    run_dir = tmp_path / "resumed"
    argv, env = pbs_job(c, tmp_path, c.hosts, run_dir, "configs/quickstart.yaml",
                        [*THREE_STAGES, f"checkpoint.resume={point}"], trainer=str(PROBE))
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, tail(out)
    assert "in stage 2 (full + LoRA) at step 5" in out and "switch to stage 3" in out, tail(out)
    got = step_losses(run_dir)
    assert sorted(got) == [6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), f"step {step}"
    resumed = [json.loads((run_dir / "probe" / f"rank{i}.json").read_text()) for i in range(4)]
    reference = json.loads((ref_dir / "probe" / "rank0.json").read_text())
    assert all(rec["param_sha256"] == resumed[0]["param_sha256"] for rec in resumed)
    assert resumed[0]["rank_map"] == reference["rank_map"]


def _wait_for(pred, timeout, what, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n"
                                 f"{tail(proc.stdout.read())}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _step_records(run_dir: Path) -> list[dict]:
    """The run's step records so far, while it writes them (a line still
    being written is skipped; no file yet is no records)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "step":
            steps.append(rec)
    return steps


def _in_stage_3(run_dir: Path):
    """A predicate: the run has logged a training step in stage 3."""
    return lambda: any(r.get("stage") == 3 for r in _step_records(run_dir))


def _past_first_checkpoint(run_dir: Path):
    """A predicate: the run has logged a step after its first checkpoint (so a
    fault lands mid-run, between checkpoints, in a collective or a step)."""
    def past() -> bool:
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        at = int(latest.removeprefix("step").split("-")[0])
        return any(r["step"] > at for r in _step_records(run_dir))
    return past


#: Seconds allowed beyond run.collective_timeout_s for the job to end.
MARGIN_S = 15


def test_node_loss_ends_the_job_and_the_remaining_node_resumes(emu_cluster, tmp_path):
    """Every process of node 1 killed mid-run: the job ends on node 0 within
    the collective timeout, one line names the lost node and its ranks, the
    last complete checkpoint loads, and the job submitted again on node 0
    alone (2 ranks instead of 4) resumes from it."""
    c = emu_cluster
    run_dir = tmp_path / "run"
    timeout_s = 20
    train = [*QUICK, "run.epochs=500", "checkpoint.every_steps=2",
             f"run.collective_timeout_s={timeout_s}"]
    argv, env = pbs_job(c, tmp_path, c.hosts, run_dir, "configs/vit_tiny_cpu.yaml", train)
    job = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        latest = run_dir / "checkpoints" / "latest"
        _wait_for(latest.is_file, 300, "a first checkpoint", job)
        _wait_for(_past_first_checkpoint(run_dir), 120, "a step after the checkpoint", job)
        t0 = time.monotonic()
        c.kill(c.hosts[1])
        out, _ = job.communicate(timeout=timeout_s + MARGIN_S + 60)
        ended = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
            c.kill(c.hosts[0])
    assert job.returncode not in (0, 85), tail(out)
    assert ended < timeout_s + MARGIN_S, f"the job took {ended:.1f} s to end after the node loss"
    lost = [line for line in out.splitlines() if "lost node" in line]
    assert lost == [f"node_watch.sh: lost node {c.hosts[1]} (ranks 2-3): its MPI proxy ended "
                    "(killed by signal 9)"], tail(out)
    assert "polaris.pbs: prelora-train exited with" in out
    # A failure is not resubmitted (it would fail again).
    assert "failed" in out and "qsub" not in out, tail(out)
    point = ckpt.find_resume(load_config(run_dir / "config.yaml"))
    assert (point.path / ckpt.SIDECAR).is_file()
    c.summary["node loss"] = (f"every process of {c.hosts[1]} killed after the step-{point.global_step} "
                              f"checkpoint: the job ended on {c.hosts[0]} {ended:.1f} s later "
                              f"(bound: collective timeout {timeout_s} s + {MARGIN_S} s)")

    # Submitted again on the node that is left: 2 ranks resume the 4-rank run.
    stop = point.global_step + 2
    argv, env = pbs_job(c, tmp_path, c.hosts[:1], run_dir, "configs/vit_tiny_cpu.yaml",
                        [*train, f"run.max_steps={stop}"], job_id="2.emu")
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, tail(out)
    assert "scheduler=pbs nodes=1 ranks_per_node=2 ranks=2" in out
    assert f"at step {point.global_step}" in out and "2 rank(s)" in out, tail(out)
    again = ckpt.find_resume(load_config(run_dir / "config.yaml"))
    assert again.global_step == stop
    c.summary["resume"] = f"from step {point.global_step} on {c.hosts[0]} alone (2 ranks), to step {stop}"


def test_link_down_ends_the_job_within_the_collective_timeout(emu_cluster, tmp_path):
    """Node 1's link taken down mid-run: its ranks stay alive but silent, no
    socket closes, so only timeouts can end the job. It ends on both nodes
    within run.collective_timeout_s plus a margin (the groups DeepSpeed makes
    carry the job's timeout, not torch's 30 min), and one line names the
    node that stopped answering."""
    c = emu_cluster
    run_dir = tmp_path / "run"
    timeout_s = 15
    argv, env = pbs_job(c, tmp_path, c.hosts, run_dir, "configs/vit_tiny_cpu.yaml",
                        [*QUICK, "run.epochs=500", "checkpoint.every_steps=2",
                         f"run.collective_timeout_s={timeout_s}"])
    job = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    down = False
    try:
        _wait_for((run_dir / "checkpoints" / "latest").is_file, 300, "a first checkpoint", job)
        # In stage 3, where no engine rebuild follows: the link goes down in
        # a step's collectives, every time, not in whichever the timing picks.
        _wait_for(_in_stage_3(run_dir), 120, "a step in stage 3", job)
        t0 = time.monotonic()
        subprocess.run(["bash", str(Path(__file__).parent / "cluster.sh"), "link", c.hosts[1], "down"],
                       check=True, capture_output=True, timeout=30)
        down = True
        out, _ = job.communicate(timeout=timeout_s + MARGIN_S + 120)
        ended = time.monotonic() - t0
        # The cut-off node's ranks end too (within dist_init.py's abort grace).
        _wait_for(lambda: not subprocess.run(
            ["ip", "netns", "pids", c.hosts[1]], capture_output=True, text=True).stdout.strip(),
            30, f"the processes on {c.hosts[1]} to end")
    finally:
        if job.poll() is None:
            job.kill()
        if down:
            c.kill(c.hosts[1])
            subprocess.run(["bash", str(Path(__file__).parent / "cluster.sh"), "link", c.hosts[1], "up"],
                           capture_output=True, timeout=30)
    assert job.returncode not in (0, 85), tail(out)
    assert ended < timeout_s + MARGIN_S, f"the job took {ended:.1f} s to end after the link went down"
    named = [line for line in out.splitlines() if f"no answer from ranks 2-3 on {c.hosts[1]}" in line]
    assert len(named) >= 1, tail(out)
    c.summary["link down"] = (f"{c.hosts[1]}'s link down mid-run: the job ended {ended:.1f} s later "
                              f"(bound: collective timeout {timeout_s} s + {MARGIN_S} s)")
