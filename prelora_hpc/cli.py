"""Command-line entry points: the ``prelora`` front door and ``prelora-train``.

    mpiexec -n 2 prelora train --config configs/quickstart.yaml --output-dir runs/qs
    mpiexec -n 8 --ppn 4 prelora-train --config configs/vit_large_imagenet1k.yaml run.epochs=300
    prelora convert /data/imagenet /lus/eagle/projects/P/imagenet1k.h5
    prelora launch -- prelora-bench --preset vit-large

``prelora COMMAND ...`` runs the same ``main`` as ``prelora-COMMAND ...``;
both names stay. Every command keeps one convention: 0 done, 1 an error
(one line on stderr saying what and where), 2 a usage or config error;
the trainer adds 74 (a checkpoint could not be written), 75 (the run
directory is in use), 85 (stopped for walltime after a checkpoint:
resubmit) and 130 (stopped by Ctrl-C after a checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Optional

from . import dist_init  # noqa: F401  (imports mpi4py before torch, see dist_init.py)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-train",
        description="Train a ViT with PreLoRA (or the full/lora baselines) on MPI ranks.",
        epilog="Exit status: 0 done, 85 stopped by a walltime signal after a checkpoint "
               "(resubmit), 130 stopped by Ctrl-C after a checkpoint (rerun to resume), "
               "74 a checkpoint could not be written (no space left), 75 the output "
               "directory is in use by another run, 2 config error, 1 other errors.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--output-dir", help="run directory (the same as run.output_dir)")
    p.add_argument("--resume", help="checkpoint directory to resume from "
                   "(default: the run directory's latest, if any)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, before or after the options; they win over the file")
    return p


def _lock_run(run_dir: str, dist):
    """Collective: rank 0 takes the run directory's lock; every rank learns
    the outcome. Returns (lock on rank 0 or None, error line or None, exit code)."""
    import torch.distributed as tdist

    from .dist_init import EXIT_LOCKED, job_id
    from .runlock import RunLock, RunLocked

    lock, verdict = None, [(None, 0, None)]
    if dist.is_main:
        try:
            lock = RunLock(run_dir, job=job_id()).acquire()
            verdict[0] = (None, 0, lock.note)
        except RunLocked as e:
            verdict[0] = (str(e), EXIT_LOCKED, None)
        except OSError as e:
            verdict[0] = (f"cannot use the run directory {run_dir}: {e.strerror or e}", 1, None)
    tdist.broadcast_object_list(verdict, src=0)
    error, code, note = verdict[0]
    if note and dist.is_main:
        print(f"[prelora] {note}", flush=True)
    return lock, error, code


def train_main(argv: Optional[list[str]] = None) -> int:
    """``prelora-train``: returns 0 when done, 85 when stopped for walltime,
    130 when stopped by Ctrl-C, 74 when a checkpoint could not be written,
    75 when the run directory is in use, 2 on a config error, 1 on other errors."""
    from .dist_init import StopSignal

    # First of all: a Ctrl-C from here on stops the run cleanly, never with a
    # KeyboardInterrupt traceback per rank.
    stop = StopSignal().install()
    try:
        return _train(argv, stop)
    finally:
        stop.restore()


def _train(argv: Optional[list[str]], stop) -> int:
    args = _train_parser().parse_intermixed_args(argv)
    from .config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"prelora-train: config error: {e}", file=sys.stderr)
        return 2

    from .checkpoint import CheckpointError, CheckpointWriteError
    from .data.errors import DataError
    from .dist_init import (EXIT_CHECKPOINT_WRITE, abort, every_rank_says, finish,
                            init_distributed, peer_trouble)

    dist = init_distributed(cfg.run.collective_timeout_s)
    lock, error, code = _lock_run(cfg.run.output_dir, dist)
    if error:
        if dist.is_main:
            print(f"prelora-train: error: {error}", file=sys.stderr, flush=True)
        finish()
        return code
    from .train import NonFiniteLoss, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, dist, resume=args.resume, stop=stop)
        code = trainer.train()
        if code == 0:
            _report_late_signal(stop, dist)
    except (NonFiniteLoss, CheckpointError, CheckpointWriteError) as e:
        # Every rank agreed on it (the loss check, the verification and the
        # save are collective): a clean exit everywhere, no abort needed.
        if dist.is_main:
            print(f"prelora-train: error: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.close()
            trainer = None
        finish()
        return EXIT_CHECKPOINT_WRITE if isinstance(e, CheckpointWriteError) else 1
    except Exception as e:  # noqa: BLE001 - any error must end all ranks
        message = f"{type(e).__name__}: {e}"
        # A peer that is gone (named by the error, or silent to a probe) is
        # said in one line by abort(): a traceback adds nothing, and the
        # ranks it took with it cannot agree on anything.
        trouble = peer_trouble(message)
        # Errors raised on purpose (bad config or data) are one line; anything
        # else is a bug and keeps its traceback.
        if not isinstance(e, (ConfigError, DataError)) and trouble is None:
            traceback.print_exc()
        if trainer is not None:
            # Its workers ignore SIGTERM: end them before the exit waits on them.
            trainer.loaders.close()
        if lock is not None:
            lock.release()      # MPI_Abort ends this process before `finally`
        # Raised alike by every rank (a config or data error, or the same
        # bug): said once and a clean exit. MPI_Abort would also do, but the
        # launcher drops what it has not yet forwarded of the ranks' output,
        # tracebacks included, when it tears the job down.
        if trouble is None and every_rank_says(message):
            if dist.is_main:
                print(f"prelora-train: error: {message}", file=sys.stderr, flush=True)
            finish()
            return 1
        # One line saying what and where; MPI_Abort so no peer waits forever
        # in a collective this rank will never join.
        abort(message, 1, trouble)
        return 1
    else:
        trainer.close()
        trainer = None
        finish()
        return code
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()


def _report_late_signal(stop, dist) -> None:
    """A stop signal that came while the run was finishing changes nothing
    (the run is complete), but it is said, never dropped silently."""
    from .dist_init import StopSignal

    signum = stop.agree(dist.device)
    if signum is not None and dist.is_main:
        name = StopSignal.outcome(signum)[0]
        print(f"[prelora] {name} arrived while the run was finishing: the run is complete and "
              "its final checkpoint written, exit code 0", flush=True)


def convert_main(argv: Optional[list[str]] = None) -> int:
    """``prelora-convert``: ImageNet-style folders to HDF5 (see prelora_hpc.data.convert)."""
    from .data.convert import main

    return main(argv)


#: ``prelora`` subcommands: (module, function, one-line summary).
COMMANDS = {
    "train": ("prelora_hpc.cli", "train_main", "train a run (under mpiexec: one process per GPU)"),
    "convert": ("prelora_hpc.cli", "convert_main", "ImageNet-style folders to HDF5"),
    "export": ("prelora_hpc.export", "main", "merged timm weights and PEFT adapters of a run"),
    "bench": ("prelora_hpc.bench", "main", "stage 1 vs stage 3 (and peers) side by side"),
    "report": ("prelora_hpc.report", "main", "plots and report.md of runs; scaling tables"),
    "compare": ("prelora_hpc.compare", "main", "paired comparison of arms over seeds"),
    "launch": ("prelora_hpc.launch_plan", "main", "the launch line for this allocation"),
    "loader-bench": ("prelora_hpc.data.loader_bench", "main",
                     "data loader supply against the step's demand"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: prelora COMMAND [ARGS...]   (prelora COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Each command is also installed as prelora-COMMAND. Exit status: 0 done, "
              "1 error, 2 usage or config error (train adds 74, 75, 85, 130: see "
              "prelora train --help)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora COMMAND ARGS...``: the command's own exit code; 2 for no or
    an unknown command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prelora: unknown command '{name}' (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), func)(rest)
    except SystemExit as e:  # argparse's usage errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(train_main())
