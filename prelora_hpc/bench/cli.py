"""``prelora-bench``'s command line: the options, the config they make, ``main``.

Exit status: 0 done, 2 a usage or config error (a bad option, preset,
config key or rank map; every rank sees the same one), 1 any other error
(one line on stderr saying what and where, then every rank ends).
"""

from __future__ import annotations

# mpi4py before torch (dist_init.py explains why).
from .. import dist_init

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from ..config import Config, ConfigError, load_config  # noqa: E402
from ..model import build_model  # noqa: E402
from .cost import (DEFAULT_BANDWIDTH_GBPS, count_only, load_rank_map,  # noqa: E402
                   representative_rank_map)
from .output import format_count, format_markdown, format_table, scaling_row  # noqa: E402
from .presets import BENCH_FIXED, Preset, load_preset, preset_names  # noqa: E402
from .runner import PEERS, Options, run  # noqa: E402

#: The preset without --preset or --config.
DEFAULT_PRESET = "cpu-small"


def _parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{n}: {load_preset(n).description}" for n in preset_names())
    p = argparse.ArgumentParser(
        prog="prelora-bench",
        description="Time and size stage 1 (full) against stage 3 (LoRA only) on the same "
                    "model and batch; project both to 512 nodes.",
        epilog=f"presets: {presets}. Exit status: 0 done, 2 usage or config error, 1 other errors.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, metavar="NAME|FILE.yaml",
                     help=f"benchmark size: {', '.join(preset_names())} or a preset YAML file "
                          f"(default {DEFAULT_PRESET} without --config)")
    src.add_argument("--config", help="a run's YAML config instead of a preset (its model, "
                     "lora, prelora and deepspeed sections are used; data is synthetic)")
    p.add_argument("--steps", type=int, help="timed steps per stage (preset's default)")
    p.add_argument("--warmup", type=int, help="untimed steps first (at least 1)")
    p.add_argument("--stages", default="1,3", help="'1,3' (default), '1' or '3'")
    p.add_argument("--micro-batch", type=int, help="images per rank per step")
    p.add_argument("--global-batch", type=int,
                   help="images per step over all ranks (strong scaling); micro batch = this / ranks")
    p.add_argument("--rank-map", type=Path, help="JSON rank map (e.g. a run's rank_map.json); "
                   "default: a representative one drawn by Algorithm 2 from seeded random changes")
    p.add_argument("--r-min", type=int, help="smallest rank of the representative map")
    p.add_argument("--r-max", type=int, help="largest rank of the representative map")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and rank map")
    p.add_argument("--window-steps", type=int, help="steps per convergence window for the "
                   "bookkeeping share (preset's default, or the config's prelora.window_steps)")
    p.add_argument("--bandwidth-gbps", type=float, help="network bandwidth per node for the "
                   "projection, Gb/s (default: measured on >1 rank, else 200 = a Slingshot NIC)")
    p.add_argument("--latency-us", type=float,
                   help="all-reduce latency per hop, us (default: measured on >1 rank, else 0)")
    p.add_argument("--count-only", action="store_true",
                   help="print stage-1/stage-3 trainable parameters (meta device) and exit")
    p.add_argument("--no-checks", action="store_true", help="skip the structural checks")
    p.add_argument("--peer", choices=PEERS, help="also time each stage under a peer: 'ddp' is "
                   "torch DistributedDataParallel with torch AdamW (stage 3: its trainable "
                   "parameters only); reports ours / peer")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (stage 3 without "
                   "adapters) that stage 3 is reported against")
    p.add_argument("--no-interleave", action="store_true", help="skip stepping stage 1, stage 3 "
                   "and the floor in turn (the interleaved ratios, which drift least)")
    p.add_argument("--json", type=Path, help="write the full result as JSON here (rank 0)")
    p.add_argument("--markdown", type=Path, help="write the result as a Markdown table here")
    p.add_argument("--scaling-row", choices=("weak", "strong"),
                   help="also write one scaling row per stage (needs --json-row-dir)")
    p.add_argument("--json-row-dir", type=Path,
                   help="directory for scaling rows: <scaling>-<stage>-n<gpus>.json")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides (e.g. deepspeed.zero_stage=1); they win")
    return p


def _resolve(args: argparse.Namespace, world_size: int) -> tuple[Config, Optional[Preset]]:
    """The run's config (preset or --config, then the bench's fixed settings,
    then the options, then the overrides) and its preset (None with --config).
    ``ConfigError`` naming the key and file for anything wrong."""
    preset = None if args.config else load_preset(args.preset or DEFAULT_PRESET)
    overrides = list(preset.overrides) if preset else []
    overrides += BENCH_FIXED + ["deepspeed.train_batch_size=null", f"run.seed={args.seed}"]
    if args.global_batch is not None:
        if args.global_batch <= 0 or args.global_batch % world_size:
            raise ConfigError(f"--global-batch {args.global_batch} is not a positive multiple of "
                              f"the {world_size} ranks")
        overrides.append(f"deepspeed.micro_batch_size={args.global_batch // world_size}")
    elif args.micro_batch is not None:
        overrides.append(f"deepspeed.micro_batch_size={args.micro_batch}")
    if args.r_min is not None:
        overrides.append(f"prelora.r_min={args.r_min}")
    if args.r_max is not None:
        overrides.append(f"prelora.r_max={args.r_max}")
    overrides += list(args.overrides)
    cfg = load_config(args.config, overrides)
    return cfg, preset


def _where(e: BaseException) -> str:
    """``file:line in function`` of the innermost frame an exception passed."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-bench``: 0 on success, 2 on a usage or config error, 1 on
    any other error (after one line on stderr; every rank ends)."""
    args = _parser().parse_args(argv)
    if args.config and args.preset:
        print("prelora-bench: give --preset or --config, not both", file=sys.stderr)
        return 2
    if bool(args.scaling_row) != bool(args.json_row_dir):
        print("prelora-bench: --scaling-row and --json-row-dir go together", file=sys.stderr)
        return 2
    try:
        stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        stages = []
    if not stages or any(s not in (1, 3) for s in stages):
        print(f"prelora-bench: --stages must be '1,3', '1' or '3', got {args.stages!r}",
              file=sys.stderr)
        return 2

    from mpi4py import MPI
    world = MPI.COMM_WORLD.Get_size()
    try:
        cfg, preset = _resolve(args, world)
    except ConfigError as e:
        print(f"prelora-bench: config error: {e}", file=sys.stderr)
        return 2
    name = preset.name if preset else f"--config {args.config}"
    try:
        if args.rank_map:
            rank_map, source = load_rank_map(args.rank_map), str(args.rank_map)
        else:
            with torch.device("meta"):
                depth = len(build_model(cfg.model).blocks)
            rank_map = representative_rank_map(depth, cfg.lora.target_modules, cfg.prelora.r_min,
                                               cfg.prelora.r_max, args.seed)
            source = (f"representative (Algorithm 2 on uniform random changes, seed {args.seed}, "
                      f"r {cfg.prelora.r_min}..{cfg.prelora.r_max})")
    except ValueError as e:
        print(f"prelora-bench: {e}", file=sys.stderr)
        return 2

    if args.count_only:
        try:
            print(format_count(count_only(cfg, rank_map, args.bandwidth_gbps or DEFAULT_BANDWIDTH_GBPS)))
        except ValueError as e:
            print(f"prelora-bench: {e}", file=sys.stderr)
            return 2
        return 0

    steps = args.steps if args.steps is not None else (preset.steps if preset else 20)
    warmup = args.warmup if args.warmup is not None else (preset.warmup if preset else 5)
    if steps < 1 or warmup < 1:
        print("prelora-bench: --steps and --warmup must be >= 1", file=sys.stderr)
        return 2
    ws = args.window_steps
    if ws is None:
        ws = cfg.prelora.window_steps if isinstance(cfg.prelora.window_steps, int) else (
            preset.window_steps if preset else None)
    opts = Options(steps=steps, warmup=warmup, stages=stages, window_steps=ws, seed=args.seed,
                   checks=not args.no_checks, floor=not args.no_floor, peer=args.peer,
                   interleave=not args.no_interleave)

    dist = dist_init.init_distributed(cfg.run.collective_timeout_s)
    try:
        result = run(cfg, dist, rank_map, source, opts, args.bandwidth_gbps, args.latency_us,
                     preset=name)
    except ValueError as e:
        # A rank map that does not fit the model, an impossible batch: every
        # rank hits the same error, so a plain exit is enough.
        if dist.is_main:
            print(f"prelora-bench: {e}", file=sys.stderr)
        dist_init.finish()
        return 2
    except Exception as e:  # noqa: BLE001 - any other error must end all ranks
        _abort(e)
    result["command"] = " ".join(["prelora-bench"] + (sys.argv[1:] if argv is None else argv))
    if dist.is_main:
        try:
            _write(result, args, stages)
        except Exception as e:  # noqa: BLE001 - rank 0 alone: the others wait in finish()
            _abort(e)
    dist_init.finish()
    return 0


def _abort(e: BaseException) -> None:
    """One line saying what and where, then every rank ends with exit 1
    (MPI_Abort: the error may be this rank's alone, and no peer may wait
    forever for it)."""
    dist_init.abort(f"prelora-bench: {type(e).__name__}: {e} (at {_where(e)})", 1)


def _write(result: dict, args: argparse.Namespace, stages: list[int]) -> None:
    """Rank 0: print the table; write --json, --markdown and the scaling rows."""
    print(format_table(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(result))
    if args.json_row_dir:
        args.json_row_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            row = scaling_row(result, stage, args.scaling_row)
            path = args.json_row_dir / f"{args.scaling_row}-{stage}-n{row['gpus']}.json"
            path.write_text(json.dumps(row) + "\n")
