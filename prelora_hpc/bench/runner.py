"""Running the bench: each configuration built, warmed up, timed, measured, checked.

A configuration is stage 1 (full), stage 3 (LoRA only) or the floor (stage
3 without adapters), each on our DeepSpeed engine and timed through the
trainer's own step (``step.TrainStep``: forward, fp32 loss, the flag
agreement, ``engine.backward``, ``engine.step``); with ``--peer ddp`` also
stage 1 and 3 under plain torch DDP with torch AdamW. The smallest runs
first (floor, stage 3, stage 1, each followed by its peer) because peak
memory is measured from a reset high-water mark (docs/benchmarks.md says
why the order matters on the CPU).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..engine import (build_engine, destroy_engine, global_batch, resolve_precision,
                      trainable_in_engine)
from ..memory import PeakMemory, release_free_memory
from ..model import build_model, count_parameters
from ..records import BenchRatios
from ..stages import rank_histogram
from ..step import TrainStep, input_dtype
from .checks import bf16_probe, stage_checks
from .cost import (GPUS_PER_NODE, adapter_parameter_count, allreduce_time, floor_model,
                   hidden_fraction, project, ratio, stage3_model)
from .probes import (barrier, grad_allreduce_bytes, logged_comm_step, network_model,
                     optimizer_state_bytes, reduce, sync, timed)

#: The configurations the bench can time, by their key in the result, and their stage.
CONFIGS = {"stage1": 1, "stage3": 3, "floor": 3}
#: Peers ``--peer`` can time beside our stages.
PEERS = ("ddp",)


@dataclass
class Options:
    """What to run and how long."""

    steps: int
    """Timed steps per configuration."""
    warmup: int
    """Untimed steps first (>= 1; the last runs under the comms logger)."""
    stages: list[int]
    window_steps: Optional[int]
    """Steps per convergence window (the bookkeeping share); None: an epoch."""
    seed: int = 0
    checks: bool = True
    bf16_probe: bool = True
    floor: bool = True
    """With stage 3: also time the no-adapter floor (``cost.floor_model``)."""
    peer: Optional[str] = None
    """'ddp': also time each stage under torch DDP with torch AdamW."""
    interleave: bool = True
    """Also step stage 1, stage 3 and the floor in turn (``interleaved_stages``)."""


@dataclass
class Ctx:
    """What every configuration needs: the config, the process's place, the batch."""

    cfg: Config
    dist: Any
    """``launch.DistInfo``."""
    precision: str
    rank_map: dict[str, int]
    opts: Options
    memory: PeakMemory
    batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """One fixed micro batch on the device: images [b, C, H, W] fp32, labels [b]."""


def make_batch(cfg: Config, dist) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed micro batch of synthetic images [b, C, H, W] (fp32, as the
    loader gives them; the step casts) and labels [b], on the device."""
    from ..data.synthetic import SyntheticImageDataset
    b = cfg.deepspeed.micro_batch_size
    ds = SyntheticImageDataset(b * dist.world_size, cfg.model.num_classes, cfg.model.img_size,
                               seed=cfg.run.seed, in_chans=cfg.model.in_chans)
    idx = range(dist.rank * b, (dist.rank + 1) * b)
    x = torch.stack([ds[i][0] for i in idx]).to(dist.device)
    y = torch.tensor([ds[i][1] for i in idx], dtype=torch.long, device=dist.device)
    return x, y


def mean_losses(dist, losses: list[Optional[torch.Tensor]]) -> list[float]:
    """Each step's loss averaged over ranks (identical on every rank); NaN
    for a step the training step skipped as non-finite."""
    vals = reduce(dist, [float("nan") if v is None else float(v) for v in losses], "sum")
    return [v / dist.world_size for v in vals]


def build_config_model(ctx: Ctx, config: str) -> nn.Module:
    """The model of ``config`` ('stage1', 'stage3', 'floor') on the device."""
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
    """Build the configuration's model and engine, warm up, time, measure, check.

    ``config`` is 'stage1', 'stage3' (the default for ``stage``) or 'floor'
    (stage 3 without adapters: timed and counted, no checks). Every step is
    the trainer's ``TrainStep`` on the fixed batch.
    """
    cfg, dist = ctx.cfg, ctx.dist
    config = config or f"stage{stage}"
    ctx.memory.reset()
    model = build_config_model(ctx, config)
    engine = build_engine(model, cfg, dist)
    step = TrainStep(engine, dist.device, ctx.precision, cfg.optim.label_smoothing)
    x, y = ctx.batch
    res: dict[str, Any] = {"stage": stage, "config": config}
    try:
        # The first step's time includes what only the first call pays
        # (model.compile's compilation, the allocator's growth).
        losses, first = [], None
        t0 = time.perf_counter()
        for _ in range(max(0, ctx.opts.warmup - 1)):
            losses.append(step(x, y).loss)
            if first is None:
                sync(dist)
                first = time.perf_counter() - t0
        # The last warm-up step runs under the comms logger: what actually
        # went over the wire, per op.
        comm, last = logged_comm_step(dist, lambda: step(x, y))
        if first is None:
            sync(dist)
            first = time.perf_counter() - t0
        res["first_step_s"] = reduce(dist, [first], "max")[0]
        res["warmup_losses"] = mean_losses(dist, losses + [last.loss])
        times = timed(dist, lambda: step(x, y), ctx.opts.steps)
        median = statistics.median(times)
        # One rank's all-reduce moves nothing: its step is all compute. ZeRO
        # 1/2 cannot skip their reduction, so they get no split on more.
        compute = median if dist.world_size == 1 else None
        if dist.world_size > 1 and cfg.deepspeed.zero_stage == 0:
            # The same steps with no collective at all (neither the gradient
            # all-reduce nor the flag agreement): the compute the projection
            # starts from (weights drift apart across ranks; only the time
            # is used).
            local = TrainStep(engine, dist.device, ctx.precision, cfg.optim.label_smoothing,
                              agree=False)
            engine.enable_backward_allreduce = False
            try:
                compute = statistics.median(timed(dist, lambda: local(x, y), ctx.opts.steps))
            finally:
                engine.enable_backward_allreduce = True
        sync(dist)
        peak = int(reduce(dist, [ctx.memory.peak()], "max")[0])

        trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        trainable = count_parameters(model, trainable_only=True)
        ar = comm.get("all_reduce", {"bytes": 0, "calls": 0})
        other = {k: v for k, v in comm.items() if k != "all_reduce"}
        b = cfg.deepspeed.micro_batch_size
        res.update({
            "step_time_s": median,
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "step_times_s": times,
            "compute_time_s": compute,
            "images_per_s": b * dist.world_size / median,
            "trainable_params": trainable,
            "total_params": count_parameters(model),
            "optimizer_state_bytes": int(reduce(dist, [optimizer_state_bytes(engine)], "max")[0]),
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
            res["checks"] = stage_checks(ctx, stage, model, engine, step, trainable_names,
                                         trainable_in_engine(engine, model))
        if config == "stage1":
            res["bookkeeping"] = bookkeeping_cost(ctx, model, median)
    finally:
        destroy_engine(engine)
        del engine, model, step
        release_free_memory()
    return res


# --------------------------------------------------------------------------- #
# The peer: what a user would run instead of our engine.


class DDPPeer:
    """One stage's model under ``torch.nn.parallel.DistributedDataParallel``
    with torch AdamW: the loop a user writes without DeepSpeed.

    The same model (same seed, shaped by the same ``shape_for_stage``), the
    same AdamW groups and hyper-parameters (``engine.param_groups``), the
    same loss and gradient-norm clip. DDP registers hooks only for
    parameters with ``requires_grad``, so a stage-3 model reduces the
    trainable gradients only, in 25 MiB buckets overlapped with the backward
    pass (DDP's defaults). Under bf16 the weights stay fp32 and the forward
    runs under ``torch.autocast`` (what a torch user runs); fp32 runs plain.
    """

    def __init__(self, ctx: Ctx, config: str):
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel

        from ..engine import param_groups

        cfg, dev = ctx.cfg, ctx.dist.device
        self.model = build_config_model(ctx, config)
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
        self.label_smoothing = o.label_smoothing
        # The low-precision dtype our engine's inputs take, as the peer's autocast dtype.
        self.autocast = input_dtype(ctx.precision)
        # Autocast casts inside the matmuls; the input stays fp32 like the weights.
        self.x, self.y = ctx.batch

    def step(self) -> torch.Tensor:
        """Forward, cross-entropy, backward (bucketed all-reduce), clip, AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            logits = self.ddp(self.x)
        loss = F.cross_entropy(logits.float(), self.y, label_smoothing=self.label_smoothing)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return loss.detach()

    def local_step(self) -> torch.Tensor:
        """The same step without DDP's gradient all-reduce (``no_sync``)."""
        with self.ddp.no_sync():
            return self.step()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.ddp, self.optimizer, self.model, self.params
        release_free_memory()


def alternate(dist, steps: list[Callable[[], Any]], rounds: int) -> list[list[float]]:
    """``rounds`` rounds of one timed call of each step (``probes.timed``),
    the order rotated every round; each step's seconds per call. Drift of a
    shared machine moves all of them alike, which timing each in its own
    block does not."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(rounds):
        k = i % len(steps)
        for j in list(range(k, len(steps))) + list(range(k)):
            times[j] += timed(dist, steps[j], 1)
    return times


def interleaved_over_peer(ctx: Ctx, config: str) -> dict[str, Any]:
    """Ours and the DDP peer on ``config``, both built at once and stepped
    alternately (``alternate``), ``ctx.opts.steps`` rounds: ours / peer of
    the median step times. This is the ratio to quote."""
    cfg, dist = ctx.cfg, ctx.dist
    model = build_config_model(ctx, config)
    engine = build_engine(model, cfg, dist)
    step = TrainStep(engine, dist.device, ctx.precision, cfg.optim.label_smoothing)
    peer = DDPPeer(ctx, config)
    x, y = ctx.batch
    try:
        for _ in range(max(1, ctx.opts.warmup)):
            step(x, y)
            peer.step()
        ours_times, peer_times = alternate(dist, [lambda: step(x, y), peer.step], ctx.opts.steps)
    finally:
        peer.close()
        destroy_engine(engine)
        del engine, model
        release_free_memory()
    ours, theirs = statistics.median(ours_times), statistics.median(peer_times)
    return {"ours_step_time_s": ours, "peer_step_time_s": theirs, "ratio": ratio(ours, theirs),
            "rounds": ctx.opts.steps}


def interleaved_stages(ctx: Ctx, configs: list[str]) -> dict[str, Any]:
    """Our engines for ``configs`` ('stage1', 'stage3', 'floor'), all built
    at once and stepped alternately (``alternate``), ``ctx.opts.steps``
    rounds: each one's median step time, and stage 3 over stage 1 and over
    the floor of those medians. The block-timed ratios of ``run_stage``
    drift by 10-20 % on a shared machine; these are the ones to quote."""
    cfg, dist = ctx.cfg, ctx.dist
    x, y = ctx.batch
    engines, steps = [], []
    try:
        for config in configs:
            engine = build_engine(build_config_model(ctx, config), cfg, dist)
            engines.append(engine)
            steps.append(TrainStep(engine, dist.device, ctx.precision, cfg.optim.label_smoothing))
        for _ in range(max(1, ctx.opts.warmup)):
            for step in steps:
                step(x, y)
        times = alternate(dist, [lambda s=s: s(x, y) for s in steps], ctx.opts.steps)
    finally:
        for engine in engines:
            destroy_engine(engine)
        del engines, steps
        release_free_memory()
    med = {f"{c}_step_time_s": statistics.median(t) for c, t in zip(configs, times)}
    out: dict[str, Any] = {"rounds": ctx.opts.steps, **med,
                           "stage3_over_stage1": None, "stage3_over_floor": None}
    if "stage3" in configs:
        for other in ("stage1", "floor"):
            if other in configs:
                out[f"stage3_over_{other}"] = ratio(med["stage3_step_time_s"],
                                                    med[f"{other}_step_time_s"])
    return out


def run_peer(ctx: Ctx, config: str) -> dict[str, Any]:
    """Time ``config`` ('stage1' or 'stage3') under the DDP peer exactly as
    ``run_stage`` times our engine: the same warm-up, ``probes.timed``,
    median of the slowest rank; on more than one rank again without the
    all-reduce."""
    dist = ctx.dist
    ctx.memory.reset()
    peer = DDPPeer(ctx, config)
    try:
        losses = [peer.step() for _ in range(ctx.opts.warmup)]
        times = timed(dist, peer.step, ctx.opts.steps)
        median = statistics.median(times)
        compute = median
        if dist.world_size > 1:
            compute = statistics.median(timed(dist, peer.local_step, ctx.opts.steps))
        sync(dist)
        peak = int(reduce(dist, [ctx.memory.peak()], "max")[0])
        frozen = [n for n, p in peer.model.named_parameters() if not p.requires_grad]
        in_opt = {id(p) for g in peer.optimizer.param_groups for p in g["params"]}
        trainable = sum(p.numel() for p in peer.params)
        elem = peer.params[0].element_size() if peer.params else 4
        b = ctx.cfg.deepspeed.micro_batch_size
        return {
            "stage": CONFIGS[config], "config": config, "peer": "ddp",
            "step_time_s": median, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "step_times_s": times, "compute_time_s": compute,
            "images_per_s": b * dist.world_size / median,
            "trainable_params": trainable,
            "optimizer_holds_exactly_trainable": in_opt == {id(p) for p in peer.params},
            "frozen_with_grad": sum(1 for n, p in peer.model.named_parameters()
                                    if not p.requires_grad and p.grad is not None),
            "frozen_tensors": len(frozen),
            "grad_bytes": trainable * elem,
            "peak_memory_bytes": peak,
            "warmup_losses": mean_losses(dist, losses),
            "autocast": str(peer.autocast).replace("torch.", "") if peer.autocast else None,
        }
    finally:
        peer.close()


# --------------------------------------------------------------------------- #
# The convergence bookkeeping.


def bookkeeping_cost(ctx: Ctx, model: nn.Module, step_time: float, reps: int = 5) -> dict[str, Any]:
    """Seconds per window of the convergence bookkeeping, and its share of
    the window's step time (``step_time`` s per step).

    Per window the trainer reduces the window statistics over ranks
    (``train.reduce_window_stats``: norms, and each rank's share of the
    relative updates and energy ranks, in one all-reduce) and rank 0's
    ``SwitchPolicy`` decides, its decision broadcast. All of it is timed here
    on the stage-1 model, through the trainer's own functions
    (``train.build_switch``, ``reduce_window_stats``, ``decide_on_rank0``),
    with the full test (and the rank assignment) running at every timed
    window; ``update_stats_s`` is the part spent on the update statistics
    alone (0 where the trainer does not track them, ZeRO-3).
    """
    from ..train import build_switch, decide_on_rank0, reduce_window_stats

    cfg, dist = ctx.cfg, ctx.dist
    tracker, policy, updates = build_switch(cfg, model, dist)

    def window():
        stats = reduce_window_stats(tracker, updates, model, 1.5, dist.world_size, dist.device)
        decide_on_rank0(policy, stats, True, dist.is_main)

    # k earlier windows, so each timed window has a full history to test.
    for _ in range(cfg.prelora.k):
        window()
    times, update_times = [], []
    for _ in range(reps):
        barrier(dist)
        t0 = time.perf_counter()
        window()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if updates is not None:
            updates.local_stats(model)
        update_times.append(time.perf_counter() - t0)
    per_window = statistics.median(reduce(dist, times, "max"))
    update_s = statistics.median(reduce(dist, update_times, "max"))
    ws = ctx.opts.window_steps
    return {"per_window_s": per_window, "update_stats_s": update_s, "window_steps": ws,
            "fraction_of_step_time": per_window / (ws * step_time) if ws else None,
            "update_fraction_of_step_time": update_s / (ws * step_time) if ws else None}


# --------------------------------------------------------------------------- #
# The whole benchmark.


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
    """Collective: run the configurations asked for (smallest first) and
    return the result dict (identical on every rank)."""
    precision = resolve_precision(cfg, dist.device)
    ctx = Ctx(cfg, dist, precision, rank_map, opts, PeakMemory(dist.device))
    ctx.batch = make_batch(cfg, dist)
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
                                                     "depth", "num_heads", "num_classes",
                                                     "compile")},
        "micro_batch_size": cfg.deepspeed.micro_batch_size,
        "global_batch": global_batch(cfg, dist.world_size),
        "steps": opts.steps,
        "warmup_steps": opts.warmup,
        "torch": torch.__version__,
        "peak_memory_method": ctx.memory.method,
        "rank_map": {"source": rank_map_source, "r_min": cfg.prelora.r_min,
                     "r_max": cfg.prelora.r_max, "layers": len(rank_map),
                     "histogram": {str(r): n for r, n in rank_histogram(rank_map).items()},
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
            peer[f"stage{stage}"]["interleaved"] = interleaved_over_peer(ctx, f"stage{stage}")
    result.update(stages)
    s1, s3 = stages.get("stage1"), stages.get("stage3")
    configs = [c for c, on in (("stage1", s1 is not None), ("stage3", s3 is not None),
                               ("floor", floor is not None)) if on]
    result["interleaved"] = (interleaved_stages(ctx, configs)
                             if opts.interleave and len(configs) > 1 else None)
    # The ratios are always there (None where not measured): a stable schema.
    r = BenchRatios()
    result["floor"] = floor
    result["peer"] = dict(peer, kind=opts.peer) if opts.peer else None
    for name in peer:
        setattr(r, f"{name}_over_peer", ratio(stages[name]["step_time_s"],
                                              peer[name]["step_time_s"]))
        setattr(r, f"{name}_compute_over_peer", ratio(stages[name]["compute_time_s"],
                                                      peer[name]["compute_time_s"]))
        setattr(r, f"{name}_over_peer_interleaved", peer[name]["interleaved"]["ratio"])
    if result["interleaved"] is not None:
        r.step_time_ratio_interleaved = result["interleaved"]["stage3_over_stage1"]
        r.stage3_over_floor_interleaved = result["interleaved"]["stage3_over_floor"]
    if floor is not None and s3 is not None:
        r.stage3_over_floor = ratio(s3["step_time_s"], floor["step_time_s"])
        r.stage3_above_floor_s = s3["step_time_s"] - floor["step_time_s"]
    if s3 is not None and opts.checks and opts.bf16_probe and precision == "fp32" \
            and dist.device.type == "cpu" and cfg.deepspeed.zero_stage in (0, 1, 2):
        s3["checks"]["low_precision_masters"] = bf16_probe(ctx)
    if s1 is not None and s3 is not None:
        r.step_time_ratio = ratio(s3["step_time_s"], s1["step_time_s"])
        r.compute_time_ratio = ratio(s3["compute_time_s"], s1["compute_time_s"])
        r.grad_bytes_ratio = ratio(s3["grad_bytes"], s1["grad_bytes"])
        r.allreduce_bytes_ratio = ratio(s3["allreduce_bytes_per_step"],
                                        s1["allreduce_bytes_per_step"])
        r.peak_memory_ratio = ratio(s3["peak_memory_bytes"], s1["peak_memory_bytes"])
        r.trainable_fraction = ratio(s3["trainable_params"], s1["trainable_params"])
        r.optimizer_state_ratio = ratio(s3["optimizer_state_bytes"], s1["optimizer_state_bytes"])
        if opts.checks:
            r.flop_ratio = ratio(s3["checks"]["flops_per_step"], s1["checks"]["flops_per_step"])
    result.update(r.to_json())
    big = max(s["grad_bytes"] for s in stages.values())
    net = network_model(dist, big, bandwidth_gbps, latency_us)
    result["network"] = net
    result["projection"] = {"gpus_per_node": GPUS_PER_NODE, "micro_batch_per_gpu":
                            cfg.deepspeed.micro_batch_size}
    for name, s in stages.items():
        if s["compute_time_s"] is not None:
            # Ours reduces after the backward pass (ZeRO 0): nothing hidden.
            result["projection"][name] = project(s, cfg.deepspeed.micro_batch_size,
                                                 net["bandwidth_gbps"], net["latency_s"],
                                                 overlap=0.0)
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
                           "overlap": 0.0, "error": projected / s["step_time_s"] - 1,
                           # The same term measured on our step: 0 if the model holds.
                           "hidden_fraction": hidden_fraction(s["step_time_s"],
                                                              s["compute_time_s"], comm)}
            theirs = peer.get(name)
            if theirs is not None:
                # DDP overlaps its bucketed all-reduce with the backward pass:
                # how much of the same modelled all-reduce its step hid.
                check[f"peer_{name}"] = {
                    "measured_step_s": theirs["step_time_s"], "compute_s": theirs["compute_time_s"],
                    "projected_comm_s": comm,
                    "hidden_fraction": hidden_fraction(theirs["step_time_s"],
                                                       theirs["compute_time_s"], comm)}
        result["projection_check"] = check
    return result
