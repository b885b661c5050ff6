"""MPI bootstrap of torch.distributed: the one place that reads MPI and
scheduler environment.

Launch one process per GPU (or per CPU slot) with any MPI launcher:

    mpiexec -n 8 --ppn 4 prelora-train --config configs/vit_large_imagenet1k.yaml   # Polaris
    srun --mpi=pmi2 -n 8 prelora-train --config ...                                  # Slurm
    mpiexec -n 2 prelora-train --config configs/quickstart.yaml                      # laptop / CI
    prelora-train --config configs/quickstart.yaml                                   # 1 process

Rank, world size and local rank come from mpi4py (local rank from a
node-local split communicator, so Cray MPICH/PALS, MPICH, Open MPI and srun
behave alike); rank 0 picks the rendezvous address and port and broadcasts
them over MPI; then ``deepspeed.init_distributed`` runs with NCCL on GPUs and
gloo on the CPU, with all five variables exported so DeepSpeed's own MPI
discovery (which would pick the address by itself) never runs.
"""

from __future__ import annotations

import array
import datetime
import fcntl
import hashlib
import os
import signal
import socket
import stat
import sys
import termios
import time
from dataclasses import dataclass
from typing import Optional

# mpi4py before torch: on Cray systems importing torch first can fail with
# "GTL library is not linked".
from mpi4py import MPI  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .launch_plan import MASTER_ADDR_VAR  # noqa: E402

#: Exit code of a run stopped by a walltime signal after checkpointing; job
#: scripts resubmit on it.
EXIT_RESUBMIT = 85
#: Exit code of a run stopped by Ctrl-C (SIGINT) after checkpointing, as a
#: shell reports a command ended by SIGINT; rerunning the command resumes.
EXIT_INTERRUPTED = 130
#: Exit code of a run that could not write a checkpoint (no space left, a
#: quota, an I/O error); job scripts never resubmit on it: a rerun would
#: fail the same way until space is freed.
EXIT_CHECKPOINT_WRITE = 74
#: Exit code of a run refused because another run holds its output directory.
EXIT_LOCKED = 75


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _master_name(single_node: bool) -> str:
    """The name rank 0 offers for the rendezvous."""
    # A job on one node needs no network name at all.
    if single_node:
        return "127.0.0.1"
    # prelora-launch exports the high-speed-network name where it resolves
    # (Polaris: the management interface would carry the bootstrap
    # otherwise); else the node's own name, as the other nodes know it.
    return os.environ.get(MASTER_ADDR_VAR) or socket.gethostname()


def _resolve(name: str) -> tuple[Optional[str], str]:
    """``name``'s IPv4 address on this node, or None and why not."""
    try:
        addr = socket.gethostbyname(name)
    except OSError as e:
        return None, f"does not resolve ({e})"
    if addr.startswith("127."):
        # Debian maps the host name to 127.0.1.1: a peer node would dial itself.
        return None, f"resolves to the loopback address {addr}"
    return addr, ""


def source_address(addr: str) -> Optional[str]:
    """This node's address on the route to ``addr`` (None: no route).

    The kernel's route decides: a UDP socket "connected" to ``addr`` (no
    packet is sent) takes that route's source address.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_for(addr: str) -> Optional[str]:
    """The name of the network interface this node reaches ``addr`` through:
    the one holding :func:`source_address`. None when no route or no match."""
    import fcntl
    import struct

    source = source_address(addr)
    if source is None:
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue        # an interface without an IPv4 address
            if socket.inet_ntoa(packed[20:24]) == source:
                return name
    return None


def _check_rendezvous(comm, name: str) -> str:
    """Every rank resolves rank 0's ``name``; returns its address.

    All ranks learn every rank's result, so a name one node cannot resolve
    ends the job on every rank with one line naming those nodes, instead of
    a connection timeout much later.
    """
    addr, why = _resolve(name)
    results = comm.allgather((socket.gethostname(), addr, why))
    bad = {}
    for host, a, w in results:
        if a is None:
            bad.setdefault((host, w), 0)
    if bad:
        if comm.Get_rank() == 0:
            where = "; ".join(f"on {h}: {w}" for h, w in bad)
            print(f"[rank 0] error: the rendezvous name {name!r} (rank 0's node) {where}; "
                  "list every node in each node's /etc/hosts or DNS, or export "
                  f"{MASTER_ADDR_VAR} with a name that resolves everywhere",
                  file=sys.stderr, flush=True)
        raise SystemExit(1)
    return addr


def _bind_comm_to_link(master_ip: str, local_size: int, world: int) -> None:
    """Across nodes, make gloo and DeepSpeed use the inter-node link.

    gloo binds to the address its host name resolves to, which may be the
    loopback (127.0.1.1), a management network, or a container bridge that
    the other nodes cannot reach: GLOO_SOCKET_IFNAME names the interface
    that routes to rank 0's rendezvous address instead (a value the user
    set wins).

    DeepSpeed's CPU shared-memory all-reduce turns itself on when
    LOCAL_SIZE equals the world size, and would then wait forever for ranks
    on other nodes; across nodes LOCAL_SIZE is this node's rank count, so it
    stays off and collectives go through gloo (read in DeepSpeed 0.19.8's
    comm/torch.py and shm_interface.cpp; the CUDA accelerator has no such
    op). On one node LOCAL_SIZE is left as the launcher set it.
    """
    if local_size == world:
        return
    os.environ["LOCAL_SIZE"] = str(local_size)
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        ifname = interface_for(master_ip)
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname


#: Across nodes: each node's address on the inter-node link -> (host, ranks),
#: so an error naming a peer's address can say which ranks it lost.
_PEERS: dict[str, tuple[str, list[int]]] = {}
#: Across nodes: each node's address -> the port of its rank's answering socket.
_ANSWER_PORTS: dict[str, int] = {}
#: Seconds a lost peer gets to answer a connection when an error names none.
PROBE_TIMEOUT_S = 2.0
#: Seconds MPI_Abort gets to end this process; a launcher that cannot reach
#: its other nodes may never answer it.
ABORT_GRACE_S = 10
#: Seconds an aborting rank waits for the launcher to read its last lines.
OUTPUT_DRAIN_S = 3.0


def _answering_socket(addr: str) -> int:
    """A socket on ``addr`` that accepts and closes connections, from a daemon
    thread: after a failure the other nodes can tell a node that is gone
    (no answer) from one that is merely slow. Returns its port."""
    import threading

    srv = socket.create_server((addr, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, name="prelora-answer", daemon=True).start()
    return srv.getsockname()[1]


def _record_peers(comm, master_ip: str) -> None:
    addr = source_address(master_ip) or ""
    port = 0
    if addr:
        try:
            port = _answering_socket(addr)
        except OSError:
            port = 0
    me = (addr, socket.gethostname(), comm.Get_rank(), port)
    _PEERS.clear()
    _ANSWER_PORTS.clear()
    for a, host, r, p in comm.allgather(me):
        if a:
            _PEERS.setdefault(a, (host, []))[1].append(r)
            if p and a not in _ANSWER_PORTS:
                _ANSWER_PORTS[a] = p


def silent_peers(timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The other nodes of this job that do not answer a connection within
    ``timeout_s``, as "ranks 2-3 on emu1 (10.0.0.2)"; in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    targets = [(a, p) for a, p in _ANSWER_PORTS.items() if not _on_this_node(a)]

    def answers(target) -> bool:
        try:
            socket.create_connection(target, timeout=timeout_s).close()
            return True
        except OSError:
            return False

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(64, len(targets))) as pool:
        alive = list(pool.map(answers, targets))
    return [f"{_ranks_text(_PEERS[a][1])} on {_PEERS[a][0]} ({a})"
            for (a, _), ok in zip(targets, alive) if not ok]


def _on_this_node(addr: str) -> bool:
    """Whether ``addr`` is, in ``_PEERS``, an address of this rank's own node."""
    return addr in _PEERS and _PEERS[addr][0] == socket.gethostname()


def _ranks_text(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def describe_lost_peer(message: str) -> Optional[str]:
    """Which ranks a peer error is about, e.g. ``ranks 2-3 on emu1 (10.0.0.2)``
    for gloo's "Read error [10.0.0.2]:41234: Connection reset by peer", when
    the address is another node's of this job; None otherwise.

    An address of this rank's own node names a rank beside it that dropped
    its connections, most often over the failure it met first (a node that
    went silent), so it says nothing of which node was lost."""
    import re

    for addr in re.findall(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]", message):
        if addr in _PEERS and not _on_this_node(addr):
            host, ranks = _PEERS[addr]
            return f"{_ranks_text(ranks)} on {host} ({addr})"
    return None


def _select_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # With a per-rank CUDA_VISIBLE_DEVICES wrapper each rank sees one GPU.
    index = 0 if count == 1 else local_rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _bound_new_groups(timeout_s: int) -> None:
    """Give process groups made later the job's collective timeout.

    ``new_group`` without a timeout takes torch's module default (30 min
    for gloo, 10 for NCCL), not the world group's, and DeepSpeed makes its
    data-parallel groups that way; the engine's broadcasts and reductions
    run on them. A peer that vanishes without closing its sockets (a node
    that dies, a link that goes down) then holds every rank for that long,
    until TCP itself gives up. Checked in torch 2.14 (distributed_c10d
    ``_get_default_timeout`` reads these module globals) with DeepSpeed 0.19.8.
    """
    from torch.distributed import distributed_c10d as c10d

    bound = datetime.timedelta(seconds=timeout_s)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, bound)


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Initialise MPI, torch.distributed and DeepSpeed's communication layer.

    Works with or without an MPI launcher (a lone process is world size 1).
    ``timeout_s`` bounds every collective, so a rank that dies makes the
    others fail within that many seconds instead of hanging. Idempotent.
    """
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()

    device = _select_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # One node when every rank shares rank 0's node.
    single_node = comm.allreduce(local_size, op=MPI.MIN) == world
    addr_port = None
    if rank == 0:
        addr_port = (_master_name(single_node), _free_port())
    addr, port = comm.bcast(addr_port, root=0)
    if not single_node:
        master_ip = _check_rendezvous(comm, addr)
        _bind_comm_to_link(master_ip, local_size, world)
        _record_peers(comm, master_ip)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )

    import deepspeed

    _bound_new_groups(timeout_s)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world,
        )
    return DistInfo(rank, world, local_rank, local_size, device, backend, socket.gethostname())


def finish() -> None:
    """End the job's collectives cleanly; call on every rank before a normal exit.

    Without it a rank that is done early (rank 0 still writing its table)
    exits while its peers' gloo/DeepSpeed background threads hold
    connections to it, and C++ teardown at interpreter exit then sometimes
    ends a peer with ``terminate called without an active exception``
    (SIGABRT, exit 6) after all the work succeeded. The MPI barrier keeps
    every rank alive until all are done; then the process group goes down
    while nothing is in flight. Idempotent.
    """
    if MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def every_rank_says(message: str, timeout_s: float = 10.0) -> bool:
    """Collective with a deadline: True when every rank called it with the
    same ``message`` within ``timeout_s`` seconds (an error all ranks raise
    alike, printed once), False when some rank did not come or said
    something else (it is then that rank's own error, said with its rank).

    Non-blocking, so a rank stuck elsewhere costs the wait, never a hang.
    """
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return True
    h = int.from_bytes(hashlib.blake2b(message.encode(), digest_size=7).digest(), "big")
    send = np.array([h, -h], dtype=np.int64)
    got = np.zeros(2, dtype=np.int64)
    req = comm.Iallreduce(send, got, op=MPI.MAX)
    deadline = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return int(got[0]) == -int(got[1]) == h


def peer_trouble(message: str) -> Optional[str]:
    """What a failed collective's ``message`` says the job lost, or None.

    "lost contact with ranks 2-3 on emu1 (10.0.0.2)" when the error names
    another node's address; when it names none (a timeout), "no answer from
    ..." for the nodes that no longer accept a connection (they died, or
    their link went down), probed for up to ``PROBE_TIMEOUT_S``. Single-node
    jobs have no such peers: always None there.
    """
    lost = describe_lost_peer(message)
    if lost:
        return f"lost contact with {lost}"
    if _ANSWER_PORTS:
        silent = silent_peers()
        if silent:
            return f"no answer from {'; '.join(silent)}"
    return None


def abort(message: str, code: int = 1, trouble: Optional[str] = None) -> None:
    """Print ``message`` (with the rank) and end every rank of the job.

    Used for errors one rank sees alone (a corrupt sample, a dead peer):
    ``MPI_Abort`` makes the launcher kill the others, so nothing hangs.
    ``trouble`` is ``peer_trouble(message)`` when the caller has it already.
    """
    rank = MPI.COMM_WORLD.Get_rank()
    # gloo's own text goes on with advice; the address is what matters.
    message = message.split(" This is typically caused")[0]
    trouble = trouble or peer_trouble(message)
    if trouble:
        message = f"{trouble}: {message}"
    print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    if MPI.COMM_WORLD.Get_size() > 1:
        # The launcher tears the job down on MPI_Abort and drops what it has
        # not yet read of the ranks' output: the line above included.
        wait_for_output_read(OUTPUT_DRAIN_S)
        # The default action of SIGALRM ends the process even while MPI_Abort
        # blocks in C: a rank cut off from the launcher's other nodes would
        # otherwise wait for an answer that never comes.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


def wait_for_output_read(timeout_s: float, streams=None) -> bool:
    """Wait until the reader of this process's stdout and stderr (the MPI
    launcher's proxy, when they are pipes), or of ``streams``, has taken
    everything written to them, for at most ``timeout_s`` seconds. True when
    nothing is left unread.

    Files and terminals hold nothing back, so only pipes are waited for.
    """
    pipes = []
    for stream in streams or (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fd = stream.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                pipes.append(fd)
        except (OSError, ValueError, AttributeError):
            continue
    deadline = time.monotonic() + timeout_s
    unread = array.array("i", [0])
    while pipes:
        try:
            fcntl.ioctl(pipes[0], termios.FIONREAD, unread, True)
        except OSError:
            unread[0] = 0
        if unread[0] == 0:
            pipes.pop(0)
        elif time.monotonic() > deadline:
            return False
        else:
            time.sleep(0.01)
    return True


class StopSignal:
    """Records a stop request so the trainer can stop at the next step boundary.

    The walltime warnings (SIGTERM from PBS, SIGUSR1 from Slurm's
    ``--signal``), a hang-up (SIGHUP) and Ctrl-C (SIGINT) all stop the same
    way: the handler only
    sets a flag; the trainer all-reduces it, so every rank stops at the same
    step even when the signal reached only some of them, writes a checkpoint
    and exits (``exit_code``). A second SIGINT ends the process at once, with
    one line and exit 130, and no checkpoint beyond the last complete one.
    """

    #: Also the signals DataLoader workers ignore (the scheduler's
    #: signals reach every process of a job).
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            # The user insists: no checkpoint, no traceback. os._exit skips
            # interpreter teardown, which could block on a peer's collective.
            print(f"[rank {MPI.COMM_WORLD.Get_rank()}] second interrupt: stopping now without "
                  "a checkpoint (the last complete one stays the latest)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        # A user's Ctrl-C wins over a walltime warning: it must not resubmit.
        if self.received != signal.SIGINT:
            self.received = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received else None

    def agree(self, device: torch.device) -> Optional[int]:
        """Collective: the stop signal every rank acts on (SIGINT wins), or None.

        A signal that reached some ranks only, or a different one per rank,
        gives every rank the same answer, hence the same exit code.
        """
        kind = 0 if self.received is None else 2 if self.received == signal.SIGINT else 1
        t = torch.tensor([kind, self.received or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        kind, signum = int(t[0]), int(t[1])
        if kind == 0:
            return None
        # With kind 1 no rank saw SIGINT: any walltime signal means the same.
        return int(signal.SIGINT) if kind == 2 else signum

    @staticmethod
    def outcome(signum: Optional[int]) -> tuple[str, int, str]:
        """(signal name, exit code, what comes next) of a run that ``signum``
        stopped after a checkpoint."""
        if signum == signal.SIGINT:
            return "SIGINT", EXIT_INTERRUPTED, "rerun the same command to resume"
        name = signal.Signals(signum).name if signum else "a stop request"
        return name, EXIT_RESUBMIT, "asks the job script to resubmit"


def job_id() -> Optional[str]:
    """The batch scheduler's id of this job (PBS_JOBID, SLURM_JOB_ID), or None."""
    return os.environ.get("PBS_JOBID") or os.environ.get("SLURM_JOB_ID") or None
