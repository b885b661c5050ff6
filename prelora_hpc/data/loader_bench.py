"""How many DataLoader workers a rank needs to keep its training step fed.

    python -m prelora_hpc.data.loader_bench                       # embedded digits, 224 px
    python -m prelora_hpc.data.loader_bench --path /lus/.../imagenet1k.h5 --max-workers 8
    python -m prelora_hpc.data.loader_bench --fake-jpeg 256 --json bench.json
    python -m prelora_hpc.data.loader_bench --fake-jpeg 256 --compare-draft --demand 855

Measures (1) the loader's supply: images/s through read + decode +
training transform at --img-size, for 0..--max-workers workers, and (2) the
training step's demand: images/s of the trainer's own step
(``step.TrainStep``: forward, loss, backward and AdamW step of a DeepSpeed
engine over the run's ViT) on random input, on the device a rank trains on
(its GPU if it has one, else the CPU). The ratio says how
many workers one rank needs. --fake-jpeg N converts N ImageNet-sized JPEGs
(400x350 at about 110 KB, ImageNet's training-set means; --fake-size for
others) first, because the 32x32 digits PNGs decode far faster than real
photographs. --compare-draft measures the supply without and with
``data.jpeg_draft`` in alternating rounds, so a load that changes during the
run reaches both alike; --demand takes one rank's demand as given (e.g. a
GPU's, measured elsewhere) instead of timing a step here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# mpi4py before torch (dist_init.py explains why): the step runs on an engine.
from .. import dist_init

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from ..config import DataConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .digits import ensure_digits_hdf5  # noqa: E402
from .hdf5 import HDF5ImageDataset  # noqa: E402
from .seeding import sample_seed, seeded_rng  # noqa: E402
from .transforms import DecodingTransform, build_transform  # noqa: E402

#: ImageNet-1k's training set: mean image about 400x350 px and 110 KB.
IMAGENET_MEAN_SIZE = (400, 350)


def write_fake_jpegs(root: Path, count: int, seed: int = 0,
                     size: tuple[int, int] = IMAGENET_MEAN_SIZE) -> int:
    """``count`` photo-like JPEGs of ``size`` (w, h) px in 10 class folders; returns their mean bytes.

    Smooth colour fields plus noise, quality 95, 4:2:0 chroma: at 400x350
    about 110 KB, the entropy-coded size a decoder pays for on ImageNet.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = 0
    for i in range(count):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * fx + phase * c) * np.cos(yy * fy + c) for c in range(3)], -1)
        pixels = 127 + 90 * base + rng.normal(0, 24, size=(h, w, 3))
        f = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(f, quality=95)
        total += f.stat().st_size
    return round(total / max(count, 1))


def sample_keys(n: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` random ``(index, augmentation seed)`` keys of a set of ``n``,
    as the trainer's sampler gives them."""
    if count == 0:
        return []
    indices = torch.utils.data.RandomSampler(range(n), replacement=True, num_samples=count,
                                             generator=torch.Generator().manual_seed(seed))
    return [(int(i), sample_seed(seed, 0, k)) for k, i in enumerate(indices)]


def loader_rate(ds: torch.utils.data.Dataset, workers: int, batch_size: int, batches: int,
                seed: int = 0) -> float:
    """Images/s delivered by a DataLoader with ``workers`` workers, after its first batch.

    The first batch (worker start-up) is not timed; ``batches`` more are.
    Each sample comes with its own augmentation seed, ``(index, seed)``, as
    the trainer's sampler gives them (``ShardedSampler(with_seeds=True)``):
    the seeding is part of what a training sample costs.
    """
    return loader_rates(ds, workers, batch_size, batches, seed)[0]


def loader_rates(ds: torch.utils.data.Dataset, workers: int, batch_size: int, batches: int,
                 seed: int = 0) -> tuple[float, float]:
    """``loader_rate``'s images/s, and images per CPU-second of the process(es)
    producing them (the workers; the main process with 0 workers) over all
    ``batches + 1`` batches: what one worker delivers on a core of its own,
    which other jobs on a shared machine change far less than the wall clock.
    """
    keys = sample_keys(len(ds), batch_size * (batches + 1), seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=keys, num_workers=workers)
    cpu0 = _cpu_seconds(workers)
    it = iter(loader)
    first = len(next(it)[1])
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in it)
    wall = time.perf_counter() - t0
    # Workers exit and are reaped when the iterator ends; then their CPU time counts.
    del it
    cpu = _cpu_seconds(workers) - cpu0
    return n / wall, (n + first) / cpu if cpu > 0 else float("nan")


def _cpu_seconds(workers: int) -> float:
    if workers == 0:
        return time.process_time()
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


STAGES = ("read", "decode", "crop", "augment")


def stage_times(ds: HDF5ImageDataset, keys: list[tuple[int, int]]) -> dict[str, float]:
    """CPU milliseconds per training sample in each stage, in this process, over ``keys``.

    read: HDF5 bytes and the file header; decode: pixels (with a
    ``DecodingTransform``, i.e. jpeg_draft, the crop and resize too, which
    it does together); crop: RandomResizedCrop (zero under jpeg_draft);
    augment: the rest (flip, RandAugment or jitter, to tensor, normalise).
    Each sample runs under its own seed, as in training.
    """
    t = ds.transform
    if isinstance(t, DecodingTransform):
        decode, crop, augment = t.decode, None, t.augment
    else:
        decode, crop, augment = (lambda im: im.convert("RGB")), t.transforms[0], \
            transforms.Compose(t.transforms[1:])
    spent = dict.fromkeys(STAGES, 0.0)

    def timed_decode(im: Image.Image) -> Image.Image:
        t0 = time.process_time()
        img = decode(im)
        spent["decode"] += time.process_time() - t0
        return img

    # One intra-op thread, as in a DataLoader worker: more would add their
    # spinning to the CPU time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index, seed in keys:
            _time_sample(ds, index, seed, timed_decode, crop, augment, spent)
    finally:
        torch.set_num_threads(threads)
    return {k: 1e3 * v / len(keys) for k, v in spent.items()}


def _time_sample(ds, index, seed, timed_decode, crop, augment, spent) -> None:
    """Add one seeded sample's CPU seconds per stage to ``spent``."""
    with seeded_rng(seed):
        t0 = time.process_time()
        decoded_before = spent["decode"]
        img = ds.load_image(index, timed_decode)
        spent["read"] += time.process_time() - t0 - (spent["decode"] - decoded_before)
        for name, f in (("crop", crop), ("augment", augment)):
            if f is not None:
                t0 = time.process_time()
                img = f(img)
                spent[name] += time.process_time() - t0


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
    dist = dist_init.init_distributed(cfg.run.collective_timeout_s)
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
            dist_init.finish()
    return rate, dist.device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prelora_hpc.data.loader_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--path", help="HDF5 file or shard directory (default: the embedded digits)")
    p.add_argument("--fake-jpeg", type=int, metavar="N",
                   help="benchmark N generated ImageNet-sized JPEGs instead (see --fake-size)")
    p.add_argument("--fake-size", type=_size, default=IMAGENET_MEAN_SIZE, metavar="WxH",
                   help="size of the generated JPEGs (default 400x350, ImageNet's mean)")
    p.add_argument("--split", default="train")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--min-workers", type=int, default=0)
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker count")
    p.add_argument("--auto-augment", default=None, help="e.g. rand-m9-mstd0.5-inc1 (default: none)")
    p.add_argument("--jpeg-draft", action="store_true", help="decode with data.jpeg_draft on")
    p.add_argument("--compare-draft", action="store_true",
                   help="measure without and with data.jpeg_draft, in alternating rounds")
    p.add_argument("--rounds", type=int, default=None,
                   help="measurements of each setting (default 1; 4 with --compare-draft)")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="also time each stage of N samples in this process (ms per image)")
    p.add_argument("--demand", type=float, metavar="IMG_PER_S",
                   help="one rank's demand, taken as given: no training step is timed")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 400x350, got {text!r}") from None
    return w, h


def _per_worker(supply: list[dict], key: str = "per_worker") -> float:
    # One worker's rate is the honest per-worker figure: with more workers
    # than free cores the per-worker rate falls.
    one = [s[key] for s in supply if s["workers"] == 1]
    return one[0] if one else supply[0][key]


def _workers_needed(demand: float, per_worker: float) -> Optional[int]:
    return math.ceil(demand / per_worker) if per_worker > 0 else None


def run(args: argparse.Namespace, path: Path) -> dict:
    """Measure everything; returns the figures (as written by --json)."""
    variants = (False, True) if args.compare_draft else (args.jpeg_draft,)
    datasets = {}
    for draft in variants:
        data_cfg = DataConfig(source="hdf5", path=str(path), auto_augment=args.auto_augment,
                              jpeg_draft=draft)
        datasets[draft] = HDF5ImageDataset(path, args.split,
                                           build_transform(data_cfg, args.img_size, is_training=True))
    rounds = args.rounds or (4 if args.compare_draft else 1)
    workers = range(args.min_workers, args.max_workers + 1)
    rates = {(d, w): [] for d in variants for w in workers}
    cpu_rates = {(d, w): [] for d in variants for w in workers}
    stages = {d: [] for d in variants}
    keys = sample_keys(len(datasets[variants[0]]), args.breakdown)
    for r in range(rounds):
        # Alternate the order too, so neither setting always runs first.
        for draft in variants if r % 2 == 0 else variants[::-1]:
            for w in workers:
                rate, cpu_rate = loader_rates(datasets[draft], w, args.batch_size, args.batches)
                rates[draft, w].append(rate)
                cpu_rates[draft, w].append(cpu_rate)
                print(f"  round {r + 1}/{rounds}, jpeg_draft {str(draft).lower()}, {w} worker(s): "
                      f"{rate:8.1f} img/s, {cpu_rate:8.1f} img per CPU-s, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
            if keys:
                stages[draft].append(stage_times(datasets[draft], keys))

    def supply_of(draft: bool) -> list[dict]:
        out = []
        for w in workers:
            rate = statistics.median(rates[draft, w])
            out.append({"workers": w, "images_per_s": rate, "per_worker": rate / max(w, 1),
                        "per_cpu_second": statistics.median(cpu_rates[draft, w]),
                        "jpeg_draft": draft, "rounds": rates[draft, w],
                        "rounds_per_cpu_second": cpu_rates[draft, w]})
        return out

    if args.demand is not None:
        demand, device = args.demand, None
    else:
        demand, device = step_rate(args.model, datasets[variants[0]].num_classes, args.img_size,
                                   args.batch_size, args.steps, args.warmup)
    supply = supply_of(variants[0])
    per_worker = _per_worker(supply)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device is not None and device.type == "cuda"
                    else "cpu",
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "data": {"path": str(path), "split": args.split, "images": len(datasets[variants[0]]),
                 "img_size": args.img_size, "auto_augment": args.auto_augment,
                 "batch_size": args.batch_size, "jpeg_draft": variants[0], "rounds": rounds},
        "loader": supply,
        "train_step": {"model": None if device is None else args.model,
                       "device": "given" if device is None else device.type, "images_per_s": demand},
        "workers_needed": _workers_needed(demand, per_worker),
        # As many, each on a core of its own (the figure for a shared machine).
        "workers_needed_cpu": _workers_needed(demand, _per_worker(supply, "per_cpu_second")),
    }
    if args.compare_draft:
        drafted = supply_of(True)
        per_worker_draft = _per_worker(drafted)
        result["draft"] = {
            "loader": drafted,
            "ratio": [{"workers": w, "ratios": [b / a for a, b in zip(rates[False, w], rates[True, w])],
                       "cpu_ratios": [b / a for a, b in zip(cpu_rates[False, w], cpu_rates[True, w])]}
                      for w in workers],
            "workers_needed": _workers_needed(demand, per_worker_draft),
            "workers_needed_cpu": _workers_needed(demand, _per_worker(drafted, "per_cpu_second")),
        }
        for entry in result["draft"]["ratio"]:
            entry["median"] = statistics.median(entry["ratios"])
            entry["cpu_median"] = statistics.median(entry["cpu_ratios"])
    if keys:
        result["stages_ms"] = {("jpeg_draft" if d else "full_decode"):
                               {k: statistics.median(s[k] for s in stages[d]) for k in STAGES}
                               for d in variants}
    return result


def format_table(r: dict) -> str:
    """The figures as a plain-text table (medians over rounds)."""
    d = r["data"]
    lines = [f"data: {d['path']} [{d['split']}], {d['images']} images, {d['img_size']} px, "
             f"batch {d['batch_size']}, auto_augment {d['auto_augment']}, {d['rounds']} round(s)"]
    if "draft" in r:
        lines.append("workers | full decode: img/s, per worker, per CPU-s | jpeg_draft: img/s, per worker, "
                     "per CPU-s | draft/full (median, range): wall, CPU")
        for s, t, q in zip(r["loader"], r["draft"]["loader"], r["draft"]["ratio"]):
            lines.append(f"{s['workers']:>7} | {s['images_per_s']:7.1f} {s['per_worker']:7.1f} "
                         f"{s['per_cpu_second']:7.1f} | {t['images_per_s']:7.1f} {t['per_worker']:7.1f} "
                         f"{t['per_cpu_second']:7.1f} | {q['median']:.3f} ({min(q['ratios']):.3f}-"
                         f"{max(q['ratios']):.3f}), {q['cpu_median']:.3f} ({min(q['cpu_ratios']):.3f}-"
                         f"{max(q['cpu_ratios']):.3f})")
    else:
        lines.append("workers   img/s   img/s per worker   img per CPU-s")
        for s in r["loader"]:
            per = "(main process)" if s["workers"] == 0 else f"{s['per_worker']:.1f}"
            lines.append(f"{s['workers']:>7} {s['images_per_s']:>7.1f}   {per:>16}   "
                         f"{s['per_cpu_second']:>13.1f}")
    for variant, ms in r.get("stages_ms", {}).items():
        lines.append(f"CPU ms per image, {variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
                     + f" (total {sum(ms.values()):.2f})")
    t = r["train_step"]
    if t["device"] == "given":
        lines.append(f"demand (given): {t['images_per_s']:.1f} img/s")
    else:
        lines.append(f"training step ({t['model']}, the trainer's step on {r['machine']['device']}): "
                     f"{t['images_per_s']:.1f} img/s")
    needed = (f"workers needed per rank to keep up: {r['workers_needed']} at the wall-clock rate, "
              f"{r['workers_needed_cpu']} with a core each")
    if "draft" in r:
        needed += (f"; with jpeg_draft {r['draft']['workers_needed']} and "
                   f"{r['draft']['workers_needed_cpu']}")
    lines.append(needed)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark, print the table, optionally write JSON; returns 0."""
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prelora-loader-bench-") as tmp:
        if args.fake_jpeg:
            mean_bytes = write_fake_jpegs(Path(tmp) / "src", args.fake_jpeg, size=args.fake_size)
            path = convert(Path(tmp) / "src", Path(tmp) / "fake.h5", splits=("train",), progress=False)[0]
        else:
            path = Path(args.path) if args.path else ensure_digits_hdf5()
        result = run(args, path)
    if args.fake_jpeg:
        w, h = args.fake_size
        result["data"]["path"] = (f"{args.fake_jpeg} generated {w}x{h} JPEGs "
                                  f"(quality 95, mean {mean_bytes / 1024:.0f} KB)")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
