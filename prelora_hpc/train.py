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

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config, dump_config
from .convergence import NormTracker, UpdateTracker
from .data import build_dataloaders, prepare_data
from .engine import (build_engine, current_lr, destroy_engine, extract_state, global_batch, lr_at,
                     restore_state, resolve_precision, set_lr)
from .launch import EXIT_RESUBMIT, DistInfo, StopSignal
from .lora import lora_modules
from .metrics import Log, MetricsWriter, peak_memory_bytes, reset_peak_memory
from .model import build_model, count_parameters
from .stages import Decision, SwitchParams, SwitchPolicy, WindowStats, shape_for_stage, stage_name


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(dim=1).sum())


class Trainer:
    """Trains one run as its config says. Every rank constructs one.

    ``train()`` returns the process exit code: 0 when the run is complete,
    ``EXIT_RESUBMIT`` when a walltime signal stopped it after a checkpoint.
    """

    def __init__(self, cfg: Config, dist: DistInfo, resume: Optional[str] = None,
                 stop: Optional[StopSignal] = None):
        self.cfg = cfg
        self.dist = dist
        self.stop = stop
        self.log = Log(dist.rank, cfg.logging.progress)
        self.out = Path(cfg.run.output_dir)
        self.device = dist.device
        self.precision = resolve_precision(cfg, self.device)
        self.global_batch = global_batch(cfg, dist.world_size)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        # The same seed on every rank: identical initial weights; the data
        # order is sharded by the sampler, augmentation seeded per rank.
        _seed_all(cfg.run.seed)

        if dist.is_main:
            prepare_data(cfg.data)
        tdist.barrier()
        self.loaders = build_dataloaders(cfg.data, cfg.model, cfg.deepspeed.micro_batch_size,
                                         dist.rank, dist.world_size, cfg.run.seed)
        self.loaders.train_sampler.set_epoch(0)
        steps_per_epoch = len(self.loaders.train_sampler) // (
            cfg.deepspeed.micro_batch_size * cfg.deepspeed.grad_accum_steps)
        if steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(self.loaders.train_sampler)} samples per rank, fewer than one "
                f"optimizer step needs (micro_batch_size x grad_accum_steps)")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.run.epochs
        if cfg.run.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        ws = cfg.prelora.window_steps
        self.window_steps = steps_per_epoch if ws == "epoch" else ws

        self.model = build_model(cfg.model)
        # Identical weights came from the shared seed; from here on each rank
        # draws its own augmentation and dropout randomness.
        _seed_all(cfg.run.seed + 7919 * dist.rank)
        self.params_total = count_parameters(self.model)
        self.tracker = NormTracker(self.model, cfg.lora.target_modules, cfg.prelora.k)
        params = SwitchParams.from_config(cfg)
        self.policy = SwitchPolicy(params, self.tracker.module_names, self.tracker.num_layers)
        # ZeRO-3 partitions whole weights over ranks: no update statistics.
        track = params.needs_updates or (cfg.prelora.track_updates
                                         and cfg.deepspeed.zero_stage < 3)
        self.updates = (UpdateTracker(self.tracker, dist.rank, dist.world_size, params.energy,
                                      params.r_min, params.r_max) if track else None)
        self.p = Progress()
        self.rank_map: dict[str, int] = {}
        self.metrics = MetricsWriter(self.out, dist.is_main, cfg.logging.tensorboard)
        self._t_last = time.perf_counter()
        self._samples_since = 0
        self._last_eval_step = -1

        # Collective: verified before anything is loaded, the same on every rank.
        point = ckpt.find_resume(cfg, resume, rank=dist.rank, world_size=dist.world_size)
        for note in point.notes if point is not None and dist.is_main else []:
            self.log.warn(note)
        if point is not None:
            note = ckpt.check_world_size(point, cfg.deepspeed.zero_stage, dist.world_size)
            if note:
                self.log.warn(note)
            self.p.stage = point.stage
            self.rank_map = point.rank_map
        elif cfg.run.mode == "lora":
            self.rank_map = {self.tracker.layer_name(m, l): cfg.lora.rank
                             for m in self.tracker.module_names
                             for l in range(self.tracker.num_layers)}
            self.p.stage = 3
        # Convert, then build: the model takes the shape of its stage before
        # DeepSpeed sees it.
        shape_for_stage(self.model, self.p.stage, self.rank_map, cfg).to(self.device)
        self.engine = build_engine(self.model, cfg, dist)
        if point is not None:
            client = ckpt.load(self.engine, point, dist.rank)
            self.load_state_dict(client)
            self.load_rank_state_dict(ckpt.load_rank_state(point, dist.rank))
            self.log.info(f"resumed from {point.path} in {stage_name(self.p.stage)} at step "
                          f"{self.p.global_step} (epoch {self.p.epoch})")
        self._log_start(point)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The trainer's own progress (DeepSpeed saves weights and optimizer)."""
        return {"progress": vars(self.p).copy(), "rank_map": dict(self.rank_map),
                "policy": self.policy.state_dict(), "mode": self.cfg.run.mode}

    def rank_state_dict(self) -> dict:
        """What differs per rank: its own window-loss sums (DeepSpeed keeps
        only rank 0's client state) and the update statistics' reference
        copies of the layers this rank measures."""
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
        self.engine = build_engine(self.model, self.cfg, self.dist)
        restored = restore_state(self.engine, self.model, carried) if carried else 0
        after = self.trainable_count()
        return before, after, restored

    def _switch(self, new_stage: int, decision: Optional[Decision]) -> None:
        before, after, restored = self.rebuild(new_stage)
        if new_stage == 2:
            self.p.switch_step = self.p.global_step
        pct = 100.0 * after / self.params_total
        why = decision.reason if decision else (
            f"{self.p.stage2_windows} warm-up window(s) of stage 2 done")
        self.log.info(f"switch to {stage_name(new_stage)} at step {self.p.global_step}: {why}")
        self.log.info(f"  trainable parameters {before:,} -> {after:,} "
                      f"({100.0 * before / self.params_total:.1f}% -> {pct:.1f}% of "
                      f"{self.params_total:,}); optimizer state carried for {restored} tensors")
        if new_stage == 2:
            hist: dict[int, int] = {}
            for r in self.rank_map.values():
                hist[r] = hist.get(r, 0) + 1
            self.log.info(f"  rank map ({len(self.rank_map)} layers, rank: count) "
                          f"{dict(sorted(hist.items()))}")
            for m in self.tracker.module_names:
                ranks = [self.rank_map[self.tracker.layer_name(m, l)]
                         for l in range(self.tracker.num_layers)]
                self.log.info(f"    {m:<10} {ranks}")
            if self.dist.is_main:
                (self.out / "rank_map.json").write_text(json.dumps(self.rank_map, indent=1))
        self.metrics.write("switch", step=self.p.global_step, epoch=self.p.epoch,
                           stage=new_stage, reason=why, rank_map=self.rank_map,
                           trainable_before=before, trainable_after=after,
                           trainable_pct=pct, params_total=self.params_total)
        self.save(tag=f"step{self.p.global_step:08d}-stage{new_stage}")

    # ------------------------------------------------------------- decisions
    def window_stats(self) -> WindowStats:
        """Collective: this window's statistics over all ranks."""
        local_loss = self.p.window_loss_sum / max(1, self.p.window_loss_count)
        return reduce_window_stats(self.tracker, self.updates, self.model, local_loss,
                                   self.dist.world_size, self.device)

    def decide(self, stats: WindowStats) -> Decision:
        """Collective: rank 0's policy records the window and decides; all
        ranks return rank 0's decision (``stats`` on other ranks are ignored)."""
        payload = [None]
        if self.dist.is_main:
            can_switch = self.cfg.run.mode == "prelora" and self.p.stage == 1
            payload[0] = self.policy.observe(stats, can_switch)
        tdist.broadcast_object_list(payload, src=0)
        return payload[0]

    def _window_end(self) -> None:
        stats = self.window_stats()
        decision = self.decide(stats)
        loss = stats.loss
        self.p.windows_done += 1
        pc = self.cfg.prelora
        if self.dist.is_main:
            # Past the switch the norms are of the effective weights
            # W0 + s B A: what still moves once the base is frozen.
            what = "dW" if self.p.stage == 1 else "dW(eff)"
            dw = ", ".join(f"{m} {v:+.3f}%" for m, v in decision.dW.items())
            dl = f"{decision.dL:+.3f}%" if decision.dL is not None else "n/a"
            du = ""
            if decision.du:
                du = " | update " + ", ".join(f"{m} {v:.3f}%" for m, v in decision.du.items())
                if pc.criterion == "update":
                    du += f" (tau_update {pc.tau_update}%)"
            self.log.info(f"window {self.p.windows_done} [{stage_name(self.p.stage)}] "
                          f"step {self.p.global_step} loss {loss:.4f} | {what} {dw or 'n/a'} "
                          f"(tau {pc.tau}%) | dL {dl} (zeta {pc.zeta}%){du}")
            self.metrics.write("window", window=self.p.windows_done, step=self.p.global_step,
                               epoch=self.p.epoch, stage=self.p.stage, loss=loss,
                               dW=decision.dW, dL=decision.dL, du=decision.du or None,
                               tau=pc.tau, zeta=pc.zeta, criterion=pc.criterion,
                               tau_update=pc.tau_update, modules=self.tracker.module_names,
                               norms=stats.norms.tolist(),
                               base_norms=(stats.base_norms.tolist()
                                           if stats.base_norms is not None else None),
                               updates=(stats.updates.tolist()
                                        if stats.updates is not None else None),
                               energy_ranks=(stats.energy_ranks.tolist()
                                             if stats.energy_ranks is not None else None))
            self.metrics.scalars(self.p.global_step, {
                "window/loss": loss, "window/dL": decision.dL,
                **{f"window/dW/{m}": v for m, v in decision.dW.items()},
                **{f"window/update/{m}": v for m, v in decision.du.items()}})
        self.p.window_steps_done = 0
        self.p.window_loss_sum = 0.0
        self.p.window_loss_count = 0
        if decision.switch:
            self.rank_map = decision.rank_map
            self._switch(2 if pc.warmup_windows > 0 else 3, decision)
        elif self.p.stage == 2:
            self.p.stage2_windows += 1
            if self.p.stage2_windows >= pc.warmup_windows:
                self._switch(3, None)

    # --------------------------------------------------------------- stepping
    def _agree(self, local_nonfinite: bool) -> tuple[bool, bool]:
        """One small all-reduce: did any rank see a non-finite loss, or a stop signal?"""
        flags = torch.tensor([float(local_nonfinite),
                              float(self.stop is not None and self.stop.received is not None)],
                             device=self.device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Optional[float], bool]:
        """Forward, backward and (at an accumulation boundary) an optimizer step
        on one micro batch. Returns (loss or None if skipped, stop requested)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.precision != "fp32":
            x = x.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        logits = self.engine(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.optim.label_smoothing)
        value = float(loss.detach())
        nonfinite, stop = self._agree(not math.isfinite(value))
        if nonfinite:
            where = (f"non-finite loss at step {self.p.global_step} "
                     f"(epoch {self.p.epoch}, {stage_name(self.p.stage)})")
            if self.cfg.run.on_nonfinite_loss == "stop":
                raise NonFiniteLoss(where + "; the latest checkpoint is the last good state")
            self.p.skipped_steps += 1
            self.log.warn(where + f": step skipped ({self.p.skipped_steps} so far)")
            return None, stop
        if self.engine.is_gradient_accumulation_boundary():
            set_lr(self.engine, lr_at(self.cfg, self.p.global_step, self.total_steps))
        self.engine.backward(loss)
        self.engine.step()
        return value, stop

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1, top-5 (percent) and loss on the validation split, over all ranks."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        dtype = next(self.model.parameters()).dtype
        for x, y in self.loaders.val:
            x = x.to(self.device, dtype=dtype)
            y = y.to(self.device)
            logits = self.model(x).float()
            sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                  _accuracy(logits, y, 1), _accuracy(logits, y, 5), len(y)],
                                 dtype=torch.float64)
        self.model.train()
        sums = sums.to(self.device)
        tdist.all_reduce(sums)
        loss, c1, c5, n = sums.tolist()
        n = max(n, 1.0)
        return {"val_loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n}

    def save(self, tag: Optional[str] = None) -> Path:
        """Collective checkpoint of the current optimizer-step boundary."""
        tag = tag or f"step{self.p.global_step:08d}"
        path = ckpt.save(self.engine, self.cfg, self.dist.rank, tag, self.state_dict(),
                         self.p.stage, self.p.global_step, self.rank_map,
                         rank_state=self.rank_state_dict())
        self.log.info(f"checkpoint {path}")
        return path

    def train(self) -> int:
        """Run to the end (0) or to a walltime stop (EXIT_RESUBMIT)."""
        accum = self.cfg.deepspeed.grad_accum_steps
        self.model.train()
        t_run = time.perf_counter()
        while self.p.epoch < self.cfg.run.epochs and self.p.global_step < self.total_steps:
            self.loaders.train_sampler.set_epoch(self.p.epoch, start=self.p.samples_in_epoch)
            micro = 0
            for x, y in self.loaders.train:
                loss, stop = self.train_step(x, y)
                micro += 1
                self.p.samples_in_epoch += len(y)
                self._samples_since += len(y) * self.dist.world_size
                if loss is not None:
                    self.p.window_loss_sum += loss
                    self.p.window_loss_count += 1
                if micro % accum:
                    continue  # stop and count only at optimizer-step boundaries
                self._after_optimizer_step(loss)
                if stop:
                    return self._stop_for_walltime()
                if self.p.global_step >= self.total_steps:
                    break
            else:
                self._end_epoch()
                continue
            # Stopped by run.max_steps: the epoch still ends if its last step ran.
            if self.p.samples_in_epoch >= self.steps_per_epoch * self.cfg.deepspeed.micro_batch_size * accum:
                self._end_epoch()
        self._finish(time.perf_counter() - t_run)
        return 0

    def _after_optimizer_step(self, loss: Optional[float]) -> None:
        self.p.global_step += 1
        self.p.window_steps_done += 1
        cfg = self.cfg
        if self.log.bar_mode and loss is not None:
            self.log.progress(self.p.global_step, self.total_steps,
                              f"stage {self.p.stage} epoch {self.p.epoch}", loss=f"{loss:.4f}")
        if self.p.global_step % cfg.logging.interval_steps == 0 and self.dist.is_main:
            now = time.perf_counter()
            ips = self._samples_since / max(now - self._t_last, 1e-9)
            self._t_last, self._samples_since = now, 0
            lr = current_lr(self.engine)
            eta = (self.total_steps - self.p.global_step) * self.global_batch / max(ips, 1e-9)
            if not self.log.bar_mode:
                self.log.info(f"[{stage_name(self.p.stage)}] epoch {self.p.epoch} step "
                              f"{self.p.global_step}/{self.total_steps} loss "
                              f"{loss if loss is not None else float('nan'):.4f} lr {lr:.2e} "
                              f"{ips:.1f} img/s ETA {eta / 60:.1f} min")
            self.metrics.write("step", step=self.p.global_step, epoch=self.p.epoch,
                               stage=self.p.stage, loss=loss, lr=lr, images_per_s=ips)
            self.metrics.scalars(self.p.global_step, {
                "train/loss": loss, "train/lr": lr, "train/images_per_s": ips,
                "train/stage": self.p.stage,
                "train/trainable_params": self.trainable_count(),
                "train/peak_memory_bytes": peak_memory_bytes(self.device)})
        if cfg.prelora.window_steps != "epoch" and self.p.window_steps_done >= self.window_steps:
            self._window_end()
        if cfg.checkpoint.every_steps and self.p.global_step % cfg.checkpoint.every_steps == 0:
            self.save()

    def _end_epoch(self) -> None:
        cfg = self.cfg
        if cfg.prelora.window_steps == "epoch" and self.p.window_steps_done > 0:
            self._window_end()
        self.p.epoch += 1
        self.p.samples_in_epoch = 0
        if self.p.epoch % cfg.run.eval_every_epochs == 0 or self.p.epoch == cfg.run.epochs:
            self._evaluate_and_record()

    def _evaluate_and_record(self) -> None:
        cfg = self.cfg
        self._last_eval_step = self.p.global_step
        ev = self.evaluate()
        mem = peak_memory_bytes(self.device)
        self.log.info(f"epoch {self.p.epoch}/{cfg.run.epochs} [{stage_name(self.p.stage)}] "
                      f"val loss {ev['val_loss']:.4f} top1 {ev['top1']:.2f}% "
                      f"top5 {ev['top5']:.2f}%")
        row = {"epoch": self.p.epoch, "step": self.p.global_step, "stage": self.p.stage,
               **ev, "trainable_params": self.trainable_count(), "peak_memory_bytes": mem}
        self.metrics.write("epoch", **row)
        self.metrics.summary_row(row)
        self.metrics.scalars(self.p.global_step, {f"eval/{k}": v for k, v in ev.items()})

    def _stop_for_walltime(self) -> int:
        # Every rank gets here at the same step; agreeing on the signal gives
        # all of them the same exit code (Ctrl-C: 130, walltime: resubmit).
        name, code, then = StopSignal.outcome(self.stop.agree(self.device))
        self.log.info(f"stopping at step {self.p.global_step} on {name}: writing a checkpoint, "
                      f"exit code {code} {then}")
        self.save()
        self.metrics.write("stop", step=self.p.global_step, signal=name)
        return code

    def _finish(self, wall_s: float) -> None:
        if self._last_eval_step != self.p.global_step:
            self._evaluate_and_record()
        self.save(tag=f"step{self.p.global_step:08d}")
        self.metrics.write("end", step=self.p.global_step, epoch=self.p.epoch,
                           stage=self.p.stage, wall_s=wall_s,
                           trainable_params=self.trainable_count(),
                           params_total=self.params_total, skipped_steps=self.p.skipped_steps)
        self.log.info(f"done: {self.p.global_step} steps, {stage_name(self.p.stage)}, "
                      f"{wall_s:.1f} s")

    def _log_start(self, point) -> None:
        cfg = self.cfg
        ds = cfg.deepspeed
        self.log.info(
            f"mode {cfg.run.mode}, {self.dist.world_size} rank(s) on {self.device.type} "
            f"({self.dist.backend}), {self.precision}, ZeRO {ds.zero_stage}")
        self.log.info(
            f"global batch {self.global_batch} = {ds.micro_batch_size} micro x "
            f"{ds.grad_accum_steps} accum x {self.dist.world_size} ranks; "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps in all; window "
            f"{self.window_steps} steps")
        self.log.info(f"model {cfg.model.name}: {self.params_total:,} parameters, "
                      f"{self.trainable_count():,} trainable, {stage_name(self.p.stage)}")
        self.metrics.write("start", mode=cfg.run.mode, world_size=self.dist.world_size,
                           global_batch=self.global_batch, steps_per_epoch=self.steps_per_epoch,
                           total_steps=self.total_steps, window_steps=self.window_steps,
                           params_total=self.params_total,
                           trainable=self.trainable_count(), stage=self.p.stage,
                           resumed_from=str(point.path) if point else None,
                           resumed_step=self.p.global_step)

    def close(self) -> None:
        """Release the engine and files; safe to call twice."""
        self.log.close()
        self.metrics.close()
        if getattr(self, "engine", None) is not None:
            destroy_engine(self.engine)
            self.engine = None
