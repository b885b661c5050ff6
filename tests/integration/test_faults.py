"""Nothing lost, whatever happens to a run: damaged checkpoints, two runs on one
directory, a full disk, Ctrl-C. Real MPI ranks, real DeepSpeed on the CPU."""

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from mpi_util import ROOT, env, mpiexec, run_mpi, script_cmd, train_cmd
from prelora_hpc import checkpoint as ckpt
from prelora_hpc.config import ConfigError, load_config
from prelora_hpc.dist_init import (EXIT_CHECKPOINT_WRITE, EXIT_INTERRUPTED, EXIT_LOCKED,
                                EXIT_RESUBMIT)
from run_helpers import read_metrics
from prelora_hpc.runlock import LOCK_NAME

pytestmark = pytest.mark.mpi

CONFIG = "configs/vit_tiny_cpu.yaml"
# 8 steps, a checkpoint every 2: step 2, 4, 4-stage2, 6-stage3, 6, 8 (two
# periodic ones kept).
BASE = ["optim.schedule=constant", "logging.interval_steps=1", "checkpoint.every_steps=2"]


def one_line(text: str, needle: str) -> str:
    """The one line of ``text`` holding ``needle``; fails if none or several."""
    lines = [l for l in text.splitlines() if needle in l]
    assert len(lines) == 1, f"{len(lines)} lines with {needle!r} in:\n{text[-3000:]}"
    return lines[0]


def no_traceback(p) -> None:
    out = p.stdout + p.stderr
    assert "Traceback" not in out and "BAD TERMINATION" not in out, out[-4000:]


def point_of(run_dir):
    return ckpt.find_resume(load_config(Path(run_dir) / "config.yaml"))


def tags(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 8-step run; tests copy it before changing anything.

    Started with overrides on both sides of --output-dir, as a user types them.
    """
    out = tmp_path_factory.mktemp("trained")
    exe = train_cmd(out)[0]
    run_mpi([exe, "--config", CONFIG, "optim.schedule=constant", "--output-dir", str(out),
             "logging.interval_steps=1", "checkpoint.every_steps=2", "run.max_steps=8"])
    return out


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    # The copied config names the original directory.
    return dst


def rerun(run_dir, *overrides, **kw):
    return run_mpi(train_cmd(run_dir, *BASE, *overrides), check=False, **kw)


def test_overrides_are_accepted_on_both_sides_of_options(trained):
    cfg = load_config(trained / "config.yaml")
    assert cfg.optim.schedule == "constant" and cfg.logging.interval_steps == 1
    assert cfg.run.output_dir == str(trained) and cfg.run.max_steps == 8


def test_checkpoint_of_another_model_is_refused(trained):
    cfg = load_config(trained / "config.yaml", ["model.depth=3"])
    with pytest.raises(ConfigError, match="model.depth"):
        ckpt.find_resume(cfg, str(trained))


def test_sidecar_records_size_and_checksum_of_every_file(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    point = ckpt.read_resume_point(run / "checkpoints" / "step00000008")
    on_disk = sorted(p.name for p in point.path.iterdir() if p.name != ckpt.SIDECAR)
    assert sorted(point.files) == on_disk
    assert "rng_rank00001.pt" in on_disk and "mp_rank_00_model_states.pt" in on_disk
    for name, rec in point.files.items():
        assert rec == ckpt.file_digest(point.path / name)
    assert ckpt.verify(point) == []
    # One flipped byte, same size: caught by the checksum.
    f = point.path / "rng_rank00001.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = ckpt.verify(point)
    assert len(problems) == 1 and str(f) in problems[0] and "CRC-32" in problems[0]
    assert not list((run / "checkpoints").glob("*" + ckpt.SAVING))


def test_truncated_newest_checkpoint_resumes_from_the_newest_that_verifies(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step00000008"
    damaged = newest / "mp_rank_00_model_states.pt"
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 3)
    # The job that damaged it died holding the run's lock.
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "job": "77", "token": "x"}))
    p = rerun(run, "run.max_steps=9")
    assert p.returncode == 0, p.stderr[-3000:]
    no_traceback(p)
    line = one_line(p.stdout, "took over the stale lock")
    assert f"pid {gone.pid}, job 77" in line and "no longer exists" in line
    assert not (run / LOCK_NAME).exists()
    line = one_line(p.stderr, "is damaged")
    assert str(damaged) in line and "resuming from" in line
    resumed = one_line(p.stdout, "resumed from")
    assert f"resumed from {run}/checkpoints/step00000006" in resumed     # or -stage3: step 6 too
    assert "in stage 3 (LoRA only) at step 6" in resumed
    # The damaged checkpoint is kept aside, not deleted; latest moved on.
    assert (run / "checkpoints" / "step00000008.damaged" / damaged.name).is_file()
    point = point_of(run)
    assert point.global_step == 9 and ckpt.verify(point) == []


def test_no_checkpoint_that_verifies_stops_with_one_line(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = tags(run)
    for d in (run / "checkpoints").iterdir():
        if d.is_dir():
            f = d / "mp_rank_00_model_states.pt"
            data = bytearray(f.read_bytes())
            data[100] ^= 0x01
            f.write_bytes(bytes(data))
    p = rerun(run)
    assert p.returncode == 1
    no_traceback(p)
    line = one_line(p.stderr, "verifies")
    assert "no checkpoint in" in line and "step00000008/mp_rank_00_model_states.pt" in line
    assert "nothing was loaded" in line
    assert tags(run) == before      # nothing renamed or removed
    assert (run / "checkpoints" / "latest").read_text() == "step00000008"


def test_explicit_resume_of_a_damaged_checkpoint_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    target = run / "checkpoints" / "step00000006-stage3"
    (target / "rng_rank00000.pt").unlink()
    p = run_mpi([*train_cmd(tmp_path / "other", *BASE), "--resume", str(target)], check=False)
    assert p.returncode == 1
    no_traceback(p)
    line = one_line(p.stderr, "refusing to resume")
    assert f"{target}/rng_rank00000.pt is missing" in line
    assert tags(run) == tags(trained)
    assert not (tmp_path / "other" / "checkpoints").exists()


def _start(run_dir, *overrides, extra_env=None):
    e = env()
    e.update(extra_env or {})
    cmd = [mpiexec(), "-n", "2", *train_cmd(run_dir, *BASE, "run.epochs=200", *overrides)]
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir, n, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if len(read_metrics(run_dir, "step")) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {n} steps")


def _ranks_of(run_dir):
    """The ranks' processes; not their DataLoader workers, which are forked
    from them with the same command line."""
    procs = [p for p in psutil.process_iter(["cmdline", "name", "ppid"])
             if str(run_dir) in " ".join(p.info["cmdline"] or [])
             and "python" in " ".join(p.info["cmdline"] or [])
             and "mpiexec" not in (p.info["name"] or "")]
    pids = {p.pid for p in procs}
    return [p for p in procs if p.info["ppid"] not in pids]


def test_a_directory_in_use_refuses_a_second_run_and_the_first_stops_on_sigterm(tmp_path):
    """A second run on the directory is refused naming the holder; the first
    then gets SIGTERM (what PBS sends at the end of walltime): it writes a
    checkpoint at the step it stops at and exits 85 for resubmission.
    test_signals has SIGTERM with DataLoader workers."""
    first = _start(tmp_path, extra_env={"SLURM_JOB_ID": "4242"})
    try:
        _wait_for_steps(tmp_path, 2, first)
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        p = rerun(tmp_path, "run.max_steps=3")
        assert p.returncode == EXIT_LOCKED
        no_traceback(p)
        line = one_line(p.stderr, "in use by another run")
        assert f"host {socket.gethostname()}, pid {holder['pid']}, job 4242" in line
        assert holder["pid"] in [r.pid for r in _ranks_of(tmp_path)]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == EXIT_RESUBMIT, err[-3000:]
    # The refused run wrote nothing: one start record, the first run's.
    assert len(read_metrics(tmp_path, "start")) == 1
    stop = read_metrics(tmp_path, "stop")[-1]
    point = point_of(tmp_path)
    assert point.global_step == stop["step"] and ckpt.verify(point) == []
    assert f"stopping at step {stop['step']} on SIGTERM" in out
    assert not (tmp_path / LOCK_NAME).exists()


# With DataLoader workers, as users run: they get the SIGINT too.
@pytest.mark.parametrize("workers", [2])
def test_ctrl_c_checkpoints_exits_130_and_the_same_command_resumes(tmp_path, workers):
    proc = _start(tmp_path, f"data.num_workers={workers}")
    try:
        _wait_for_steps(tmp_path, 3, proc)
        proc.send_signal(signal.SIGINT)     # mpiexec forwards it to every rank
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert "BAD TERMINATION" not in out + err
    stop = read_metrics(tmp_path, "stop")[-1]
    line = one_line(out, "stopping at step")
    assert f"step {stop['step']} on SIGINT" in line and "exit code 130" in line
    point = point_of(tmp_path)
    assert point.global_step == stop["step"] and ckpt.verify(point) == []
    # The same command resumes; this time a Ctrl-C comes as the run finishes:
    # the run completes, and says so.
    p = run_mpi(script_cmd("signal_while_finishing.py", "--config", CONFIG, "--output-dir",
                           tmp_path, *BASE, "run.epochs=200", f"run.max_steps={stop['step'] + 1}"))
    assert f"at step {stop['step']}" in one_line(p.stdout, "resumed from")
    line = one_line(p.stdout, "arrived while the run was finishing")
    assert "SIGINT" in line and "run is complete" in line
    assert point_of(tmp_path).global_step == stop["step"] + 1


class Lines:
    """A pipe read line by line in the background, so that a test can wait
    for a line with a deadline while the process runs."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for line in pipe:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def wait_for(self, needle: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while sum(needle in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError(f"{count} x {needle!r} never came:\n"
                                         + "".join(self.lines)[-3000:])
                self._cv.wait(left)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


#: The stop checkpoint takes this long: far beyond the wait for the job to
#: end, so a job that ends did not write it.
SLOW_STOP_S = 900


@pytest.mark.parametrize("workers", [2])
def test_second_ctrl_c_ends_at_once(tmp_path, workers):
    cmd = [mpiexec(), "-n", "2", *script_cmd("slow_stop_checkpoint.py", SLOW_STOP_S, "--config",
                                             CONFIG, "--output-dir", tmp_path, *BASE,
                                             "run.epochs=200", f"data.num_workers={workers}")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        _wait_for_steps(tmp_path, 5, proc)
        ranks = _ranks_of(tmp_path)
        assert len(ranks) == 2
        for r in ranks:
            r.send_signal(signal.SIGINT)
        # Both ranks are in the (slow) stop checkpoint: training has stopped.
        out.wait_for("writing the stop checkpoint", 2, timeout=120)
        latest = (tmp_path / "checkpoints" / "latest").read_text()
        for r in ranks:
            r.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            for r in _ranks_of(tmp_path):
                r.kill()
            proc.kill()
    out, err = out.text(), err.text()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert out.count("writing the stop checkpoint") == 2, out[-2000:]
    assert "second interrupt: stopping now without a checkpoint" in err
    assert "Traceback" not in out + err
    # The last complete checkpoint is still the latest, and verifies.
    point = point_of(tmp_path)
    assert point.tag == latest and ckpt.verify(point) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs: room for three checkpoints of the tiny model, not for all."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or 'not root'}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_at_a_checkpoint_says_so_and_keeps_latest(small_fs):
    run = small_fs / "run"
    p = run_mpi(train_cmd(run, *BASE, "checkpoint.every_steps=1", "checkpoint.keep_last=50",
                          "logging.tensorboard=false", "run.max_steps=16"), check=False)
    assert p.returncode == EXIT_CHECKPOINT_WRITE, p.stderr[-3000:]
    no_traceback(p)
    line = one_line(p.stderr, "no space left")
    assert f"writing {run}/checkpoints/step" in line and "partial checkpoint was removed" in line
    latest = (run / "checkpoints" / "latest").read_text()
    assert f"latest still names {latest}" in line
    assert not list((run / "checkpoints").glob("*" + ckpt.SAVING))
    # Every checkpoint left verifies, and latest is the newest of them.
    for d in (run / "checkpoints").iterdir():
        if d.is_dir():
            assert ckpt.verify(ckpt.read_resume_point(d)) == [], d
    assert point_of(run).tag == latest == max(tags(run))
    # A job chain does not resubmit on it.
    r = subprocess.run(["bash", str(ROOT / "scripts" / "resubmit.sh"), "--dry-run",
                        "--exit-code", str(p.returncode), "jobs/slurm.sbatch"],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**env(), "SLURM_JOB_ID": "1"})
    assert r.returncode == 0 and "no resubmission" in r.stdout and "space" in r.stdout
