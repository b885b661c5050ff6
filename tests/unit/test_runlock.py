"""The run directory's lock: refusal naming the holder, stale takeover, release."""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from prelora_hpc.runlock import LOCK_NAME, RunLock, RunLocked


def plant(run_dir, age_s=0.0, **holder):
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "token": "t0"}
    rec.update(holder)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(rec))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_live_holder_is_named_and_its_lock_kept(tmp_path):
    path = plant(tmp_path, job="123.polaris-pbs-01")
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg and "in use by another run" in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}, job 123.polaris-pbs-01" in msg
    assert json.loads(path.read_text())["token"] == "t0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_holder_on_another_node_with_a_fresh_heartbeat_is_live(tmp_path):
    plant(tmp_path, host="x3005c0s7b0n0", pid=dead_pid())
    with pytest.raises(RunLocked, match="host x3005c0s7b0n0"):
        RunLock(tmp_path).acquire()


def test_dead_process_on_this_host_is_stale(tmp_path):
    pid = dead_pid()
    plant(tmp_path, pid=pid, job="9")
    lock = RunLock(tmp_path, job="10").acquire()
    try:
        assert f"pid {pid}, job 9" in lock.note and "no longer exists" in lock.note
        rec = json.loads((tmp_path / LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid() and rec["job"] == "10" and lock.held()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_old_heartbeat_on_another_node_is_stale(tmp_path):
    plant(tmp_path, age_s=3600, host="x3005c0s7b0n0", pid=1)
    with RunLock(tmp_path, stale_s=300) as lock:
        assert "no heartbeat for" in lock.note and lock.held()
    assert not (tmp_path / LOCK_NAME).exists()


def test_heartbeat_refreshes_and_release_leaves_a_successor_alone(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_NAME
    t = time.time() - 1000
    os.utime(path, (t, t))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime < t + 500:
        assert time.monotonic() < deadline, "the heartbeat never touched the lock"
        time.sleep(0.02)
    # A successor took over (this holder looked dead): release keeps its lock.
    plant(tmp_path, token="successor")
    lock.release()
    assert json.loads(path.read_text())["token"] == "successor"


def test_two_at_once_one_wins(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    RunLock(tmp_path).acquire().release()


def test_late_heartbeat_is_waited_for_then_taken_over(tmp_path):
    # A holder on another node, killed 3 s ago: its successor waits out the
    # stale bound instead of being refused (a job chain must go on).
    # The lock is taken only once its heartbeat is older than the stale
    # bound, which it was not when the successor came.
    plant(tmp_path, age_s=3, host="x3005c0s7b0n0", pid=1)
    with RunLock(tmp_path, heartbeat_s=1, stale_s=4) as lock:
        m = re.search(r"no heartbeat for (\d+) s", lock.note or "")
        assert m and int(m.group(1)) >= 4, lock.note
        assert lock.held()
    assert not (tmp_path / LOCK_NAME).exists()
