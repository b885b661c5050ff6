"""The stage machine and the training loop.

Stage 1 trains every parameter. At each window end every rank contributes
its weight-norm statistics and mean window loss to an all-reduce; rank 0
runs the partial convergence test on the last ``k`` windows and, when it
passes, assigns per-layer ranks; the decision and the rank map are
broadcast and every rank acts on the broadcast value. Stage 2 injects LoRA
with those ranks and trains base + adapters for ``warmup_windows`` windows;
stage 3 freezes the base and trains the adapters (and the configured small
parts) to the end. Each stage change rebuilds the DeepSpeed engine.

Modes: ``full`` stays in stage 1, ``lora`` trains adapters on a frozen
random base from step 0, ``prelora`` is the product.
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
from .config import Config, dump_config
from .convergence import NormTracker, UpdateTracker
from .data import build_dataloaders, prepare_data
from .engine import (accumulation_steps, build_engine, current_lr, destroy_engine, extract_state,
                     global_batch, lr_at, restore_state, resolve_precision)
from .evaluate import evaluate
from .launch import DistInfo, StopSignal
from .lora import lora_modules
from .memory import peak_memory_bytes, reset_peak_memory
from .model import build_model, count_parameters
from .runlog import RunLog
from .stages import Decision, SwitchParams, SwitchPolicy, WindowStats, shape_for_stage, stage_name
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
    parts = [base_sq.flatten(), eff_sq.flatten()]
    if updates is not None:
        parts.append(updates.local_stats(model).flatten())
    parts.append(torch.tensor([local_loss], dtype=torch.float64))
    buf = torch.cat(parts).to(device)
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    buf = buf.cpu()
    n = base_sq.numel()
    # Replicated weights: every rank holds all of it, so average; ZeRO-3
    # partitions: each rank holds a slice, so the sum is the whole.
    scale = 1.0 if sharded else 1.0 / world_size
    shape = base_sq.shape
    base = (buf[:n] * scale).view(shape).sqrt()
    eff = (buf[n:2 * n] * scale).view(shape).sqrt()
    stats = WindowStats(norms=eff, loss=float(buf[-1]) / world_size,
                        base_norms=base if adapted else None)
    if updates is not None:
        u = buf[2 * n:5 * n].view(3, *shape)
        if bool((u[2] > 0).all()):  # every layer measured (not the first window)
            stats.updates = u[0]
            if updates.energy is not None:
                stats.energy_ranks = u[1].round().to(torch.int64)
    return stats


def decide_on_rank0(policy: SwitchPolicy, stats: WindowStats, can_switch: bool,
                    is_main: bool) -> Decision:
    """Collective: rank 0's ``policy`` observes ``stats`` and decides; the
    decision (reason, rank map) is broadcast, and every rank returns it."""
    payload = [policy.observe(stats, can_switch) if is_main else None]
    tdist.broadcast_object_list(payload, src=0)
    return payload[0]


@dataclass
class Progress:
    """The trainer's position, saved in every checkpoint."""

    stage: int = 1
    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0        # this rank's samples consumed in `epoch`
    windows_done: int = 0
    window_steps_done: int = 0
    window_loss_sum: float = 0.0
    window_loss_count: int = 0
    stage2_windows: int = 0
    switch_step: Optional[int] = None
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
        raise ValueError(f"an epoch has {loaders.train_size // dist.world_size} samples per rank, "
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
    tracker = NormTracker(model, cfg.lora.target_modules, cfg.prelora.k)
    params = SwitchParams.from_config(cfg)
    policy = SwitchPolicy(params, tracker.module_names, tracker.num_layers)
    track = params.needs_updates or (cfg.prelora.track_updates and cfg.deepspeed.zero_stage < 3)
    updates = (UpdateTracker(tracker, dist.rank, dist.world_size, params.energy, params.r_min,
                             params.r_max) if track else None)
    return tracker, policy, updates


class Trainer:
    """Trains one run as its config says. Every rank constructs one.

    ``train()`` returns the process exit code: 0 when the run is complete,
    ``EXIT_RESUBMIT`` (85) or ``EXIT_INTERRUPTED`` (130) when a stop signal
    ended it after a checkpoint.
    """

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
        # The same seed on every rank: identical initial weights; the data
        # order is sharded by the sampler, augmentation seeded per rank.
        seed_all(cfg.run.seed)
        plan = plan_data(cfg, dist)
        self.loaders, self.accum, self.steps_per_epoch = plan.loaders, plan.accum, plan.steps_per_epoch
        self.total_steps, self.window_steps = plan.total_steps, plan.window_steps
        self.model = build_model(cfg.model)
        # Identical weights came from the shared seed; from here on each rank
        # draws its own augmentation and dropout randomness.
        seed_all(cfg.run.seed + 7919 * dist.rank)
        self.params_total = count_parameters(self.model)
        self.tracker, self.policy, self.updates = build_switch(cfg, self.model, dist)
        self.p = Progress()
        self.rank_map: dict[str, int] = {}
        self.losses = LossMeter(self.device)
        self._last_eval_step = -1

        point = self.checkpoints.resume_point(resume, dist.world_size, self.log.warn)
        if point is not None:
            self.p.stage, self.rank_map = point.stage, point.rank_map
        elif cfg.run.mode == "lora":
            self.rank_map = {name: cfg.lora.rank for name in self.tracker.layer_names()}
            self.p.stage = 3
        # Convert, then build: the model takes the shape of its stage before
        # DeepSpeed sees it.
        shape_for_stage(self.model, self.p.stage, self.rank_map, cfg).to(self.device)
        self._set_engine(build_engine(self.model, cfg, dist))
        if point is not None:
            self.checkpoints.restore(self.engine, self, point)
            self.log.resumed(point.path, self.p.stage, self.p.global_step, self.p.epoch)
        self.log.start(world_size=dist.world_size, device=self.device, backend=dist.backend,
                       precision=self.precision, global_batch=self.global_batch, accum=self.accum,
                       steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                       window_steps=self.window_steps, params_total=self.params_total,
                       trainable=self.trainable_count(), stage=self.p.stage,
                       resumed_from=str(point.path) if point else None,
                       resumed_step=self.p.global_step)

    def _set_engine(self, engine) -> None:
        self.engine = engine
        stop = self.stop
        self.step_fn = TrainStep(engine, self.device, self.precision,
                                 self.cfg.optim.label_smoothing,
                                 stop_requested=lambda: stop is not None and stop.received is not None,
                                 on_nonfinite=self.nonfinite_loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The trainer's own progress (DeepSpeed saves weights and optimizer)."""
        self.losses.drain_into(self.p)
        return {"progress": vars(self.p).copy(), "rank_map": dict(self.rank_map),
                "policy": self.policy.state_dict(), "mode": self.cfg.run.mode}

    def rank_state_dict(self) -> dict:
        """What differs per rank: its own window-loss sums (DeepSpeed keeps
        only rank 0's client state) and the update statistics' reference
        copies of the layers this rank measures."""
        self.losses.drain_into(self.p)
        return {"world_size": self.dist.world_size,
                "window_loss": (self.p.window_loss_sum, self.p.window_loss_count),
                "updates": None if self.updates is None else self.updates.state_dict()}

    def load_rank_state_dict(self, d: Optional[dict]) -> None:
        """Restore ``rank_state_dict``. On another world size the data is
        sharded and the layers split differently: the window's loss so far is
        rank 0's, and the update history restarts (one window later)."""
        if d is None or d["world_size"] != self.dist.world_size:
            return
        self.p.window_loss_sum, self.p.window_loss_count = d["window_loss"]
        if self.updates is not None and d["updates"] is not None:
            self.updates.load_state_dict(d["updates"])

    def load_state_dict(self, d: dict) -> None:
        self.p = Progress(**d["progress"])
        self.rank_map = dict(d["rank_map"])
        # Checkpoints from before the policy held the history call it "tracker".
        self.policy.load_state_dict(d["policy"] if "policy" in d else d["tracker"])

    # ------------------------------------------------------------------ stages
    def trainable_count(self) -> int:
        return count_parameters(self.model, trainable_only=True)

    def rebuild(self, new_stage: int) -> tuple[int, int, int]:
        """Collective: shape the model for ``new_stage`` and build its engine,
        carrying optimizer state. Returns (trainable before, trainable after,
        parameters whose optimizer state was carried)."""
        before = self.trainable_count()
        carried = None if self.cfg.prelora.reset_optimizer else extract_state(self.engine, self.model)
        destroy_engine(self.engine)
        self.engine = None
        self.p.stage = new_stage
        shape_for_stage(self.model, new_stage, self.rank_map, self.cfg).to(self.device)
        reset_peak_memory(self.device)
        self._set_engine(build_engine(self.model, self.cfg, self.dist))
        restored = restore_state(self.engine, self.model, carried) if carried else 0
        return before, self.trainable_count(), restored

    def switch(self, new_stage: int, decision: Optional[Decision]) -> None:
        """Collective: rebuild for ``new_stage``, say why, save its first checkpoint."""
        before, after, restored = self.rebuild(new_stage)
        if new_stage == 2:
            self.p.switch_step = self.p.global_step
        why = decision.reason if decision else (
            f"{self.p.stage2_windows} warm-up window(s) of stage 2 done")
        layers = {m: [self.rank_map[self.tracker.layer_name(m, l)]
                      for l in range(self.tracker.num_layers)]
                  for m in self.tracker.module_names} if new_stage == 2 else {}
        self.log.switch(step=self.p.global_step, epoch=self.p.epoch, stage=new_stage, reason=why,
                        rank_map=self.rank_map, before=before, after=after,
                        params_total=self.params_total, carried=restored, layers=layers)
        self.checkpoints.at_switch(self.engine, self, new_stage, self.p.global_step)

    # ------------------------------------------------------------- decisions
    def window_stats(self) -> WindowStats:
        """Collective: this window's statistics over all ranks."""
        self.losses.drain_into(self.p)
        local_loss = self.p.window_loss_sum / max(1, self.p.window_loss_count)
        return reduce_window_stats(self.tracker, self.updates, self.model, local_loss,
                                   self.dist.world_size, self.device)

    def decide(self, stats: WindowStats) -> Decision:
        """Collective: rank 0's policy records the window and decides; all
        ranks return rank 0's decision (``stats`` on other ranks are ignored)."""
        can_switch = self.cfg.run.mode == "prelora" and self.p.stage == 1
        return decide_on_rank0(self.policy, stats, can_switch, self.dist.is_main)

    def window_end(self) -> None:
        """Collective: reduce the window's statistics, decide, act on the decision."""
        stats = self.window_stats()
        decision = self.decide(stats)
        p = self.p
        p.windows_done += 1
        if self.dist.is_main:
            self.log.window(window=p.windows_done, step=p.global_step, epoch=p.epoch,
                            stage=p.stage, stats=stats, decision=decision,
                            modules=self.tracker.module_names)
        p.window_steps_done, p.window_loss_sum, p.window_loss_count = 0, 0.0, 0
        if decision.switch:
            self.rank_map = decision.rank_map
            self.switch(2 if self.cfg.prelora.warmup_windows > 0 else 3, decision)
        elif p.stage == 2:
            p.stage2_windows += 1
            if p.stage2_windows >= self.cfg.prelora.warmup_windows:
                self.switch(3, None)

    # --------------------------------------------------------------- stepping
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Collective: one micro batch through the step (``prelora_hpc.step``)."""
        return self.step_fn(x, y, lr=lr_at(self.cfg, self.p.global_step, self.total_steps))

    def nonfinite_loss(self) -> None:
        """Every rank, when some rank's loss in this optimizer step was not
        finite: stop the run, or skip the step, as ``run.on_nonfinite_loss`` says."""
        where = (f"non-finite loss at step {self.p.global_step} "
                 f"(epoch {self.p.epoch}, {stage_name(self.p.stage)})")
        if self.cfg.run.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(where + "; the latest checkpoint is the last good state")
        self.p.skipped_steps += 1
        self.log.warn(where + f": step skipped ({self.p.skipped_steps} so far)")

    def train(self) -> int:
        """Run to the end (0) or to a stop signal (85 walltime, 130 Ctrl-C)."""
        self.model.train()
        t_run = time.perf_counter()
        sampler = self.loaders.train_sampler
        while self.p.epoch < self.cfg.run.epochs and self.p.global_step < self.total_steps:
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
                if self.p.global_step >= self.total_steps:
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
        if self.log.bar_mode:
            self.log.progress(p.global_step, self.total_steps, p.stage, p.epoch,
                              None if loss is None else float(loss))
        if p.global_step % cfg.logging.interval_steps == 0 and self.dist.is_main:
            self.log.step(step=p.global_step, total=self.total_steps, stage=p.stage,
                          epoch=p.epoch, loss=None if loss is None else float(loss),
                          lr=current_lr(self.engine), global_batch=self.global_batch,
                          trainable=self.trainable_count(),
                          peak_memory_bytes=peak_memory_bytes(self.device))
        if cfg.prelora.window_steps != "epoch" and p.window_steps_done >= self.window_steps:
            self.window_end()
        self.checkpoints.periodic(self.engine, self, p.stage, p.global_step)

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
        """Collective: validate and write the epoch's line, record and summary row."""
        self._last_eval_step = self.p.global_step
        t0 = time.perf_counter()
        ev = evaluate(self.model, self.loaders.val, self.device)
        self.log.not_training(time.perf_counter() - t0)
        self.log.epoch(epoch=self.p.epoch, epochs=self.cfg.run.epochs, step=self.p.global_step,
                       stage=self.p.stage, ev=ev, trainable=self.trainable_count(),
                       peak_memory_bytes=peak_memory_bytes(self.device))

    def stop_for_signal(self) -> int:
        """Collective: checkpoint and return the signal's exit code."""
        # Every rank gets here at the same step; agreeing on the signal gives
        # all of them the same exit code (Ctrl-C: 130, walltime: resubmit).
        name, code, then = StopSignal.outcome(self.stop.agree(self.device))
        self.log.stopping(step=self.p.global_step, signal=name, code=code, then=then)
        self.checkpoints.at_stop(self.engine, self, self.p.stage, self.p.global_step)
        self.log.stopped(step=self.p.global_step, signal=name)
        return code

    def finish(self, wall_s: float) -> None:
        """Collective: the last evaluation (unless it just ran), checkpoint and record."""
        if self._last_eval_step != self.p.global_step:
            self.evaluate_and_record()
        self.checkpoints.at_end(self.engine, self, self.p.stage, self.p.global_step)
        self.log.end(step=self.p.global_step, epoch=self.p.epoch, stage=self.p.stage,
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
