"""How many DataLoader workers a rank needs to keep its training step fed.

    python -m prelora_hpc.data.loader_bench                       # embedded digits, 224 px
    python -m prelora_hpc.data.loader_bench --path /lus/.../imagenet1k.h5 --max-workers 8
    python -m prelora_hpc.data.loader_bench --fake-jpeg 256 --json bench.json

Measures (1) the loader's supply: images/s through read + decode +
training transform at --img-size, for 0..--max-workers workers, and (2) the
training step's demand: images/s of the trainer's own step
(``step.TrainStep``: forward, loss, backward and AdamW step of a DeepSpeed
engine over the run's ViT) on random input, on the device a rank trains on
(its GPU if it has one, else the CPU). The ratio says how
many workers one rank needs. --fake-jpeg N converts N ImageNet-sized JPEGs
(500x375, about ImageNet's mean) first, because the 32x32 digits PNGs decode
far faster than real photographs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# mpi4py before torch (launch.py explains why): the step runs on an engine.
from .. import launch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402
from PIL import Image  # noqa: E402

from ..config import DataConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .digits import ensure_digits_hdf5  # noqa: E402
from .hdf5 import HDF5ImageDataset  # noqa: E402
from .seeding import sample_seed  # noqa: E402
from .transforms import build_transform  # noqa: E402


def write_fake_jpegs(root: Path, count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> None:
    """``count`` photo-like JPEGs (smooth colour fields plus noise, quality 90) in 10 class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * fx + phase * c) * np.cos(yy * fy + c) for c in range(3)], -1)
        pixels = 127 + 90 * base + rng.normal(0, 12, size=(h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def loader_rate(ds: torch.utils.data.Dataset, workers: int, batch_size: int, batches: int,
                seed: int = 0) -> float:
    """Images/s delivered by a DataLoader with ``workers`` workers, after its first batch.

    The first batch (worker start-up) is not timed; ``batches`` more are.
    Each sample comes with its own augmentation seed, ``(index, seed)``, as
    the trainer's sampler gives them (``ShardedSampler(with_seeds=True)``):
    the seeding is part of what a training sample costs.
    """
    indices = torch.utils.data.RandomSampler(ds, replacement=True,
                                             num_samples=batch_size * (batches + 1),
                                             generator=torch.Generator().manual_seed(seed))
    keys = [(int(i), sample_seed(seed, 0, k)) for k, i in enumerate(indices)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=keys, num_workers=workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in it)
    return n / (time.perf_counter() - t0)


def step_rate(model_name: str, num_classes: int, img_size: int, batch_size: int, steps: int,
              warmup: int) -> tuple[float, torch.device]:
    """Images/s of the trainer's training step (``step.TrainStep`` on a
    DeepSpeed engine over ``model.build_model``'s ViT, the run's default
    optimizer, precision and ZeRO settings) on random input [batch_size, 3,
    img_size, img_size], after ``warmup`` untimed steps; and the device it
    ran on. Under mpiexec every rank steps (the rate is one rank's)."""
    from ..config import load_config
    from ..engine import build_engine, destroy_engine, resolve_precision
    from ..model import build_model
    from ..step import TrainStep

    cfg = load_config(None, [f"model.name={model_name}", f"model.num_classes={num_classes}",
                             f"model.img_size={img_size}",
                             f"deepspeed.micro_batch_size={batch_size}",
                             "deepspeed.grad_accum_steps=1", "data.source=synthetic"])
    owned = not torch.distributed.is_initialized()
    dist = launch.init_distributed(cfg.run.collective_timeout_s)
    engine = build_engine(build_model(cfg.model).to(dist.device), cfg, dist)
    try:
        step = TrainStep(engine, dist.device, resolve_precision(cfg, dist.device),
                         cfg.optim.label_smoothing)
        # Images come from the loader on the host; the step moves and casts them.
        x = torch.randn(batch_size, 3, img_size, img_size)
        y = torch.randint(0, num_classes, (batch_size,))

        def sync():
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)

        for _ in range(warmup):
            step(x, y)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        sync()
        rate = batch_size * steps / (time.perf_counter() - t0)
    finally:
        destroy_engine(engine)
        if owned:
            launch.finish()
    return rate, dist.device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prelora_hpc.data.loader_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--path", help="HDF5 file or shard directory (default: the embedded digits)")
    p.add_argument("--fake-jpeg", type=int, metavar="N", help="benchmark N generated 500x375 JPEGs instead")
    p.add_argument("--split", default="train")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker count")
    p.add_argument("--auto-augment", default=None, help="e.g. rand-m9-mstd0.5-inc1 (default: none)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p


def run(args: argparse.Namespace, path: Path) -> dict:
    """Measure everything; returns the figures (as written by --json)."""
    data_cfg = DataConfig(source="hdf5", path=str(path), auto_augment=args.auto_augment)
    ds = HDF5ImageDataset(path, args.split, build_transform(data_cfg, args.img_size, is_training=True))
    supply = []
    for w in range(args.max_workers + 1):
        rate = loader_rate(ds, w, args.batch_size, args.batches)
        supply.append({"workers": w, "images_per_s": rate, "per_worker": rate / max(w, 1)})
        print(f"  loader, {w} worker(s): {rate:8.1f} img/s", file=sys.stderr, flush=True)
    demand, device = step_rate(args.model, ds.num_classes, args.img_size, args.batch_size,
                               args.steps, args.warmup)
    # One worker's rate is the honest per-worker figure: with more workers
    # than free cores the per-worker rate falls.
    per_worker = next(s["per_worker"] for s in supply if s["workers"] == 1) if args.max_workers else \
        supply[0]["images_per_s"]
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch_threads": torch.get_num_threads()},
        "data": {"path": str(path), "split": args.split, "images": len(ds), "img_size": args.img_size,
                 "auto_augment": args.auto_augment, "batch_size": args.batch_size},
        "loader": supply,
        "train_step": {"model": args.model, "device": device.type, "images_per_s": demand},
        "workers_needed": math.ceil(demand / per_worker) if per_worker > 0 else None,
    }


def format_table(r: dict) -> str:
    """The figures as a plain-text table."""
    lines = [f"data: {r['data']['path']} [{r['data']['split']}], {r['data']['images']} images, "
             f"{r['data']['img_size']} px, batch {r['data']['batch_size']}",
             "workers   img/s   img/s per worker"]
    for s in r["loader"]:
        per = "(main process)" if s["workers"] == 0 else f"{s['per_worker']:.1f}"
        lines.append(f"{s['workers']:>7} {s['images_per_s']:>7.1f}   {per}")
    t = r["train_step"]
    lines.append(f"training step ({t['model']}, the trainer's step on {r['machine']['device']}): "
                 f"{t['images_per_s']:.1f} img/s")
    lines.append(f"workers needed per rank to keep up: {r['workers_needed']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark, print the table, optionally write JSON; returns 0."""
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prelora-loader-bench-") as tmp:
        if args.fake_jpeg:
            write_fake_jpegs(Path(tmp) / "src", args.fake_jpeg)
            path = convert(Path(tmp) / "src", Path(tmp) / "fake.h5", splits=("train",), progress=False)[0]
        else:
            path = Path(args.path) if args.path else ensure_digits_hdf5()
        result = run(args, path)
    if args.fake_jpeg:
        result["data"]["path"] = f"{args.fake_jpeg} generated 500x375 JPEGs (quality 90)"
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
