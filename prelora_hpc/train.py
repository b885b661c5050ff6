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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config, dump_config
from .convergence import NormTracker, assign_ranks, partial_convergence, window_changes
from .data import build_dataloaders, prepare_data
from .engine import (build_engine, destroy_engine, extract_state, global_batch, lr_at,
                     restore_state, resolve_precision, _base_optimizer)
from .launch import EXIT_RESUBMIT, DistInfo, StopSignal
from .lora import freeze_base, inject_lora, lora_modules, unfreeze_all
from .metrics import Log, MetricsWriter, peak_memory_bytes, reset_peak_memory
from .model import build_model, count_parameters

STAGE_NAMES = {1: "stage 1 (full)", 2: "stage 2 (full + LoRA)", 3: "stage 3 (LoRA only)"}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


@dataclass
class Decision:
    """What rank 0 decided at a window end, broadcast to every rank."""

    switch: bool
    rank_map: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    dW: dict[str, float] = field(default_factory=dict)
    dL: Optional[float] = None


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
        self.p = Progress()
        self.rank_map: dict[str, int] = {}
        self.metrics = MetricsWriter(self.out, dist.is_main, cfg.logging.tensorboard)
        self._t_last = time.perf_counter()
        self._samples_since = 0
        self._last_eval_step = -1

        point = ckpt.find_resume(cfg, resume)
        if point is not None:
            self.p.stage = point.stage
            self.rank_map = point.rank_map
        elif cfg.run.mode == "lora":
            self.rank_map = {self.tracker.layer_name(m, l): cfg.lora.rank
                             for m in self.tracker.module_names
                             for l in range(self.tracker.num_layers)}
            self.p.stage = 3
        # Convert, then build: the model takes the shape of its stage before
        # DeepSpeed sees it.
        self._shape_model_for_stage()
        self.engine = build_engine(self.model, cfg, dist)
        if point is not None:
            client = ckpt.load(self.engine, point, dist.rank)
            self.load_state_dict(client)
            self.log.info(f"resumed from {point.path} in {STAGE_NAMES[self.p.stage]} at step "
                          f"{self.p.global_step} (epoch {self.p.epoch})")
        self._log_start(point)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The trainer's own progress (DeepSpeed saves weights and optimizer)."""
        return {"progress": vars(self.p).copy(), "rank_map": dict(self.rank_map),
                "tracker": self.tracker.state_dict(), "mode": self.cfg.run.mode}

    def load_state_dict(self, d: dict) -> None:
        self.p = Progress(**d["progress"])
        self.rank_map = dict(d["rank_map"])
        self.tracker.load_state_dict(d["tracker"])

    # ------------------------------------------------------------------ stages
    def _shape_model_for_stage(self) -> None:
        if self.p.stage >= 2 and self.rank_map and not lora_modules(self.model):
            inject_lora(self.model, self.rank_map, self.cfg.lora.alpha, self.cfg.lora.dropout)
        if self.p.stage == 3:
            freeze_base(self.model, self.cfg.prelora.stage3_trainable)
        else:
            unfreeze_all(self.model)
        self.model.to(self.device)

    def trainable_count(self) -> int:
        return count_parameters(self.model, trainable_only=True)

    def _rebuild(self, new_stage: int) -> None:
        before = self.trainable_count()
        carried = None if self.cfg.prelora.reset_optimizer else extract_state(self.engine, self.model)
        destroy_engine(self.engine)
        self.engine = None
        self.p.stage = new_stage
        self._shape_model_for_stage()
        reset_peak_memory(self.device)
        self.engine = build_engine(self.model, self.cfg, self.dist)
        restored = restore_state(self.engine, self.model, carried) if carried else 0
        after = self.trainable_count()
        return before, after, restored

    def _switch(self, new_stage: int, decision: Optional[Decision]) -> None:
        before, after, restored = self._rebuild(new_stage)
        if new_stage == 2:
            self.p.switch_step = self.p.global_step
        pct = 100.0 * after / self.params_total
        why = decision.reason if decision else (
            f"{self.p.stage2_windows} warm-up window(s) of stage 2 done")
        self.log.info(f"switch to {STAGE_NAMES[new_stage]} at step {self.p.global_step}: {why}")
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
    def _reduce_window_stats(self) -> tuple[torch.Tensor, float]:
        """All-reduce this window's norm statistics and mean loss over ranks.

        Returns per-module, per-layer Frobenius norms [modules, layers] and
        the mean training loss of the window over all ranks.
        """
        sumsq = self.tracker.local_sumsq(self.model)
        local_loss = self.p.window_loss_sum / max(1, self.p.window_loss_count)
        buf = torch.cat([sumsq.flatten(), torch.tensor([local_loss], dtype=torch.float64)])
        buf = buf.to(self.device)
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        buf = buf.cpu()
        n = sumsq.numel()
        # Replicated weights: every rank holds all of it, so average; ZeRO-3
        # partitions: each rank holds a slice, so the sum is the whole.
        sq = buf[:n] if self.tracker.sharded else buf[:n] / self.dist.world_size
        return sq.view_as(sumsq).sqrt(), float(buf[n]) / self.dist.world_size

    def decide(self, norms: torch.Tensor, loss: float) -> Decision:
        """Collective: rank 0 records the window and decides; all ranks
        return rank 0's decision. ``norms``/``loss`` on other ranks are ignored."""
        payload = [None]
        if self.dist.is_main:
            self.tracker.record(norms, loss)
            payload[0] = self._decide_on_rank0()
        tdist.broadcast_object_list(payload, src=0)
        return payload[0]

    def _decide_on_rank0(self) -> Decision:
        pc = self.cfg.prelora
        wn, losses = self.tracker.history()
        d = Decision(switch=False)
        if len(losses) >= 2:
            dws, dls = window_changes(wn, losses)
            d.dW = {m: v[-1] for m, v in dws.items()}
            d.dL = dls[-1]
        if self.cfg.run.mode != "prelora" or self.p.stage != 1:
            return d
        if not self.tracker.ready or self.tracker.windows_seen < pc.min_windows:
            return d
        if partial_convergence(wn, losses, pc.tau, pc.zeta):
            ranks = assign_ranks(self.tracker.layer_changes(), pc.r_min, pc.r_max)
            d.switch = True
            d.rank_map = self.tracker.rank_map(ranks)
            worst = max(abs(v) for vals in window_changes(wn, losses)[0].values() for v in vals)
            worst_l = max(abs(v) for v in window_changes(wn, losses)[1])
            d.reason = (f"partial convergence over the last {len(losses)} windows: "
                        f"max |dW| {worst:.3f}% <= tau {pc.tau}%, "
                        f"max |dL| {worst_l:.3f}% <= zeta {pc.zeta}%")
        return d

    def _window_end(self) -> None:
        norms, loss = self._reduce_window_stats()
        decision = self.decide(norms, loss)
        self.p.windows_done += 1
        pc = self.cfg.prelora
        if self.dist.is_main:
            dw = ", ".join(f"{m} {v:+.3f}%" for m, v in decision.dW.items())
            dl = f"{decision.dL:+.3f}%" if decision.dL is not None else "n/a"
            self.log.info(f"window {self.p.windows_done} [{STAGE_NAMES[self.p.stage]}] "
                          f"step {self.p.global_step} loss {loss:.4f} | dW {dw or 'n/a'} "
                          f"(tau {pc.tau}%) | dL {dl} (zeta {pc.zeta}%)")
            self.metrics.write("window", window=self.p.windows_done, step=self.p.global_step,
                               epoch=self.p.epoch, stage=self.p.stage, loss=loss,
                               dW=decision.dW, dL=decision.dL, tau=pc.tau, zeta=pc.zeta,
                               modules=self.tracker.module_names,
                               norms=norms.tolist())
            self.metrics.scalars(self.p.global_step, {
                "window/loss": loss, "window/dL": decision.dL,
                **{f"window/dW/{m}": v for m, v in decision.dW.items()}})
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

    def _set_lr(self) -> float:
        lr = lr_at(self.cfg, self.p.global_step, self.total_steps)
        for g in _base_optimizer(self.engine).param_groups:
            g["lr"] = lr
        return lr

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
                     f"(epoch {self.p.epoch}, {STAGE_NAMES[self.p.stage]})")
            if self.cfg.run.on_nonfinite_loss == "stop":
                raise NonFiniteLoss(where + "; the latest checkpoint is the last good state")
            self.p.skipped_steps += 1
            self.log.warn(where + f": step skipped ({self.p.skipped_steps} so far)")
            return None, stop
        if self.engine.is_gradient_accumulation_boundary():
            self._set_lr()
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
                         self.p.stage, self.p.global_step, self.rank_map)
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
            lr = _base_optimizer(self.engine).param_groups[0]["lr"]
            eta = (self.total_steps - self.p.global_step) * self.global_batch / max(ips, 1e-9)
            if not self.log.bar_mode:
                self.log.info(f"[{STAGE_NAMES[self.p.stage]}] epoch {self.p.epoch} step "
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
        self.log.info(f"epoch {self.p.epoch}/{cfg.run.epochs} [{STAGE_NAMES[self.p.stage]}] "
                      f"val loss {ev['val_loss']:.4f} top1 {ev['top1']:.2f}% "
                      f"top5 {ev['top5']:.2f}%")
        row = {"epoch": self.p.epoch, "step": self.p.global_step, "stage": self.p.stage,
               **ev, "trainable_params": self.trainable_count(), "peak_memory_bytes": mem}
        self.metrics.write("epoch", **row)
        self.metrics.summary_row(row)
        self.metrics.scalars(self.p.global_step, {f"eval/{k}": v for k, v in ev.items()})

    def _stop_for_walltime(self) -> int:
        name = self.stop.name if self.stop and self.stop.name else "a signal on another rank"
        self.log.info(f"stopping at step {self.p.global_step} on {name}: writing a checkpoint, "
                      f"exit code {EXIT_RESUBMIT} asks the job script to resubmit")
        self.save()
        self.metrics.write("stop", step=self.p.global_step, signal=name)
        return EXIT_RESUBMIT

    def _finish(self, wall_s: float) -> None:
        if self._last_eval_step != self.p.global_step:
            self._evaluate_and_record()
        self.save(tag=f"step{self.p.global_step:08d}")
        self.metrics.write("end", step=self.p.global_step, epoch=self.p.epoch,
                           stage=self.p.stage, wall_s=wall_s,
                           trainable_params=self.trainable_count(),
                           params_total=self.params_total, skipped_steps=self.p.skipped_steps)
        self.log.info(f"done: {self.p.global_step} steps, {STAGE_NAMES[self.p.stage]}, "
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
                      f"{self.trainable_count():,} trainable, {STAGE_NAMES[self.p.stage]}")
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
