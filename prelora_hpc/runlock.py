"""One run per output directory: a lock file that works across nodes and
without ``flock``.

``RUN_DIR/prelora.lock`` holds who runs there (host, pid, scheduler job id,
a random token) as JSON. It is created atomically: the holder's record is
written to a private file, then hard-linked to the lock's name; ``link``
fails when the name exists, on every POSIX file system including NFS and
Lustre, where ``O_EXCL`` and ``flock`` are not always safe. While the run
lives, rank 0 touches the file every ``HEARTBEAT_S`` seconds.

A lock is stale, and taken over, when its holder is gone: the same host and
a pid that no longer exists, or a heartbeat older than ``STALE_S`` (a holder
on another node, or one that was killed). A heartbeat that is late but not
yet that old (a job killed at the walltime, its successor starting on other
nodes right away) is waited for: refreshed means alive, and the newcomer is
refused; still silent at ``STALE_S`` means gone, and it takes over. A takeover renames the stale file
to a private name first, so of several processes taking over one lock only
one wins; one that finds it took a live holder's lock gives it back.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "prelora.lock"
#: Seconds between heartbeats (the lock file's mtime).
HEARTBEAT_S = 15.0
#: A lock whose heartbeat is older than this is stale, wherever its holder ran.
STALE_S = 120.0


class RunLocked(RuntimeError):
    """The run directory is in use by another run (the message names it)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # exists, owned by someone else
    return True


def _describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}"


class RunLock:
    """The lock on one run directory, taken by one process (rank 0).

    ``acquire()`` raises RunLocked naming the holder when the directory is
    in use; ``release()`` removes the lock if it is still ours. Usable as a
    context manager.
    """

    def __init__(self, run_dir: Path, job: Optional[str] = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                       "token": secrets.token_hex(8), "since": time.time()}
        self.note: Optional[str] = None
        """Set when a stale lock was taken over: what it said."""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._held = False

    # ------------------------------------------------------------- acquire
    def acquire(self) -> "RunLock":
        """Take the lock (taking over a stale one) and start the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{LOCK_NAME}.{self.record['host']}.{os.getpid()}."
                                   f"{self.record['token']}")
        mine.write_text(json.dumps(self.record))
        try:
            for _ in range(5):
                try:
                    os.link(mine, self.path)
                    self._held = True
                    break
                except FileExistsError:
                    holder, age = self._read_holder()
                    if holder is None:
                        continue            # vanished meanwhile (released): try again
                    why = self._stale_because(holder, age)
                    if why is None and age > 2 * self.heartbeat_s:
                        holder, age, why = self._wait_for_heartbeat(holder, age)
                        if holder is None:
                            continue
                    if why is None:
                        raise RunLocked(
                            f"{self.path.parent} is in use by another run ({_describe(holder)}, "
                            f"alive {age:.0f} s ago; lock file {self.path}); wait for it to end, "
                            "or give this run another --output-dir") from None
                    if self._take_over(holder):
                        self.note = (f"took over the stale lock of {_describe(holder)} "
                                     f"({why})")
            if not self._held:
                raise RunLocked(f"could not take the lock {self.path}: other processes keep "
                                "taking it at the same time")
        finally:
            mine.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name="prelora-runlock",
                                        daemon=True)
        self._thread.start()
        return self

    def _read_holder(self) -> tuple[Optional[dict], float]:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except ValueError:
            # A half-written or foreign file: judged by its age alone.
            holder = {"host": "?", "pid": "?", "token": None}
        return holder, age

    def _wait_for_heartbeat(self, holder: dict, age: float):
        """A late heartbeat: wait until it comes (alive) or ``stale_s`` passes (gone)."""
        while True:
            time.sleep(max(0.05, min(self.heartbeat_s, self.stale_s - age + 0.05)))
            now, new_age = self._read_holder()
            if now is None or now.get("token") != holder.get("token"):
                return None, 0.0, None          # released or replaced meanwhile
            if new_age < age:
                return now, new_age, None        # it beat: alive
            why = self._stale_because(now, new_age)
            if why is not None:
                return now, new_age, why
            age = new_age

    def _stale_because(self, holder: dict, age: float) -> Optional[str]:
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int) \
                and not pid_alive(holder["pid"]):
            return "that process no longer exists"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock out of the way; False if someone else did."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            taken = json.loads(aside.read_text())
        except ValueError:
            taken = {"token": None}
        if isinstance(taken, dict) and taken.get("token") != holder.get("token"):
            # Between our look and the rename another process took over and
            # now holds it: put its lock back (link fails if yet another
            # has one by now, and then that one is the holder).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.touch()

    def touch(self) -> None:
        """Refresh the heartbeat (the lock file's mtime), if the lock is still ours."""
        if self.held():
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def held(self) -> bool:
        """Whether the lock file on disk is still this process's."""
        if not self._held:
            return False
        holder, _ = self._read_holder()
        return holder is not None and holder.get("token") == self.record["token"]

    # -------------------------------------------------------------- release
    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
