"""Command-line entry points.

    mpiexec -n 2 prelora-train --config configs/quickstart.yaml --output-dir runs/qs
    mpiexec -n 8 --ppn 4 prelora-train --config configs/vit_large_imagenet1k.yaml run.epochs=300
    prelora-convert /data/imagenet /lus/eagle/projects/P/imagenet1k.h5
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional

from . import launch  # noqa: F401  (imports mpi4py before torch, see launch.py)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-train",
        description="Train a ViT with PreLoRA (or the full/lora baselines) on MPI ranks.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--output-dir", help="run directory (the same as run.output_dir)")
    p.add_argument("--resume", help="checkpoint directory to resume from "
                   "(default: the run directory's latest, if any)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides; they win over the file")
    return p


def train_main(argv: Optional[list[str]] = None) -> int:
    """``prelora-train``: returns 0 when done, 85 when stopped for walltime, 1 on error."""
    args = _train_parser().parse_args(argv)
    from .config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"prelora-train: config error: {e}", file=sys.stderr)
        return 2

    from .launch import StopSignal, abort, finish, init_distributed

    stop = StopSignal().install()
    dist = init_distributed(cfg.run.collective_timeout_s)
    from .train import NonFiniteLoss, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, dist, resume=args.resume, stop=stop)
        code = trainer.train()
    except NonFiniteLoss as e:
        # Every rank agreed on it (the loss check is all-reduced): a clean
        # exit everywhere, no abort needed.
        if dist.is_main:
            print(f"prelora-train: error: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.close()
            trainer = None
        finish()
        return 1
    except Exception as e:  # noqa: BLE001 - any error must end all ranks
        # One line saying what and where; MPI_Abort so no peer waits forever
        # in a collective this rank will never join.
        if not isinstance(e, (ConfigError, ValueError, FileNotFoundError, OSError)):
            traceback.print_exc()
        abort(f"{type(e).__name__}: {e}", 1)
        return 1
    else:
        trainer.close()
        trainer = None
        finish()
        return code
    finally:
        if trainer is not None:
            trainer.close()
        stop.restore()


def convert_main(argv: Optional[list[str]] = None) -> int:
    """``prelora-convert``: ImageNet-style folders to HDF5 (see prelora_hpc.data.convert)."""
    from .data.convert import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
