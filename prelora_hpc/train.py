"""The training loop: it executes what the stage machine decides.

Stage 1 trains every parameter. At each window end every rank contributes
its weight-norm statistics and mean window loss to an all-reduce; rank 0
runs the partial convergence test on the last ``k`` windows and, when it
passes, assigns per-layer ranks; the decision and the rank map are
broadcast and every rank acts on the broadcast value. Stage 2 injects LoRA
with those ranks and trains base + adapters for ``warmup_windows`` windows;
stage 3 freezes the base and trains the adapters (and the configured small
parts) to the end. Each stage change rebuilds the DeepSpeed engine.

Modes: ``full`` stays in stage 1, ``lora`` trains adapters on a frozen
random base from step 0, ``prelora`` is the product. Which stage a run is
in, and when it moves on, is ``stages.StageMachine``'s; an optimizer step
ends where DeepSpeed's accumulation boundary says (``StepResult.boundary``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from .checkpoint_policy import CheckpointManager
from .config import Config, ConfigError, dump_config
from .convergence import NormTracker, UpdateTracker
from .data import build_dataloaders, prepare_data
from .dist_init import DistInfo, StopSignal
from .engine import (accumulation_steps, build_engine, current_lr, destroy_engine, extract_state,
                     global_batch, learning_rates, local_part, restore_state,
                     resolve_precision)
from .evaluate import evaluate
from .lora import lora_modules
from .memory import peak_memory_bytes, reset_peak_memory
from .model import build_model, count_parameters
from .runlog import RunLog
from .stages import (Decision, Stage, StageMachine, SwitchParams, SwitchPolicy, Transition,
                     WindowStats, shape_for_stage)
from .step import StepResult, TrainStep


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


def reduce_window_stats(tracker: NormTracker, updates: Optional[UpdateTracker],
                        model: nn.Module, local_loss: float, world_size: int,
                        device: torch.device) -> WindowStats:
    """Collective: every rank's window statistics, reduced over ranks, in one all-reduce.

    Returns ``WindowStats`` with the Frobenius norm of each tracked effective
    weight [modules, layers] (the base weight's where no adapter is injected,
    so stage 1 sees exactly the base norms), the base weights' norms as
    ``base_norms`` once adapters exist, the mean of the ranks' ``local_loss``
    and, with an ``UpdateTracker``, each layer's relative update (percent)
    and energy rank, measured by the rank owning the layer.
    """
    sharded = tracker.sharded
    base_sq = tracker.local_sumsq(model)
    # ZeRO-3 partitions: the effective weight's cross terms need whole
    # weights, so only the base norms are tracked there (config forbids
    # the update statistics under ZeRO-3).
    adapted = bool(lora_modules(model))
    eff_sq = tracker.local_effective_sumsq(model) if adapted and not sharded else base_sq
    buf = WindowStats.pack(base_sq, eff_sq, local_loss,
                           None if updates is None else updates.local_stats(model)).to(device)
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return WindowStats.unpack(buf, tuple(base_sq.shape), world_size, sharded=sharded,
                              adapted=adapted, with_updates=updates is not None,
                              with_energy=updates is not None and updates.energy is not None)


def decide_on_rank0(policy: SwitchPolicy, stats: WindowStats, can_switch: bool,
                    is_main: bool) -> Decision:
    """Collective: rank 0's ``policy`` observes ``stats`` and decides; the
    decision (reason, rank map) is broadcast, and every rank returns it."""
    payload = [policy.observe(stats, can_switch) if is_main else None]
    tdist.broadcast_object_list(payload, src=0)
    return payload[0]


@dataclass
class Progress:
    """The trainer's position in the data and the windows, saved in every
    checkpoint (the stage is the ``StageMachine``'s)."""

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0        # this rank's samples consumed in `epoch`
    windows_done: int = 0
    window_steps_done: int = 0
    window_loss_sum: float = 0.0
    window_loss_count: int = 0
    skipped_steps: int = 0


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LossMeter:
    """Sums the finite micro-batch losses on the device, so adding one costs
    no host sync; the sum reaches the host only when read."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach())
        self.sum += torch.where(ok, loss.detach(), 0.0).to(torch.float64)
        self.count += ok.to(torch.int64)

    def drain_into(self, p: Progress) -> None:
        """Move the sum so far into ``p``'s window totals (one host sync)."""
        n = int(self.count)
        if n:
            p.window_loss_sum += float(self.sum)
            p.window_loss_count += n
        self.sum.zero_()
        self.count.zero_()


@dataclass
class DataPlan:
    """The run's loaders and its length in optimizer steps."""

    loaders: Any
    accum: int
    """Micro batches per optimizer step (``deepspeed.grad_accum_steps``, resolved)."""
    steps_per_epoch: int
    total_steps: int
    window_steps: int


def plan_data(cfg: Config, dist: DistInfo) -> DataPlan:
    """Collective: rank 0 prepares the data (converts or downloads), every
    rank builds its sharded loaders; the epoch, run and window lengths follow."""
    if dist.is_main:
        prepare_data(cfg.data)
    tdist.barrier()
    ds = cfg.deepspeed
    accum = accumulation_steps(cfg, dist.world_size)
    # Epochs are trimmed to whole optimizer steps, so DeepSpeed's
    # accumulation boundaries fall on the same micro batches in every epoch.
    loaders = build_dataloaders(cfg.data, cfg.model, ds.micro_batch_size, dist.rank,
                                dist.world_size, cfg.run.seed, accum=accum,
                                worker_ignores=StopSignal.SIGNALS)
    loaders.train_sampler.set_epoch(0)
    step_samples = ds.micro_batch_size * accum
    steps_per_epoch = len(loaders.train_sampler) // step_samples
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has {loaders.train_size // dist.world_size} samples per rank, "
                         f"fewer than one optimizer step needs (micro_batch_size x "
                         f"grad_accum_steps = {step_samples})")
    total = steps_per_epoch * cfg.run.epochs
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    ws = cfg.prelora.window_steps
    return DataPlan(loaders, accum, steps_per_epoch, total, steps_per_epoch if ws == "epoch" else ws)


def build_switch(cfg: Config, model: nn.Module, dist: DistInfo
                 ) -> tuple[NormTracker, SwitchPolicy, Optional[UpdateTracker]]:
    """What the switch reads and decides with: the norm tracker of the
    configured modules, the policy, and (unless ZeRO-3 partitions whole
    weights over ranks) the update statistics this rank measures."""
    tracker = NormTracker(model, cfg.lora.target_modules, local_part=local_part)
    params = SwitchParams.from_config(cfg)
    policy = SwitchPolicy(params, tracker.module_names, tracker.num_layers)
    track = params.needs_updates or (cfg.prelora.track_updates and cfg.deepspeed.zero_stage < 3)
    updates = (UpdateTracker(tracker, dist.rank, dist.world_size, params.energy, params.r_min,
                             params.r_max) if track else None)
    return tracker, policy, updates


class SwitchWatch:
    """One rank's part of the switch: the norm tracker, the policy (decides
    on rank 0) and the update statistics this rank measures."""

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo):
        self.tracker, self.policy, self.updates = build_switch(cfg, model, dist)
        self.dist = dist

    def judge(self, model: nn.Module, local_loss: float,
              can_switch: bool) -> tuple[WindowStats, Decision]:
        """Collective: the window's statistics over all ranks and rank 0's decision."""
        stats = reduce_window_stats(self.tracker, self.updates, model, local_loss,
                                    self.dist.world_size, self.dist.device)
        return stats, decide_on_rank0(self.policy, stats, can_switch, self.dist.is_main)

    def ranks_by_module(self, rank_map: dict[str, int]) -> dict[str, list[int]]:
        """Each tracked module's ranks, block by block (for the log)."""
        t = self.tracker
        return {m: [rank_map[t.layer_name(m, i)] for i in range(t.num_layers)]
                for m in t.module_names}


def progress_and_stages(d: dict) -> tuple[Progress, dict]:
    """A checkpoint's trainer state as (``Progress``, ``StageMachine`` state).

    Checkpoints written before the stage machine kept its state in the
    progress record and the rank map beside it; both layouts load.
    """
    progress = dict(d["progress"])
    legacy = {k: progress.pop(k, None) for k in ("stage", "stage2_windows", "switch_step")}
    stages = d.get("stages") or {"stage": legacy["stage"], "rank_map": d.get("rank_map", {}),
                                 "switch_step": legacy["switch_step"],
                                 "stage2_windows": legacy["stage2_windows"] or 0}
    return Progress(**progress), stages


def rebuild_engine(engine, model: nn.Module, stage: Stage, rank_map: dict[str, int],
                   cfg: Config, dist: DistInfo) -> tuple[Any, int]:
    """Collective: destroy ``engine``, shape ``model`` for ``stage`` and build
    its engine, carrying the AdamW state of parameters that stay trainable
    (unless ``prelora.reset_optimizer``). Returns (new engine, tensors carried)."""
    carried = None if cfg.prelora.reset_optimizer else extract_state(engine, model)
    destroy_engine(engine)
    shape_for_stage(model, stage, rank_map, cfg).to(dist.device)
    reset_peak_memory(dist.device)
    engine = build_engine(model, cfg, dist)
    return engine, restore_state(engine, model, carried) if carried else 0


class TrainerState:
    """What a checkpoint captures of a trainer besides DeepSpeed's own state:
    its progress, stage machine and policy (rank 0's copy is kept), and
    each rank's own window-loss sums and update references."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer

    @property
    def rank_map(self) -> dict[str, int]:
        return self.t.stages.rank_map

    def state_dict(self) -> dict:
        t = self.t
        t.losses.drain_into(t.p)
        return {"progress": vars(t.p).copy(), "stages": t.stages.state_dict(),
                "policy": t.watch.policy.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        t = self.t
        t.p, stages = progress_and_stages(d)
        saved = d.get("saved_world_size")
        if saved is not None and saved != t.dist.world_size:
            # Each rank had taken as many samples of the epoch: keep the
            # epoch's global position, in whole optimizer steps of this world.
            step = t.cfg.deepspeed.micro_batch_size * t.plan.accum
            seen = t.p.samples_in_epoch * saved // t.dist.world_size
            t.p.samples_in_epoch = min(seen - seen % step, t.loaders.train_sampler.epoch_length())
        t.stages.load_state_dict(stages)
        t.watch.policy.load_state_dict(d["policy"] if "policy" in d else d["tracker"])

    def rank_state_dict(self) -> dict:
        t = self.t
        t.losses.drain_into(t.p)
        updates = t.watch.updates
        return {"world_size": t.dist.world_size,
                "window_loss": (t.p.window_loss_sum, t.p.window_loss_count),
                "updates": None if updates is None else updates.state_dict()}

    def load_rank_state_dict(self, d: Optional[dict]) -> None:
        """On another world size the data is sharded and the layers split
        differently: the window's loss so far is rank 0's, and the update
        history restarts (one window later)."""
        t = self.t
        if d is None or d["world_size"] != t.dist.world_size:
            return
        t.p.window_loss_sum, t.p.window_loss_count = d["window_loss"]
        if t.watch.updates is not None and d["updates"] is not None:
            t.watch.updates.load_state_dict(d["updates"])


class Trainer:
    """Trains one run as its config says; every rank constructs one. ``train()``
    returns the exit code: 0 complete, ``EXIT_RESUBMIT`` (85) or
    ``EXIT_INTERRUPTED`` (130) when a stop signal ended it after a checkpoint."""

    def __init__(self, cfg: Config, dist: DistInfo, resume: Optional[str] = None,
                 stop: Optional[StopSignal] = None):
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.device = dist.device
        self.out = Path(cfg.run.output_dir)
        self.precision = resolve_precision(cfg, self.device)
        self.global_batch = global_batch(cfg, dist.world_size)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        self.log = RunLog(cfg, dist.rank, self.out)
        self.checkpoints = CheckpointManager(cfg, dist.rank, self.log.info)
        self.saved = TrainerState(self)
        # The same seed on every rank: identical initial weights; the data
        # order is sharded by the sampler, augmentation seeded per sample.
        seed_all(cfg.run.seed)
        self.plan = plan_data(cfg, dist)
        self.loaders = self.plan.loaders
        self.model = build_model(cfg.model)
        # From here on each rank draws its own dropout randomness.
        seed_all(cfg.run.seed + 7919 * dist.rank)
        self.params_total = count_parameters(self.model)
        self.watch = SwitchWatch(cfg, self.model, dist)
        self.stages = StageMachine.for_run(cfg.run.mode, cfg.prelora.warmup_windows,
                                           self.watch.tracker.layer_names(), cfg.lora.rank)
        self.p = Progress()
        self.losses = LossMeter(self.device)
        self.last_eval_step = -1
        point = self.checkpoints.resume_point(resume, dist.world_size, self.log.warn)
        if point is not None:
            self.stages.stage, self.stages.rank_map = Stage(point.stage), dict(point.rank_map)
        # The model takes its stage's (or the checkpoint's) shape before DeepSpeed sees it.
        shape_for_stage(self.model, self.stage, self.rank_map, cfg).to(self.device)
        self.set_engine(build_engine(self.model, cfg, dist))
        if point is not None:
            self.checkpoints.restore(self.engine, self.saved, point)
            self.log.resumed(point.path, self.stage, self.p.global_step, self.p.epoch)
        self.log.start(dist, self.precision, self.global_batch, self.plan, self.params_total,
                       self.trainable_count(), self.stage, point, self.p.global_step)

    stage = property(lambda self: self.stages.stage, doc="The current ``Stage``.")
    rank_map = property(lambda self: self.stages.rank_map, doc="Layer name -> LoRA rank.")
    trainable_count = lambda self: count_parameters(self.model, trainable_only=True)  # noqa: E731

    def set_engine(self, engine) -> None:
        """Train with ``engine`` from now on (a new one per stage)."""
        self.engine = engine
        stop = self.stop
        self.step_fn = TrainStep(engine, self.device, self.precision,
                                 self.cfg.optim.label_smoothing,
                                 stop_requested=lambda: stop is not None and stop.received is not None,
                                 on_nonfinite=self.nonfinite_loss)

    def window_end(self) -> None:
        """Collective: reduce the window's statistics, decide, execute the transition."""
        p = self.p
        self.losses.drain_into(p)
        stats, decision = self.watch.judge(self.model, p.window_loss_sum / max(1, p.window_loss_count),
                                           self.stages.can_switch)
        p.windows_done += 1
        if self.dist.is_main:
            self.log.window(window=p.windows_done, step=p.global_step, epoch=p.epoch,
                            stage=self.stage, stats=stats, decision=decision,
                            modules=self.watch.tracker.module_names)
        p.window_steps_done, p.window_loss_sum, p.window_loss_count = 0, 0.0, 0
        transition = self.stages.after_window(decision, p.global_step)
        if transition is not None:
            self.execute(transition)

    def execute(self, t: Transition) -> None:
        """Collective: rebuild the engine for ``t.to`` carrying optimizer state,
        say why, and write the new stage's first checkpoint."""
        before = self.trainable_count()
        engine, self.engine = self.engine, None
        engine, restored = rebuild_engine(engine, self.model, t.to, self.rank_map, self.cfg,
                                          self.dist)
        self.set_engine(engine)
        self.log.switch(step=t.step, epoch=self.p.epoch, stage=t.to, reason=t.reason,
                        rank_map=self.rank_map, before=before, after=self.trainable_count(),
                        params_total=self.params_total, carried=restored,
                        layers=self.watch.ranks_by_module(self.rank_map) if t.from_full else {})
        self.checkpoints.at_switch(self.engine, self.saved, t.to, t.step)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Collective: one micro batch through the step (``prelora_hpc.step``)."""
        step, since = self.p.global_step, self.stages.switch_step
        return self.step_fn(x, y, *learning_rates(self.cfg, step, self.plan.total_steps, since))

    def nonfinite_loss(self) -> None:
        """Every rank, when some rank's loss in this optimizer step was not
        finite: stop the run, or skip the step, as ``run.on_nonfinite_loss`` says."""
        where = (f"non-finite loss at step {self.p.global_step} "
                 f"(epoch {self.p.epoch}, {self.stage.display})")
        if self.cfg.run.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(where + "; the latest checkpoint is the last good state")
        self.p.skipped_steps += 1
        self.log.warn(where + f": step skipped ({self.p.skipped_steps} so far)")

    def train(self) -> int:
        """Run to the end (0) or to a stop signal (85 walltime, 130 Ctrl-C)."""
        self.model.train()
        t_run = time.perf_counter()
        sampler, total = self.loaders.train_sampler, self.plan.total_steps
        while self.p.epoch < self.cfg.run.epochs and self.p.global_step < total:
            sampler.set_epoch(self.p.epoch, start=self.p.samples_in_epoch)
            for x, y in self.loaders.train:
                res = self.train_step(x, y)
                self.p.samples_in_epoch += len(y)
                self.log.count_samples(len(y) * self.dist.world_size)
                self.losses.add(res.loss)
                if not res.boundary:
                    continue  # DeepSpeed's boundary: stop and count only at optimizer steps
                self.on_optimizer_step(None if res.nonfinite else res.loss)
                if res.stop:
                    return self.stop_for_signal()
                if self.p.global_step >= total:
                    break
            else:
                self.end_epoch()
                continue
            # Stopped by run.max_steps: the epoch still ends if its last step ran.
            if self.p.samples_in_epoch >= sampler.epoch_length():
                self.end_epoch()
        self.finish(time.perf_counter() - t_run)
        return 0

    def on_optimizer_step(self, loss: Optional[torch.Tensor]) -> None:
        """After each optimizer step: progress, the periodic log line, the
        window end if one falls here, a periodic checkpoint if due."""
        p, cfg = self.p, self.cfg
        p.global_step += 1
        p.window_steps_done += 1
        value = None if loss is None else float(loss)
        if self.log.bar_mode:
            self.log.progress(p.global_step, self.plan.total_steps, self.stage, p.epoch, value)
        if p.global_step % cfg.logging.interval_steps == 0 and self.dist.is_main:
            self.log.step(step=p.global_step, total=self.plan.total_steps, stage=self.stage,
                          epoch=p.epoch, loss=value, lr=current_lr(self.engine),
                          global_batch=self.global_batch, trainable=self.trainable_count(),
                          peak_memory_bytes=peak_memory_bytes(self.device))
        if cfg.prelora.window_steps != "epoch" and p.window_steps_done >= self.plan.window_steps:
            self.window_end()
        if cfg.run.eval_every_steps and p.global_step % cfg.run.eval_every_steps == 0:
            self.evaluate_and_record()
        self.checkpoints.periodic(self.engine, self.saved, self.stage, p.global_step)

    def end_epoch(self) -> None:
        """Collective: the epoch's window end (one-epoch windows) and evaluation."""
        cfg = self.cfg
        if cfg.prelora.window_steps == "epoch" and self.p.window_steps_done > 0:
            self.window_end()
        self.p.epoch += 1
        self.p.samples_in_epoch = 0
        if self.p.epoch % cfg.run.eval_every_epochs == 0 or self.p.epoch == cfg.run.epochs:
            self.evaluate_and_record()

    def evaluate_and_record(self) -> None:
        """Collective: validate and log, record it; once per optimizer step."""
        if self.last_eval_step == self.p.global_step:
            return
        self.last_eval_step = self.p.global_step
        t0 = time.perf_counter()
        ev = evaluate(self.model, self.loaders.val, self.device)
        self.log.not_training(time.perf_counter() - t0)
        self.log.epoch(epoch=self.p.epoch, epochs=self.cfg.run.epochs, step=self.p.global_step,
                       stage=self.stage, ev=ev, trainable=self.trainable_count(),
                       peak_memory_bytes=peak_memory_bytes(self.device))

    def stop_for_signal(self) -> int:
        """Collective: checkpoint and return the signal's exit code."""
        # Every rank gets here at the same step; agreeing on the signal gives
        # all of them the same exit code (Ctrl-C: 130, walltime: resubmit).
        name, code, then = StopSignal.outcome(self.stop.agree(self.device))
        self.log.stopping(step=self.p.global_step, signal=name, code=code, then=then)
        self.checkpoints.at_stop(self.engine, self.saved, self.stage, self.p.global_step)
        self.log.stopped(step=self.p.global_step, signal=name)
        return code

    def finish(self, wall_s: float) -> None:
        """Collective: the last evaluation (unless it just ran), checkpoint and record."""
        self.evaluate_and_record()
        self.checkpoints.at_end(self.engine, self.saved, self.stage, self.p.global_step)
        self.log.end(step=self.p.global_step, epoch=self.p.epoch, stage=self.stage,
                     wall_s=wall_s, trainable=self.trainable_count(),
                     params_total=self.params_total, skipped_steps=self.p.skipped_steps)

    def close(self) -> None:
        """Release the engine, the data workers and files; safe to call twice."""
        self.log.close()
        if getattr(self, "loaders", None) is not None:
            self.loaders.close()
        if getattr(self, "engine", None) is not None:
            destroy_engine(self.engine)
            self.engine = None
