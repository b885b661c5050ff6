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

import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Optional

# mpi4py before torch: on Cray systems importing torch first can fail with
# "GTL library is not linked".
from mpi4py import MPI  # noqa: E402

import torch  # noqa: E402

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


def _master_addr(comm, local_size: int) -> str:
    # A job on one node needs no network name at all.
    if local_size == comm.Get_size():
        return "127.0.0.1"
    # launch.sh exports the high-speed-network name on Polaris (the
    # management interface would carry the NCCL bootstrap otherwise).
    return os.environ.get("PRELORA_MASTER_ADDR") or socket.getfqdn()


def _select_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # With a per-rank CUDA_VISIBLE_DEVICES wrapper each rank sees one GPU.
    index = 0 if count == 1 else local_rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


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

    addr_port = None
    if rank == 0:
        addr_port = (_master_addr(comm, local_size), _free_port())
    addr, port = comm.bcast(addr_port, root=0)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )

    import deepspeed

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


def abort(message: str, code: int = 1) -> None:
    """Print ``message`` (with the rank) and end every rank of the job.

    Used for errors one rank sees alone (a corrupt sample, a dead peer):
    ``MPI_Abort`` makes the launcher kill the others, so nothing hangs.
    """
    rank = MPI.COMM_WORLD.Get_rank()
    print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    if MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


class StopSignal:
    """Records a stop request so the trainer can stop at the next step boundary.

    The walltime warnings (SIGTERM from PBS, SIGUSR1 from Slurm's
    ``--signal``) and Ctrl-C (SIGINT) all stop the same way: the handler only
    sets a flag; the trainer all-reduces it, so every rank stops at the same
    step even when the signal reached only some of them, writes a checkpoint
    and exits (``exit_code``). A second SIGINT ends the process at once, with
    one line and exit 130, and no checkpoint beyond the last complete one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

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
