"""``prelora-bench``: what stage 3 (LoRA only) saves over stage 1 (full training).

In one process (or one per MPI rank), on the same model, the same fixed
batch and the same DeepSpeed settings, it times stage-3 steps and stage-1
steps, measures each stage's peak memory, counts trainable parameters,
optimizer-state bytes and the gradient bytes all-reduced per step, checks
that stage 3 does none of the work it should skip, and projects both stages
from 1 to 512 nodes. Beside them: the floor (stage 3's frozen base with no
adapters, what no adapter can beat) and, with ``--peer ddp``, each stage
under plain torch DDP with torch AdamW (what a user would run instead).

    prelora-bench --preset cpu-small --json bench.json            # 1 process, CPU
    mpiexec -n 2 prelora-bench --preset cpu-small --json bench2.json  # 2 ranks; prints measured vs projected
    prelora-bench --preset vit-large --count-only                 # ViT-L/16 trainable count, no run
    mpiexec -n 8 --ppn 4 prelora-bench --preset vit-large --json vitl.json   # on GPUs
    prelora-bench --preset toy --stages 3 --scaling-row weak --json-row-dir rows/  # scripts/scaling.sh
    mpiexec -n 2 prelora-bench --preset cpu-small --peer ddp --json peer.json    # ours / DDP

A step is forward, cross-entropy, ``engine.backward`` (which all-reduces the
gradients) and ``engine.step``, on one micro batch (no accumulation).
Warm-up steps are not timed; each timed step starts after a barrier and
ends after a device synchronize; a step's time is the slowest rank's, and
the figure reported is the median. The peer is timed the same way. The
smallest configuration runs first (floor, stage 3, stage 1, each followed
by its peer): peak memory is measured from a reset high-water mark
(docs/benchmarks.md says why the order matters on the CPU).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# mpi4py before torch (launch.py explains why).
from . import launch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
# FlopCounterMode is built on this class; it sees every aten op of the
# forward and the backward pass.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from .config import Config, ConfigError, load_config  # noqa: E402
from .convergence import NormTracker, assign_ranks  # noqa: E402
from .engine import base_optimizer  # noqa: E402
from .lora import lora_modules  # noqa: E402
from .model import build_model, count_parameters  # noqa: E402
from .stages import shape_for_stage  # noqa: E402

#: The reference machine's nodes: 4 A100 per Polaris node.
GPUS_PER_NODE = 4
#: Node counts of the scaling projection.
PROJECTION_NODES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
#: Assumed inter-node bandwidth when nothing is measured or given: one
#: Slingshot 11 NIC, 200 Gb/s (Polaris).
DEFAULT_BANDWIDTH_GBPS = 200.0

#: Keys of a scaling row, exactly as ``prelora-report scaling`` reads them.
ROW_KEYS = ("stage", "scaling", "nodes", "gpus", "global_batch", "images_per_s",
            "images_per_s_per_gpu", "step_time_s", "allreduce_bytes_per_step",
            "peak_memory_bytes", "device")


@dataclass
class Preset:
    """A named benchmark size: config overrides plus the run's length."""

    overrides: list[str]
    steps: int
    warmup: int
    description: str
    window_steps: int
    """Steps per convergence window at this size (the bookkeeping cost is
    amortized over it)."""


_TINY_MODEL = ["model.name=vit_tiny_patch16_224", "model.num_classes=10"]

PRESETS: dict[str, Preset] = {
    # For tests and scripts/scaling.sh checks: seconds, numbers meaningless.
    "toy": Preset(
        _TINY_MODEL + ["model.img_size=16", "model.patch_size=8", "model.embed_dim=32",
                       "model.depth=2", "model.num_heads=2", "deepspeed.micro_batch_size=4",
                       "prelora.r_min=2", "prelora.r_max=8"],
        steps=3, warmup=1, window_steps=50,
        description="2-block 32-wide ViT on 16 px images (tests only)"),
    # Two ViT-B-wide blocks: with ranks 8..64 the adapters add about as much
    # relative to the base as on ViT-L (stage-3/stage-1 FLOPs 0.73 here,
    # 0.72 for ViT-L), and a step takes well under a second on 2 cores.
    "cpu-small": Preset(
        _TINY_MODEL + ["model.img_size=32", "model.patch_size=8", "model.embed_dim=768",
                       "model.depth=2", "model.num_heads=12", "deepspeed.micro_batch_size=8",
                       "prelora.r_min=8", "prelora.r_max=64"],
        steps=15, warmup=3, window_steps=50,
        description="2-block 768-wide ViT, 32 px, patch 8 (17 tokens), fp32 on the CPU"),
    # The reference model of configs/vit_large_imagenet1k.yaml on one GPU
    # per rank; window = one epoch of the reference run (313 steps).
    "vit-large": Preset(
        ["model.name=vit_large_patch16_224", "model.img_size=224", "model.num_classes=1000",
         "deepspeed.micro_batch_size=16", "deepspeed.precision=bf16",
         "prelora.r_min=8", "prelora.r_max=64"],
        steps=50, warmup=10, window_steps=313,
        description="ViT-L/16, 224 px, bf16, micro batch 16 (a GPU)"),
}

_BENCH_FIXED = ["deepspeed.grad_accum_steps=1", "data.source=synthetic", "data.num_workers=0",
                "logging.tensorboard=false"]


# --------------------------------------------------------------------------- #
# Rank maps and parameter arithmetic (no engine, no process group).


def representative_rank_map(num_layers: int, modules: list[str], r_min: int, r_max: int,
                            seed: int = 0, block_prefix: str = "blocks") -> dict[str, int]:
    """A rank map as Algorithm 2 would give it, from seeded random changes.

    Each layer's weight-norm change is drawn uniformly from [0, 1) percent,
    so after min-max normalization every rank in [r_min, r_max] is about
    equally likely; real runs, where most layers have settled, give lower
    ranks, so this errs towards more trainable parameters.
    """
    rng = np.random.default_rng(seed)
    changes = {a: rng.uniform(0.0, 1.0, size=num_layers).tolist() for a in modules}
    ranks = assign_ranks(changes, r_min, r_max)
    return {f"{block_prefix}.{l}.{a}": int(ranks[a][l]) for a in modules for l in range(num_layers)}


def load_rank_map(path: Path) -> dict[str, int]:
    """A ``{"blocks.0.attn.qkv": 16, ...}`` JSON file, e.g. a run's rank_map.json,
    or an earlier ``--json`` result of this bench (its ``rank_map.ranks``), so a
    recorded comparison can be rerun on exactly its ranks."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--rank-map {path}: cannot read it as JSON: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("rank_map"), dict) \
            and isinstance(raw["rank_map"].get("ranks"), dict):
        raw = raw["rank_map"]["ranks"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--rank-map {path}: expected a non-empty object of module name -> rank")
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--rank-map {path}: rank of {k!r} must be a positive int, got {v!r}")
    return {str(k): int(v) for k, v in raw.items()}


def adapter_parameter_count(model: nn.Module, rank_map: dict[str, int]) -> int:
    """Sum over adapted layers of r x (in + out): the adapters' scalars."""
    total = 0
    for name, r in rank_map.items():
        layer = model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        total += r * (layer.in_features + layer.out_features)
    return total


def stage3_model(cfg: Config, rank_map: dict[str, int]) -> nn.Module:
    """``cfg``'s model with adapters of ``rank_map`` injected and the base frozen."""
    return shape_for_stage(build_model(cfg.model), 3, rank_map, cfg)


def count_only(cfg: Config, rank_map: dict[str, int], bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
               gpus: int = PROJECTION_NODES[-1] * GPUS_PER_NODE) -> dict[str, Any]:
    """Trainable parameters of stage 1 and stage 3 without running anything,
    and the gradient bytes each all-reduces per step.

    The models are built on the meta device (no memory, no init), so this
    works for ViT-L on a laptop. Also gives the bounds with every layer at
    r_min and at r_max. Gradients travel in the training dtype (DeepSpeed's
    default ``communication_data_type``): 2 bytes under bf16/fp16, else 4;
    ``allreduce_s`` is their ring all-reduce over ``gpus`` ranks at
    ``bandwidth_gbps`` (bandwidth term only).
    """
    precision = cfg.deepspeed.precision
    elem = 2 if precision in ("bf16", "fp16") else 4
    with torch.device("meta"):
        base = build_model(cfg.model)
        total = count_parameters(base)
        out: dict[str, Any] = {"model": cfg.model.name, "stage1_trainable": total,
                               "layers_adapted": len(rank_map), "grad_element_bytes": elem,
                               "allreduce_gpus": gpus, "bandwidth_gbps": bandwidth_gbps,
                               "stage1_grad_bytes": total * elem,
                               "stage1_allreduce_s": allreduce_time(total * elem, gpus,
                                                                    bandwidth_gbps, 0.0)}
        for label, rm in (("rank_map", rank_map),
                          ("all_r_min", {k: cfg.prelora.r_min for k in rank_map}),
                          ("all_r_max", {k: cfg.prelora.r_max for k in rank_map})):
            m = stage3_model(cfg, rm)
            trainable = count_parameters(m, trainable_only=True)
            adapters = adapter_parameter_count(m, rm)
            out[label] = {"stage3_trainable": trainable, "adapter_params": adapters,
                          "kept_params": trainable - adapters,
                          "trainable_fraction": trainable / total,
                          "grad_bytes": trainable * elem,
                          "allreduce_s": allreduce_time(trainable * elem, gpus, bandwidth_gbps, 0.0)}
            del m
    return out


# --------------------------------------------------------------------------- #
# What an engine holds and moves.


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def grad_allreduce_bytes(engine) -> int:
    """Gradient bytes one rank all-reduces per optimizer step.

    DeepSpeed (ZeRO 0, 1 and 2) reduces the gradient of every parameter it
    trains, in ``communication_data_type`` (ZeRO 2 bucket by bucket during
    the backward pass). Frozen parameters are not in the engine's trainable
    set and move nothing.
    """
    numel = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return numel * _element_size(engine.communication_data_type)


def _unique_tensors(obj, seen: set[int]):
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() and obj.data_ptr() not in seen:
            seen.add(obj.data_ptr())
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _unique_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _unique_tensors(v, seen)


#: Attributes of DeepSpeed's optimizer wrappers that hold fp32 master weights
#: (FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO 1/2).
_MASTER_ATTRS = ("fp32_groups", "fp32_groups_flat_partition", "single_partition_of_fp32_groups")


def fp32_master_numel(engine) -> int:
    """Scalars in the fp32 master copies this rank holds (0 for plain fp32)."""
    seen: set[int] = set()
    n = 0
    for attr in _MASTER_ATTRS:
        n += sum(t.numel() for t in _unique_tensors(getattr(engine.optimizer, attr, None), seen))
    return n


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state on this rank: AdamW moments (and step
    counters) plus fp32 master weights where the wrapper keeps them."""
    seen: set[int] = set()
    base = base_optimizer(engine)
    n = sum(t.numel() * t.element_size() for t in _unique_tensors(list(base.state.values()), seen))
    for attr in _MASTER_ATTRS:
        masters = getattr(engine.optimizer, attr, None)
        # Under plain fp32 the "master" is the parameter itself: not state.
        if masters is not None:
            n += sum(t.numel() * t.element_size() for t in _unique_tensors(masters, seen))
    return n


# --------------------------------------------------------------------------- #
# Memory: a resettable peak, GPU and CPU.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
    if m is None:
        raise OSError("no VmHWM in /proc/self/status")
    return int(m.group(1)) * 1024


def _reset_hwm() -> None:
    """Set the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of one stage: CUDA max allocated on a GPU; on the CPU the
    process's peak RSS above the RSS before any stage started.

    On Linux the RSS high-water mark is reset between stages (``5`` into
    ``/proc/self/clear_refs``); elsewhere ``ru_maxrss`` only grows, which the
    result's ``method`` says.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated"
        self.baseline = 0
        if device.type != "cuda":
            try:
                self.baseline = _rss_bytes()
                _reset_hwm()
                _hwm_bytes()
                self.method = "VmHWM - RSS before the stages (high-water mark reset per stage)"
            except (OSError, ValueError):
                import resource
                self.baseline = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
                self.method = "ru_maxrss - ru_maxrss before the stages (never reset)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_free_memory()
        if self.method.startswith("VmHWM"):
            _reset_hwm()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("VmHWM"):
            return max(0, _hwm_bytes() - self.baseline)
        import resource
        return max(0, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 - self.baseline)


def _release_free_memory() -> None:
    """Give freed heap back to the OS (glibc), so one stage's garbage does not
    sit in the next stage's RSS."""
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may keep freed pages, the stage order covers it


# --------------------------------------------------------------------------- #
# Structural checks of one training step (dispatcher-level, not timing).


class _OpRecorder(TorchDispatchMode):
    """Records matmul output shapes and whether any dropout kernel ran."""

    _MATMULS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "aten.matmul.")
    _DROPOUT = ("dropout", "bernoulli")

    def __init__(self):
        super().__init__()
        self.matmul_shapes: list[tuple[int, ...]] = []
        self.dropout_ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(self._MATMULS) and isinstance(out, torch.Tensor):
            self.matmul_shapes.append(tuple(out.shape[-2:]))
        if any(k in name for k in self._DROPOUT):
            self.dropout_ops[name] = self.dropout_ops.get(name, 0) + 1
        return out


def _dense_shapes(model: nn.Module, names: list[str]) -> set[tuple[int, int]]:
    """[out, in] of each named linear's base weight, and its transpose."""
    shapes = set()
    for n in names:
        layer = model.get_submodule(n)
        layer = getattr(layer, "base_layer", layer)
        shapes |= {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    return shapes


# --------------------------------------------------------------------------- #
# The ring all-reduce model and the projection.


def ring_allreduce_traffic(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``:
    2 (N - 1) / N x nbytes (reduce-scatter then all-gather)."""
    return 0.0 if ranks <= 1 else 2.0 * (ranks - 1) / ranks * nbytes


def allreduce_time(nbytes: float, ranks: int, bandwidth_gbps: float, latency_s: float,
                   calls: int = 1) -> float:
    """Seconds for ``calls`` all-reduces moving ``nbytes`` in all over ``ranks``.

    Bandwidth term: ring traffic over ``bandwidth_gbps`` (Gb/s the slowest
    link sustains, the network per node across nodes). Latency term: a
    tree-shaped 2 ceil(log2 N) hops of ``latency_s`` per call, as NCCL's
    tree/ring hybrids give at scale (a flat ring would be 2 (N - 1) hops).
    """
    if ranks <= 1:
        return 0.0
    hops = 2 * math.ceil(math.log2(ranks))
    return ring_allreduce_traffic(nbytes, ranks) * 8 / (bandwidth_gbps * 1e9) + calls * hops * latency_s


def project(stage: dict[str, Any], micro_batch: int, bandwidth_gbps: float, latency_s: float,
            gpus_per_node: int = GPUS_PER_NODE, nodes: list[int] = PROJECTION_NODES) -> list[dict]:
    """Projected weak scaling of one stage (fixed micro batch per GPU).

    step(N) = compute + all-reduce(N), with no overlap of the two (DeepSpeed
    ZeRO 0/1 reduce after the backward pass). Efficiency is images/s per
    GPU relative to one node.
    """
    compute = stage["compute_time_s"]
    rows = []
    base = None
    for n in nodes:
        g = n * gpus_per_node
        comm = allreduce_time(stage["allreduce_bytes_per_step"], g, bandwidth_gbps, latency_s,
                              stage["allreduce_calls_per_step"])
        step = compute + comm
        ips = g * micro_batch / step
        if base is None:
            base = ips / g
        rows.append({"nodes": n, "gpus": g, "step_time_s": step, "comm_time_s": comm,
                     "images_per_s": ips, "efficiency": ips / g / base})
    return rows


# --------------------------------------------------------------------------- #
# Running a stage.


@dataclass
class Options:
    steps: int
    warmup: int
    stages: list[int]
    window_steps: Optional[int]
    seed: int = 0
    checks: bool = True
    bf16_probe: bool = True
    floor: bool = True
    """With stage 3: also time the no-adapter floor (``floor_model``)."""
    peer: Optional[str] = None
    """'ddp': also time each stage under torch DDP with torch AdamW."""


@dataclass
class Ctx:
    """What every stage needs: the config, the process's place, helpers."""

    cfg: Config
    dist: Any
    precision: str
    rank_map: dict[str, int]
    opts: Options
    memory: PeakMemory
    batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def reduce(self, values: list[float], op: str = "max") -> list[float]:
        """Element-wise max (or sum) over ranks, as Python floats."""
        import torch.distributed as tdist
        if self.dist.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()


def _make_batch(cfg: Config, dist, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed micro batch of synthetic images [b, C, H, W] and labels [b]."""
    from .data.synthetic import SyntheticImageDataset
    b = cfg.deepspeed.micro_batch_size
    ds = SyntheticImageDataset(b * dist.world_size, cfg.model.num_classes, cfg.model.img_size,
                               seed=cfg.run.seed, in_chans=cfg.model.in_chans)
    idx = range(dist.rank * b, (dist.rank + 1) * b)
    x = torch.stack([ds[i][0] for i in idx]).to(dist.device)
    y = torch.tensor([ds[i][1] for i in idx], dtype=torch.long, device=dist.device)
    if precision != "fp32":
        x = x.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return x, y


def _train_step(engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the trainer does per micro batch, minus its logging."""
    logits = engine(x)
    loss = F.cross_entropy(logits.float(), y)
    engine.backward(loss)
    engine.step()
    return loss


def _timed(ctx: Ctx, step, n: int) -> list[float]:
    """``n`` calls of ``step()``, each from a barrier to a device sync; the
    slowest rank's seconds per call. Every configuration is timed through
    this one function."""
    times = []
    for _ in range(n):
        ctx.barrier()
        ctx.sync()
        t0 = time.perf_counter()
        step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return ctx.reduce(times, "max")


def _timed_steps(ctx: Ctx, engine, n: int) -> list[float]:
    """``n`` engine steps on the fixed batch (``_timed``)."""
    x, y = ctx.batch
    return _timed(ctx, lambda: _train_step(engine, x, y), n)


def _mean_losses(ctx: Ctx, losses: list[torch.Tensor]) -> list[float]:
    """Each step's loss averaged over ranks (identical on every rank)."""
    vals = ctx.reduce([float(v.detach()) for v in losses], "sum")
    return [v / ctx.dist.world_size for v in vals]


def _logged_comm_step(ctx: Ctx, engine) -> tuple[dict[str, dict[str, int]], torch.Tensor]:
    """One step under DeepSpeed's comms logger: ({op: {"bytes", "calls"}} on
    this rank, the step's loss)."""
    import deepspeed.comm as dcomm
    dcomm.comms_logger.reset_data()
    dcomm.configure(enabled=True, prof_all=True)
    try:
        loss = _train_step(engine, *ctx.batch)
        ctx.sync()
    finally:
        dcomm.configure(enabled=False, prof_all=False)
    out = {}
    for op, sizes in dcomm.comms_logger.get_raw_data().items():
        out[op] = {"bytes": int(sum(size * rec[0] for size, rec in sizes.items())),
                   "calls": int(sum(rec[0] for rec in sizes.values()))}
    dcomm.comms_logger.reset_data()
    return out, loss


def floor_model(cfg: Config) -> nn.Module:
    """The floor under stage 3: ``cfg``'s model shaped for stage 3 with no
    adapters at all, so only ``prelora.stage3_trainable`` (norms, pos_embed,
    cls_token, head by default) trains. No adapter can make a step cheaper."""
    return shape_for_stage(build_model(cfg.model), 3, {}, cfg)


#: The configurations the bench can time, by their key in the result.
CONFIGS = {"stage1": 1, "stage3": 3, "floor": 3}


def _build_stage_model(ctx: Ctx, config: str) -> nn.Module:
    # The same seed for every configuration: the same initial base weights.
    torch.manual_seed(ctx.cfg.run.seed)
    if config == "stage3":
        model = stage3_model(ctx.cfg, ctx.rank_map)
    elif config == "floor":
        model = floor_model(ctx.cfg)
    else:
        model = build_model(ctx.cfg.model)
    return model.to(ctx.dist.device)


def run_stage(ctx: Ctx, stage: int, config: Optional[str] = None) -> dict[str, Any]:
    """Build the stage's model and engine, warm up, time, measure, check.

    ``config`` is 'stage1', 'stage3' (the default for ``stage``) or 'floor'
    (stage 3 without adapters: timed and counted, no checks).
    """
    from .engine import build_engine, destroy_engine, trainable_in_engine

    cfg, dist = ctx.cfg, ctx.dist
    config = config or f"stage{stage}"
    ctx.memory.reset()
    model = _build_stage_model(ctx, config)
    engine = build_engine(model, cfg, dist)
    res: dict[str, Any] = {"stage": stage, "config": config}
    try:
        losses = [_train_step(engine, *ctx.batch) for _ in range(max(0, ctx.opts.warmup - 1))]
        # The last warm-up step runs under the comms logger: what actually
        # went over the wire, per op.
        comm, loss = _logged_comm_step(ctx, engine)
        res["warmup_losses"] = _mean_losses(ctx, losses + [loss])
        times = _timed_steps(ctx, engine, ctx.opts.steps)
        step = statistics.median(times)
        # One rank's all-reduce moves nothing: its step is all compute. ZeRO
        # 1/2 cannot skip their reduction, so they get no split on more.
        compute = step if dist.world_size == 1 else None
        if dist.world_size > 1 and cfg.deepspeed.zero_stage == 0:
            # The same steps without the gradient all-reduce: the compute the
            # projection starts from (weights drift apart across ranks; only
            # the time is used).
            engine.enable_backward_allreduce = False
            try:
                compute = statistics.median(_timed_steps(ctx, engine, ctx.opts.steps))
            finally:
                engine.enable_backward_allreduce = True
        ctx.sync()
        peak = int(ctx.reduce([ctx.memory.peak()], "max")[0])

        trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        trainable = count_parameters(model, trainable_only=True)
        ar = comm.get("all_reduce", {"bytes": 0, "calls": 0})
        other = {k: v for k, v in comm.items() if k != "all_reduce"}
        b = cfg.deepspeed.micro_batch_size
        res.update({
            "step_time_s": step,
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "step_times_s": times,
            "compute_time_s": compute,
            "images_per_s": b * dist.world_size / step,
            "trainable_params": trainable,
            "total_params": count_parameters(model),
            "optimizer_state_bytes": int(ctx.reduce([optimizer_state_bytes(engine)], "max")[0]),
            "grad_bytes": grad_allreduce_bytes(engine),
            "allreduce_bytes_per_step": ar["bytes"],
            "allreduce_calls_per_step": ar["calls"],
            "other_collectives": other,
            "peak_memory_bytes": peak,
        })
        if config == "stage3":
            res["adapter_params"] = adapter_parameter_count(model, ctx.rank_map)
            res["kept_params"] = trainable - res["adapter_params"]
        elif config == "floor":
            res["adapter_params"] = 0
            res["kept_params"] = trainable
        if ctx.opts.checks and config != "floor":
            res["checks"] = _stage_checks(ctx, stage, model, engine, trainable_names,
                                          trainable_in_engine(engine, model))
        if config == "stage1":
            res["bookkeeping"] = bookkeeping_cost(ctx, model, step)
    finally:
        destroy_engine(engine)
        del engine, model
        _release_free_memory()
    return res


# --------------------------------------------------------------------------- #
# The peer: what a user would run instead of our engine.


#: Peers ``--peer`` can time beside our stages.
PEERS = ("ddp",)


class DDPPeer:
    """One stage's model under ``torch.nn.parallel.DistributedDataParallel``
    with torch AdamW: the loop a user writes without DeepSpeed.

    The same model (same seed, shaped by the same ``shape_for_stage``), the
    same AdamW groups and hyper-parameters (``engine.param_groups``), the
    same gradient-norm clip. DDP registers hooks only for parameters with
    ``requires_grad``, so a stage-3 model reduces the trainable gradients
    only, in 25 MiB buckets overlapped with the backward pass (DDP's
    defaults). Under bf16 the weights stay fp32 and the forward runs under
    ``torch.autocast`` (what a torch user runs); fp32 runs plain.
    """

    def __init__(self, ctx: Ctx, config: str):
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel

        from .engine import param_groups

        cfg, dev = ctx.cfg, ctx.dist.device
        self.model = _build_stage_model(ctx, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay, cfg.lora.lr_scale, cfg.lora.lr_ratio_b),
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        if not tdist.is_initialized():
            raise RuntimeError("the DDP peer needs the process group launch.init_distributed makes")
        self.ddp = DistributedDataParallel(
            self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.clip = cfg.deepspeed.gradient_clipping
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.precision)
        x, y = ctx.batch
        # Autocast casts inside the matmuls; the input stays fp32 like the weights.
        self.x, self.y = (x.float() if self.autocast else x), y

    def step(self) -> torch.Tensor:
        """Forward, cross-entropy, backward (bucketed all-reduce), clip, AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            logits = self.ddp(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return loss

    def local_step(self) -> torch.Tensor:
        """The same step without DDP's gradient all-reduce (``no_sync``)."""
        with self.ddp.no_sync():
            return self.step()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.ddp, self.optimizer, self.model, self.params
        _release_free_memory()


def run_peer(ctx: Ctx, config: str) -> dict[str, Any]:
    """Time ``config`` ('stage1' or 'stage3') under the DDP peer exactly as
    ``run_stage`` times our engine: the same warm-up, ``_timed``, median of
    the slowest rank; on more than one rank again without the all-reduce."""
    dist = ctx.dist
    ctx.memory.reset()
    peer = DDPPeer(ctx, config)
    try:
        losses = [peer.step() for _ in range(ctx.opts.warmup)]
        times = _timed(ctx, peer.step, ctx.opts.steps)
        step = statistics.median(times)
        compute = step
        if dist.world_size > 1:
            compute = statistics.median(_timed(ctx, peer.local_step, ctx.opts.steps))
        ctx.sync()
        peak = int(ctx.reduce([ctx.memory.peak()], "max")[0])
        frozen = [n for n, p in peer.model.named_parameters() if not p.requires_grad]
        in_opt = {id(p) for g in peer.optimizer.param_groups for p in g["params"]}
        trainable = sum(p.numel() for p in peer.params)
        elem = peer.params[0].element_size() if peer.params else 4
        b = ctx.cfg.deepspeed.micro_batch_size
        return {
            "stage": CONFIGS[config], "config": config, "peer": "ddp",
            "step_time_s": step, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "step_times_s": times, "compute_time_s": compute,
            "images_per_s": b * dist.world_size / step,
            "trainable_params": trainable,
            "optimizer_holds_exactly_trainable": in_opt == {id(p) for p in peer.params},
            "frozen_with_grad": sum(1 for n, p in peer.model.named_parameters()
                                    if not p.requires_grad and p.grad is not None),
            "frozen_tensors": len(frozen),
            "grad_bytes": trainable * elem,
            "peak_memory_bytes": peak,
            "warmup_losses": _mean_losses(ctx, losses),
            "autocast": str(peer.autocast).replace("torch.", "") if peer.autocast else None,
        }
    finally:
        peer.close()


def _stage_checks(ctx: Ctx, stage: int, model: nn.Module, engine, trainable: set[str],
                  in_engine: set[str]) -> dict[str, Any]:
    """Structural facts of one more step (after the timed ones).

    Returned as {name: {"ok": bool or None, "detail": str}}; ``None`` where
    the fact does not apply to this stage or precision.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ctx.cfg
    adapted = list(ctx.rank_map)
    rec = _OpRecorder()
    flops = FlopCounterMode(display=False)
    with flops, rec:
        _train_step(engine, *ctx.batch)
    ctx.sync()
    out: dict[str, Any] = {"flops_per_step": int(flops.get_total_flops())}
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with_grad = [n for n, p in frozen if p.grad is not None]
    out["frozen_without_grad"] = {
        "ok": not with_grad,
        "detail": f"{len(frozen)} frozen tensors, {len(with_grad)} with a .grad"
                  + (f" (e.g. {with_grad[0]})" if with_grad else "")}
    out["engine_trains_exactly_trainable"] = {
        "ok": in_engine == trainable,
        "detail": f"optimizer holds {len(in_engine)} tensors, model has {len(trainable)} trainable"}
    master = fp32_master_numel(engine)
    out["fp32_master_numel"] = master
    # Dense products: any matmul whose output is an adapted base weight's
    # [out, in] (or transposed) shape, i.e. a weight gradient or B @ A.
    dense = _dense_shapes(model, adapted)
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    rows = cfg.deepspeed.micro_batch_size * tokens
    ambiguous = any(rows in s for s in dense)
    hits = sum(1 for s in rec.matmul_shapes if s in dense)
    if stage == 3:
        out["no_dense_weight_products"] = {
            "ok": None if ambiguous else hits == 0,
            "detail": f"{hits} matmul outputs of an adapted weight's shape in a stage-3 step"
                      + (" (ambiguous: batch x tokens equals a weight dimension)" if ambiguous else "")}
        ids = [type(m.lora_dropout).__name__ for m in lora_modules(model).values()]
        identity = all(t == "Identity" for t in ids)
        out["lora_dropout_identity"] = {
            "ok": identity if cfg.lora.dropout == 0 else None,
            "detail": f"lora.dropout={cfg.lora.dropout}: branch dropout modules {sorted(set(ids))}"}
    else:
        out["dense_weight_products"] = hits
    out["dropout_kernels"] = rec.dropout_ops
    if ctx.precision in ("bf16", "fp16"):
        out["low_precision_masters"] = _master_check(model, engine, trainable, ctx)
    return out


def _master_check(model: nn.Module, engine, trainable: set[str], ctx: Ctx) -> dict[str, Any]:
    """Frozen weights stay in the training dtype and get no fp32 master copy.

    A master copy of any frozen weight matrix would add at least that
    matrix's size to the masters; ZeRO's alignment padding adds far less.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[ctx.precision]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    wrong_dtype = [n for n, p in frozen if p.dtype != dtype]
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    zero = ctx.cfg.deepspeed.zero_stage
    master = fp32_master_numel(engine)
    if zero > 0:
        master = int(ctx.reduce([float(master)], "sum")[0])
    smallest = min((p.numel() for n, p in frozen if p.ndim == 2), default=0)
    excess = master - n_trainable
    ok = not wrong_dtype and 0 <= excess < max(smallest, 1)
    return {"ok": ok,
            "detail": f"{ctx.precision}, ZeRO {zero}: fp32 masters {master:,} scalars for "
                      f"{n_trainable:,} trainable (excess {excess:,}; smallest frozen matrix "
                      f"{smallest:,}); {len(wrong_dtype)} frozen tensors not in {ctx.precision}"}


def bf16_probe(ctx: Ctx) -> dict[str, Any]:
    """Build a stage-3 bf16 engine on the CPU (fp32-only for training here)
    only to check its master copies and dtypes after one step."""
    import deepspeed

    from .engine import deepspeed_config, destroy_engine, param_groups

    cfg = ctx.cfg
    torch.manual_seed(cfg.run.seed)
    model = stage3_model(cfg, ctx.rank_map).to(ctx.dist.device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ds_cfg = deepspeed_config(cfg, ctx.dist.world_size, "bf16")
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    try:
        x, y = ctx.batch
        _train_step(engine, x.to(torch.bfloat16), y)
        probe = Ctx(cfg, ctx.dist, "bf16", ctx.rank_map, ctx.opts, ctx.memory, ctx.batch)
        res = _master_check(model, engine, trainable, probe)
        res["detail"] = "CPU probe, " + res["detail"]
        return res
    finally:
        destroy_engine(engine)
        _release_free_memory()


def bookkeeping_cost(ctx: Ctx, model: nn.Module, step_time: float, reps: int = 5) -> dict[str, Any]:
    """Seconds per window of the convergence bookkeeping, and its share of
    the window's step time.

    Per window the trainer reduces the window statistics over ranks
    (``train.reduce_window_stats``: norms, and each rank's share of the
    relative updates and energy ranks, in one all-reduce) and rank 0's
    ``SwitchPolicy`` decides. Both are timed here on the stage-1 model,
    through the trainer's own functions, with the full test (and the rank
    assignment) running at every timed window; ``update_stats_s`` is the
    part spent on the update statistics alone.
    """
    from .convergence import UpdateTracker
    from .stages import SwitchParams, SwitchPolicy
    from .train import reduce_window_stats

    cfg = ctx.cfg
    params = SwitchParams.from_config(cfg)
    tracker = NormTracker(model, cfg.lora.target_modules, cfg.prelora.k)
    updates = UpdateTracker(tracker, ctx.dist.rank, ctx.dist.world_size, params.energy,
                            params.r_min, params.r_max)
    policy = SwitchPolicy(params, tracker.module_names, tracker.num_layers)

    def window():
        stats = reduce_window_stats(tracker, updates, model, 1.5, ctx.dist.world_size,
                                    ctx.dist.device)
        if ctx.dist.is_main:
            policy.observe(stats, can_switch=True)

    # k earlier windows, so each timed window has a full history to test.
    for _ in range(cfg.prelora.k):
        window()
    times, update_times = [], []
    for _ in range(reps):
        ctx.barrier()
        t0 = time.perf_counter()
        window()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        updates.local_stats(model)
        update_times.append(time.perf_counter() - t0)
    per_window = statistics.median(ctx.reduce(times, "max"))
    update_s = statistics.median(ctx.reduce(update_times, "max"))
    ws = ctx.opts.window_steps
    return {"per_window_s": per_window, "update_stats_s": update_s, "window_steps": ws,
            "fraction_of_step_time": per_window / (ws * step_time) if ws else None,
            "update_fraction_of_step_time": update_s / (ws * step_time) if ws else None}


# --------------------------------------------------------------------------- #
# Bandwidth: an all-reduce micro-benchmark on the ranks at hand.


def measure_allreduce(ctx: Ctx, nbytes: int, reps: int = 10) -> float:
    """Median seconds of one all-reduce of ``nbytes`` (fp32) through
    DeepSpeed's comm layer, as the engine calls it."""
    import deepspeed.comm as dcomm
    t = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=ctx.dist.device)
    dcomm.all_reduce(t)
    times = []
    for _ in range(reps):
        ctx.barrier()
        ctx.sync()
        t0 = time.perf_counter()
        dcomm.all_reduce(t)
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(ctx.reduce(times, "max"))


def network_model(ctx: Ctx, big_bytes: int, bandwidth_gbps: Optional[float],
                  latency_us: Optional[float]) -> dict[str, Any]:
    """Bandwidth (Gb/s) and per-hop latency (s) for the projection: given,
    or measured here on more than one rank, or assumed (200 Gb/s, 0 s)."""
    n = ctx.dist.world_size
    out: dict[str, Any] = {}
    if n > 1:
        t_small = measure_allreduce(ctx, 4, reps=20)
        t_big = measure_allreduce(ctx, big_bytes)
        hops = 2 * math.ceil(math.log2(n))
        bw = ring_allreduce_traffic(big_bytes, n) * 8 / max(t_big - t_small, 1e-9) / 1e9
        out["measured"] = {"ranks": n, "small_allreduce_s": t_small, "big_allreduce_s": t_big,
                           "big_bytes": big_bytes, "bandwidth_gbps": bw, "latency_s": t_small / hops}
    if bandwidth_gbps is not None:
        out["bandwidth_gbps"], out["bandwidth_source"] = bandwidth_gbps, "given"
    elif "measured" in out:
        out["bandwidth_gbps"], out["bandwidth_source"] = out["measured"]["bandwidth_gbps"], "measured"
    else:
        out["bandwidth_gbps"], out["bandwidth_source"] = DEFAULT_BANDWIDTH_GBPS, "assumed"
    if latency_us is not None:
        out["latency_s"], out["latency_source"] = latency_us * 1e-6, "given"
    elif "measured" in out:
        out["latency_s"], out["latency_source"] = out["measured"]["latency_s"], "measured"
    else:
        out["latency_s"], out["latency_source"] = 0.0, "not modelled"
    return out


# --------------------------------------------------------------------------- #
# The whole benchmark.


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _node_count(dist) -> int:
    import torch.distributed as tdist
    if dist.world_size == 1:
        return 1
    names: list = [None] * dist.world_size
    tdist.all_gather_object(names, dist.hostname)
    return len(set(names))


def run(cfg: Config, dist, rank_map: dict[str, int], rank_map_source: str, opts: Options,
        bandwidth_gbps: Optional[float] = None, latency_us: Optional[float] = None,
        preset: Optional[str] = None) -> dict[str, Any]:
    """Run the stages asked for (stage 3 first) and return the result dict
    (identical on every rank)."""
    from .engine import global_batch, resolve_precision

    precision = resolve_precision(cfg, dist.device)
    ctx = Ctx(cfg, dist, precision, rank_map, opts, PeakMemory(dist.device))
    ctx.batch = _make_batch(cfg, dist, precision)
    result: dict[str, Any] = {
        "preset": preset,
        "date": datetime.date.today().isoformat(),
        "device": _device_name(dist.device),
        "hostname": dist.hostname,
        "world_size": dist.world_size,
        "nodes": _node_count(dist),
        "backend": dist.backend,
        "precision": precision,
        "zero_stage": cfg.deepspeed.zero_stage,
        "model": {k: getattr(cfg.model, k) for k in ("name", "img_size", "patch_size", "embed_dim",
                                                     "depth", "num_heads", "num_classes")},
        "micro_batch_size": cfg.deepspeed.micro_batch_size,
        "global_batch": global_batch(cfg, dist.world_size),
        "steps": opts.steps,
        "warmup_steps": opts.warmup,
        "torch": torch.__version__,
        "peak_memory_method": ctx.memory.method,
        "rank_map": {"source": rank_map_source, "r_min": cfg.prelora.r_min,
                     "r_max": cfg.prelora.r_max, "layers": len(rank_map),
                     "histogram": {str(r): sum(1 for v in rank_map.values() if v == r)
                                   for r in sorted(set(rank_map.values()))},
                     "ranks": dict(rank_map)},
    }
    stages: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    floor = None
    # Smallest first (see PeakMemory): floor, stage 3 (ours, then the
    # peer's), stage 1 (ours, then the peer's).
    if 3 in opts.stages and opts.floor:
        floor = run_stage(ctx, 3, "floor")
    for stage in sorted(opts.stages, reverse=True):
        stages[f"stage{stage}"] = run_stage(ctx, stage)
        if opts.peer:
            peer[f"stage{stage}"] = run_peer(ctx, f"stage{stage}")
    result.update(stages)
    s1, s3 = stages.get("stage1"), stages.get("stage3")
    # The ratios are always there (None where not measured): a stable schema.
    for k in ("step_time_ratio", "compute_time_ratio", "grad_bytes_ratio", "allreduce_bytes_ratio",
              "peak_memory_ratio", "trainable_fraction", "optimizer_state_ratio",
              "stage1_over_peer", "stage3_over_peer", "stage1_compute_over_peer",
              "stage3_compute_over_peer", "stage3_over_floor", "stage3_above_floor_s"):
        result[k] = None
    result["floor"] = floor
    result["peer"] = dict(peer, kind=opts.peer) if opts.peer else None
    for name in peer:
        result[f"{name}_over_peer"] = _ratio(stages[name]["step_time_s"], peer[name]["step_time_s"])
        result[f"{name}_compute_over_peer"] = _ratio(stages[name]["compute_time_s"],
                                                     peer[name]["compute_time_s"])
    if floor is not None and s3 is not None:
        result["stage3_over_floor"] = _ratio(s3["step_time_s"], floor["step_time_s"])
        result["stage3_above_floor_s"] = s3["step_time_s"] - floor["step_time_s"]
    if s3 is not None and opts.checks and opts.bf16_probe and precision == "fp32" \
            and dist.device.type == "cpu" and cfg.deepspeed.zero_stage in (0, 1, 2):
        s3["checks"]["low_precision_masters"] = bf16_probe(ctx)
    if s1 is not None and s3 is not None:
        result.update({
            "step_time_ratio": _ratio(s3["step_time_s"], s1["step_time_s"]),
            "compute_time_ratio": _ratio(s3["compute_time_s"], s1["compute_time_s"]),
            "grad_bytes_ratio": _ratio(s3["grad_bytes"], s1["grad_bytes"]),
            "allreduce_bytes_ratio": _ratio(s3["allreduce_bytes_per_step"],
                                            s1["allreduce_bytes_per_step"]),
            "peak_memory_ratio": _ratio(s3["peak_memory_bytes"], s1["peak_memory_bytes"]),
            "trainable_fraction": _ratio(s3["trainable_params"], s1["trainable_params"]),
            "optimizer_state_ratio": _ratio(s3["optimizer_state_bytes"], s1["optimizer_state_bytes"]),
        })
        if opts.checks:
            result["flop_ratio"] = _ratio(s3["checks"]["flops_per_step"],
                                          s1["checks"]["flops_per_step"])
    big = max(s["grad_bytes"] for s in stages.values())
    net = network_model(ctx, big, bandwidth_gbps, latency_us)
    result["network"] = net
    result["projection"] = {"gpus_per_node": GPUS_PER_NODE, "micro_batch_per_gpu":
                            cfg.deepspeed.micro_batch_size}
    for name, s in stages.items():
        if s["compute_time_s"] is not None:
            result["projection"][name] = project(s, cfg.deepspeed.micro_batch_size,
                                                 net["bandwidth_gbps"], net["latency_s"])
    if dist.world_size > 1 and "measured" in net and any(
            s["compute_time_s"] is not None for s in stages.values()):
        m = net["measured"]
        check = {}
        for name, s in stages.items():
            if s["compute_time_s"] is None:
                continue
            comm = allreduce_time(s["allreduce_bytes_per_step"], dist.world_size,
                                  m["bandwidth_gbps"], m["latency_s"], s["allreduce_calls_per_step"])
            projected = s["compute_time_s"] + comm
            check[name] = {"measured_step_s": s["step_time_s"], "compute_s": s["compute_time_s"],
                           "projected_comm_s": comm, "projected_step_s": projected,
                           "error": projected / s["step_time_s"] - 1}
        result["projection_check"] = check
    return result


# --------------------------------------------------------------------------- #
# Output.


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return _fmt_bytes(v)
    if kind == "s":
        return f"{v * 1e3:.1f} ms"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.1f}"


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report (rank 0 prints it)."""
    s1, s3 = r.get("stage1"), r.get("stage3")
    lines = [
        f"prelora-bench {r['preset']}: {r['world_size']} rank(s) on {r['nodes']} node(s), "
        f"{r['device']}, {r['backend']}, {r['precision']}, ZeRO {r['zero_stage']}",
        f"model {r['model']['name']} (img {r['model']['img_size']}, width "
        f"{r['model']['embed_dim']}, depth {r['model']['depth']}); micro batch "
        f"{r['micro_batch_size']} per rank, global {r['global_batch']}; {r['steps']} timed steps "
        f"after {r['warmup_steps']} warm-up (median of the slowest rank)",
        f"rank map: {r['rank_map']['source']}, {r['rank_map']['layers']} layers, "
        f"rank: count {r['rank_map']['histogram']}",
        "",
        f"{'':34}{'stage 1':>16}{'stage 3':>16}{'3 / 1':>10}",
    ]
    rows = [("step time (median)", "step_time_s", "s", "step_time_ratio"),
            ("step time without all-reduce", "compute_time_s", "s", "compute_time_ratio"),
            ("images/s (all ranks)", "images_per_s", "f", None),
            ("trainable parameters", "trainable_params", "int", "trainable_fraction"),
            ("optimizer state (per rank)", "optimizer_state_bytes", "bytes", "optimizer_state_ratio"),
            ("gradient bytes all-reduced/step", "grad_bytes", "bytes", "grad_bytes_ratio"),
            ("all-reduce payload logged/step", "allreduce_bytes_per_step", "bytes",
             "allreduce_bytes_ratio"),
            ("peak memory (max over ranks)", "peak_memory_bytes", "bytes", "peak_memory_ratio")]
    for label, key, kind, ratio in rows:
        a = _fmt(s1[key], kind) if s1 else "-"
        b = _fmt(s3[key], kind) if s3 else "-"
        q = r.get(ratio) if ratio else None
        lines.append(f"{label:34}{a:>16}{b:>16}{(f'{q:.3f}' if q is not None else ''):>10}")
    if s1 and s3 and "flop_ratio" in r:
        lines.append(f"{'FLOPs per step (one rank)':34}{s1['checks']['flops_per_step']:>16.3g}"
                     f"{s3['checks']['flops_per_step']:>16.3g}{r['flop_ratio']:>10.3f}")
    fl = r.get("floor")
    if fl:
        over = r.get("stage3_over_floor")
        lines.append(f"floor (base frozen, no adapters; {fl['trainable_params']:,} trainable): "
                     f"step {_fmt(fl['step_time_s'], 's')}, without all-reduce "
                     f"{_fmt(fl['compute_time_s'], 's')}"
                     + (f"; stage 3 / floor {over:.3f} ({1e3 * r['stage3_above_floor_s']:+.1f} ms)"
                        if over is not None else ""))
    if r.get("peer"):
        lines += _format_peer(r)
    if s1 and "bookkeeping" in s1:
        bk = s1["bookkeeping"]
        frac = bk["fraction_of_step_time"]
        per = (f"{bk['window_steps']} steps" if bk["window_steps"] else
               "an epoch (no step count: pass --window-steps for the share)")
        lines.append(f"convergence bookkeeping: {bk['per_window_s'] * 1e3:.2f} ms per window of "
                     f"{per} = " + (f"{100 * frac:.3f}% of step time" if frac is not None else "n/a"))
        ufrac = bk.get("update_fraction_of_step_time")
        lines.append(f"  of which update statistics (relative update, energy ranks): "
                     f"{bk['update_stats_s'] * 1e3:.2f} ms = "
                     + (f"{100 * ufrac:.3f}% of step time" if ufrac is not None else "n/a"))
    if s3 and "checks" in s3:
        lines.append("")
        lines.append("stage-3 checks:")
        for name, v in s3["checks"].items():
            if isinstance(v, dict) and "ok" in v:
                mark = {True: "ok  ", False: "FAIL", None: "n/a "}[v["ok"]]
                lines.append(f"  {mark} {name}: {v['detail']}")
        for s in (s1, s3):
            if s and s.get("checks", {}).get("dropout_kernels"):
                lines.append(f"  note: stage {s['stage']} step ran dropout kernels "
                             f"{s['checks']['dropout_kernels']} (the base model's, p = 0)")
    net = r["network"]
    lines.append("")
    lines.append(f"projection: {r['projection']['gpus_per_node']} GPUs/node, micro batch "
                 f"{r['projection']['micro_batch_per_gpu']} per GPU (weak scaling), network "
                 f"{net['bandwidth_gbps']:.1f} Gb/s ({net['bandwidth_source']}), latency "
                 f"{net['latency_s'] * 1e6:.1f} us/hop ({net['latency_source']}); ring all-reduce "
                 f"moves 2(N-1)/N x bytes per rank; no compute/comm overlap")
    p = r["projection"]
    if "stage1" in p or "stage3" in p:
        lines.append(f"{'nodes':>6}{'GPUs':>7}" + "".join(
            f"{f'stage {k[-1]} img/s':>17}{'eff':>7}" for k in ("stage1", "stage3") if k in p))
        for i, n in enumerate(PROJECTION_NODES):
            line = f"{n:>6}{n * p['gpus_per_node']:>7}"
            for k in ("stage1", "stage3"):
                if k in p:
                    row = p[k][i]
                    line += f"{row['images_per_s']:>17.1f}{100 * row['efficiency']:>6.1f}%"
            lines.append(line)
    missing = [k for k in ("stage1", "stage3") if k in r and r[k]["compute_time_s"] is None]
    if missing:
        lines.append("no projection for " + ", ".join(missing) + ": ZeRO 1/2 cannot switch their "
                     "gradient reduction off, so the compute time is unknown on more than one "
                     "rank (run on 1 rank, or with deepspeed.zero_stage=0)")
    if r.get("projection_check"):
        m = net["measured"]
        lines.append("")
        lines.append(f"measured vs projected on these {r['world_size']} ranks (all-reduce "
                     f"{m['bandwidth_gbps']:.2f} Gb/s, {m['small_allreduce_s'] * 1e6:.0f} us for 4 B):")
        for k, c in r["projection_check"].items():
            lines.append(f"  stage {k[-1]}: measured {c['measured_step_s'] * 1e3:.1f} ms, projected "
                         f"{c['projected_step_s'] * 1e3:.1f} ms (compute {c['compute_s'] * 1e3:.1f} "
                         f"+ all-reduce {c['projected_comm_s'] * 1e3:.1f}), error "
                         f"{100 * c['error']:+.1f}%")
    return "\n".join(lines)


def _format_peer(r: dict[str, Any]) -> list[str]:
    """The peer's rows: our stage beside the same stage under DDP."""
    peer = r["peer"]
    auto = next((v["autocast"] for k, v in peer.items() if isinstance(v, dict)), None)
    lines = ["", f"peer: torch DDP + torch AdamW on the same model, batch and ranks"
                 + (f" (fp32 weights, autocast {auto})" if auto else "")
                 + "; stage 3's DDP reduces the trainable gradients only",
             f"{'':38}{'ours':>12}{'DDP':>12}{'ours / DDP':>12}"]
    for k in ("stage1", "stage3"):
        if k not in peer:
            continue
        ours, theirs = r[k], peer[k]
        for label, key, ratio in (("step time (median)", "step_time_s", f"{k}_over_peer"),
                                  ("step time without all-reduce", "compute_time_s",
                                   f"{k}_compute_over_peer"),
                                  ("peak memory", "peak_memory_bytes", None)):
            kind = "bytes" if key == "peak_memory_bytes" else "s"
            q = r.get(ratio) if ratio else _ratio(ours[key], theirs[key])
            lines.append(f"{f'stage {k[-1]} {label}':38}{_fmt(ours[key], kind):>12}"
                         f"{_fmt(theirs[key], kind):>12}{(f'{q:.3f}' if q is not None else ''):>12}")
    return lines


def format_markdown(r: dict[str, Any]) -> str:
    """The result as a Markdown section: what ran where, then one row per
    configuration (ours, the floor, the peer) with its ratios."""
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v * 1e3:.1f} ms"

    def q(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3f}"

    s1 = r.get("stage1")
    lines = [f"`{r['command']}`", "",
             f"{r['date']}, {r['device']}, {r['world_size']} rank(s) on {r['nodes']} node(s), "
             f"{r['backend']}, {r['precision']}, ZeRO {r['zero_stage']}, torch {r['torch']}; "
             f"{r['model']['name']} at {r['model']['img_size']} px, micro batch "
             f"{r['micro_batch_size']} per rank; {r['steps']} timed steps after "
             f"{r['warmup_steps']} warm-up, median of the slowest rank.", "",
             "| configuration | step | without all-reduce | images/s | trainable | peak memory "
             "| step / stage 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("stage 1 (ours)", s1), ("stage 3 (ours)", r.get("stage3")),
            ("floor: stage 3 without adapters", r.get("floor"))]
    peer = r.get("peer") or {}
    rows += [(f"stage {k[-1]}, peer {peer['kind']}", peer.get(k)) for k in ("stage1", "stage3")
             if k in peer]
    for label, s in rows:
        if not s:
            continue
        rel = _ratio(s["step_time_s"], s1["step_time_s"]) if s1 else None
        lines.append(f"| {label} | {ms(s['step_time_s'])} | {ms(s['compute_time_s'])} | "
                     f"{s['images_per_s']:.1f} | {s['trainable_params']:,} | "
                     f"{_fmt_bytes(s['peak_memory_bytes'])} | {q(rel)} |")
    lines.append("")
    for label, key in (("stage 3 / stage 1", "step_time_ratio"),
                       ("stage 3 / floor", "stage3_over_floor"),
                       ("stage 1 ours / peer", "stage1_over_peer"),
                       ("stage 3 ours / peer", "stage3_over_peer")):
        if r.get(key) is not None:
            lines.append(f"- {label}: **{r[key]:.3f}**")
    return "\n".join(lines) + "\n"


def format_count(c: dict[str, Any]) -> str:
    lines = [f"{c['model']}: {c['stage1_trainable']:,} parameters trained in stage 1; "
             f"{c['layers_adapted']} adapted layers",
             f"  gradients all-reduced per step ({c['grad_element_bytes']} B each); ring all-reduce "
             f"time over {c['allreduce_gpus']} GPUs at {c['bandwidth_gbps']:g} Gb/s, bandwidth term only",
             f"  {'stage 1':33}: {_fmt_bytes(c['stage1_grad_bytes'])}, "
             f"{c['stage1_allreduce_s'] * 1e3:.1f} ms"]
    for label, key in (("representative rank map", "rank_map"), ("every layer at r_min", "all_r_min"),
                       ("every layer at r_max", "all_r_max")):
        v = c[key]
        lines.append(f"  stage 3, {label:24}: {v['stage3_trainable']:>12,} trainable "
                     f"({v['adapter_params']:,} adapter + {v['kept_params']:,} kept) = "
                     f"{100 * v['trainable_fraction']:.2f}% of stage 1; {_fmt_bytes(v['grad_bytes'])}, "
                     f"{v['allreduce_s'] * 1e3:.1f} ms")
    return "\n".join(lines)


def scaling_row(result: dict[str, Any], stage: int, scaling: str) -> dict[str, Any]:
    """One row of ``prelora-report scaling``, with exactly ROW_KEYS."""
    s = result[f"stage{stage}"]
    g = result["world_size"]
    ips = result["global_batch"] / s["step_time_s"]
    row = {"stage": stage, "scaling": scaling, "nodes": int(result["nodes"]), "gpus": int(g),
           "global_batch": int(result["global_batch"]), "images_per_s": float(ips),
           "images_per_s_per_gpu": float(ips / g), "step_time_s": float(s["step_time_s"]),
           "allreduce_bytes_per_step": int(s["allreduce_bytes_per_step"]),
           "peak_memory_bytes": int(s["peak_memory_bytes"]), "device": str(result["device"])}
    assert tuple(row) == ROW_KEYS
    return row


# --------------------------------------------------------------------------- #
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-bench",
        description="Time and size stage 1 (full) against stage 3 (LoRA only) on the same "
                    "model and batch; project both to 512 nodes.",
        epilog="presets: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="benchmark size (default cpu-small without --config)")
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
    p.add_argument("--json", type=Path, help="write the full result as JSON here (rank 0)")
    p.add_argument("--markdown", type=Path, help="write the result as a Markdown table here")
    p.add_argument("--scaling-row", choices=("weak", "strong"),
                   help="also write one scaling row per stage (needs --json-row-dir)")
    p.add_argument("--json-row-dir", type=Path,
                   help="directory for scaling rows: <scaling>-<stage>-n<gpus>.json")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides (e.g. deepspeed.zero_stage=1); they win")
    return p


def _resolve(args: argparse.Namespace, world_size: int) -> tuple[Config, Preset]:
    preset = PRESETS[args.preset or "cpu-small"] if not args.config else None
    overrides = list(preset.overrides) if preset else []
    overrides += _BENCH_FIXED + ["deepspeed.train_batch_size=null", f"run.seed={args.seed}"]
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


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-bench``: 0 on success, 2 on a usage or config error."""
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
    name = args.preset or ("cpu-small" if not args.config else f"--config {args.config}")
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
                   checks=not args.no_checks, floor=not args.no_floor, peer=args.peer)

    dist = launch.init_distributed(cfg.run.collective_timeout_s)
    try:
        result = run(cfg, dist, rank_map, source, opts, args.bandwidth_gbps, args.latency_us,
                     preset=name)
    except ValueError as e:
        # A rank map that does not fit the model, an impossible batch: every
        # rank hits the same error, so a plain exit is enough.
        if dist.is_main:
            print(f"prelora-bench: {e}", file=sys.stderr)
        launch.finish()
        return 2
    result["command"] = " ".join(["prelora-bench"] + (sys.argv[1:] if argv is None else argv))
    if dist.is_main:
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
    launch.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
