"""Every line a run prints and every record it writes, in one place.

The trainer says what happened (a window ended, the stage switched, an
epoch was evaluated); ``RunLog`` turns it into the rank-0 log line, the
``metrics.jsonl`` record, the TensorBoard scalars and the ``summary.csv``
row. Rank 0 writes; the other ranks print warnings only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

from .config import Config
from .metrics import Log, MetricsWriter
from .records import (Decision, EndRecord, EpochRecord, StartRecord, StepRecord, StopRecord,
                      SwitchRecord, WindowRecord)
from .stages import Stage, WindowStats, rank_histogram, stage_name


def _listed(t) -> Optional[list]:
    return t.tolist() if t is not None else None


class RunLog:
    """The run's voice: ``Log`` for lines, ``MetricsWriter`` for records."""

    def __init__(self, cfg: Config, rank: int, out: Path):
        self.cfg = cfg
        self.is_main = rank == 0
        self.out = Path(out)
        self.log = Log(rank, cfg.logging.progress)
        self.metrics = MetricsWriter(self.out, self.is_main, cfg.logging.tensorboard)
        self._since, self._samples = time.perf_counter(), 0
        self._paused_s = 0.0

    @property
    def bar_mode(self) -> bool:
        return self.log.bar_mode

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warn(self, msg: str) -> None:
        self.log.warn(msg)

    # ------------------------------------------------------------ the run
    def start(self, dist, precision: str, global_batch: int, plan, params_total: int,
              trainable: int, stage: int, resumed_from, resumed_step: int) -> None:
        """The run's shape: mode, ranks, batch, steps, model size, stage.

        ``dist``: the rank's ``DistInfo``; ``plan``: the trainer's
        ``DataPlan``; ``resumed_from``: the resume point, or None.
        """
        cfg, ds = self.cfg, self.cfg.deepspeed
        world_size, device, backend = dist.world_size, dist.device, dist.backend
        accum, steps_per_epoch = plan.accum, plan.steps_per_epoch
        total_steps, window_steps = plan.total_steps, plan.window_steps
        resumed_from = None if resumed_from is None else str(resumed_from.path)
        self.info(f"mode {cfg.run.mode}, {world_size} rank(s) on {device.type} "
                  f"({backend}), {precision}, ZeRO {ds.zero_stage}")
        how = " (auto)" if ds.grad_accum_steps == "auto" else ""
        self.info(f"global batch {global_batch} = {ds.micro_batch_size} micro x "
                  f"{accum} accum{how} x {world_size} ranks; "
                  f"{steps_per_epoch} steps/epoch, {total_steps} steps in all; window "
                  f"{window_steps} steps")
        self.info(f"model {cfg.model.name}: {params_total:,} parameters, "
                  f"{trainable:,} trainable, {stage_name(stage)}")
        self.metrics.record(StartRecord(mode=cfg.run.mode, world_size=world_size,
                                        global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                                        total_steps=total_steps, window_steps=window_steps,
                                        params_total=params_total, trainable=trainable, stage=stage,
                                        resumed_from=resumed_from, resumed_step=resumed_step))

    def resumed(self, path, stage: int, step: int, epoch: int) -> None:
        self.info(f"resumed from {path} in {stage_name(stage)} at step {step} (epoch {epoch})")

    def progress(self, step: int, total: int, stage: int, epoch: int, loss: Optional[float]) -> None:
        """The terminal's progress bar (a no-op in batch jobs)."""
        if loss is not None:
            self.log.progress(step, total, f"stage {stage} epoch {epoch}", loss=f"{loss:.4f}")

    def not_training(self, seconds: float) -> None:
        """``seconds`` of the current interval spent off the training step
        (validation): left out of its images/s."""
        self._paused_s += seconds

    def count_samples(self, n: int) -> None:
        """``n`` more images trained (over all ranks), for the images/s figure."""
        self._samples += n

    def step(self, *, step: int, total: int, stage: int, epoch: int, loss: Optional[float],
             lr: float, global_batch: int, trainable: int, peak_memory_bytes: int) -> None:
        """Every ``logging.interval_steps`` optimizer steps (rank 0 calls it):
        training images/s since the last call (validation left out), and the
        time left at that rate."""
        now = time.perf_counter()
        ips = self._samples / max(now - self._since - self._paused_s, 1e-9)
        self._since, self._samples, self._paused_s = now, 0, 0.0
        eta_s = (total - step) * global_batch / max(ips, 1e-9)
        if not self.bar_mode:
            self.info(f"[{stage_name(stage)}] epoch {epoch} step {step}/{total} loss "
                      f"{loss if loss is not None else float('nan'):.4f} lr {lr:.2e} "
                      f"{ips:.1f} img/s ETA {eta_s / 60:.1f} min")
        self.metrics.record(StepRecord(step=step, epoch=epoch, stage=stage, loss=loss, lr=lr,
                                       images_per_s=ips))
        self.metrics.scalars(step, {
            "train/loss": loss, "train/lr": lr, "train/images_per_s": ips,
            "train/stage": stage, "train/trainable_params": trainable,
            "train/peak_memory_bytes": peak_memory_bytes})

    def window(self, *, window: int, step: int, epoch: int, stage: int, stats: WindowStats,
               decision: Decision, modules: list[str]) -> None:
        """A window's statistics and the policy's reading of them (rank 0 calls it)."""
        pc = self.cfg.prelora
        # Past the switch the norms are of the effective weights W0 + s B A:
        # what still moves once the base is frozen.
        what = "dW" if stage == Stage.FULL else "dW(eff)"
        dw = ", ".join(f"{m} {v:+.3f}%" for m, v in decision.dW.items())
        dl = f"{decision.dL:+.3f}%" if decision.dL is not None else "n/a"
        du = ""
        if decision.du:
            du = " | update " + ", ".join(f"{m} {v:.3f}%" for m, v in decision.du.items())
            if pc.criterion == "update":
                du += f" (tau_update {pc.tau_update}%)"
        self.info(f"window {window} [{stage_name(stage)}] step {step} loss {stats.loss:.4f} | "
                  f"{what} {dw or 'n/a'} (tau {pc.tau}%) | dL {dl} (zeta {pc.zeta}%){du}")
        self.metrics.record(WindowRecord(**dataclasses.asdict(decision), window=window, step=step,
                                         epoch=epoch, stage=stage, loss=stats.loss, tau=pc.tau,
                                         zeta=pc.zeta,
                                         criterion=pc.criterion, tau_update=pc.tau_update, modules=modules,
                                         norms=stats.norms.tolist(), base_norms=_listed(stats.base_norms),
                                         updates=_listed(stats.updates),
                                         energy_ranks=_listed(stats.energy_ranks)))
        self.metrics.scalars(step, {
            "window/loss": stats.loss, "window/dL": decision.dL,
            **{f"window/dW/{m}": v for m, v in decision.dW.items()},
            **{f"window/update/{m}": v for m, v in (decision.du or {}).items()}})

    def switch(self, *, step: int, epoch: int, stage: int, reason: str,
               rank_map: dict[str, int], before: int, after: int, params_total: int,
               carried: int, layers: dict[str, list[int]]) -> None:
        """A stage change: why, what it did to the trainable count, and (into
        stage 2) the rank map, also written to ``rank_map.json``. ``layers``:
        each module's ranks by block, for the log."""
        pct = 100.0 * after / params_total
        self.info(f"switch to {stage_name(stage)} at step {step}: {reason}")
        self.info(f"  trainable parameters {before:,} -> {after:,} "
                  f"({100.0 * before / params_total:.1f}% -> {pct:.1f}% of "
                  f"{params_total:,}); optimizer state carried for {carried} tensors")
        if layers:
            self.info(f"  rank map ({len(rank_map)} layers, rank: count) "
                      f"{rank_histogram(rank_map)}")
            for m, ranks in layers.items():
                self.info(f"    {m:<10} {ranks}")
            if self.is_main:
                (self.out / "rank_map.json").write_text(json.dumps(rank_map, indent=1))
        self.metrics.record(SwitchRecord(step=step, epoch=epoch, stage=stage, reason=reason,
                                         rank_map=rank_map, trainable_before=before, trainable_after=after,
                                         trainable_pct=pct, params_total=params_total))

    def epoch(self, *, epoch: int, epochs: int, step: int, stage: int, ev: dict[str, float],
              trainable: int, peak_memory_bytes: int) -> None:
        """An evaluated epoch: the line, the record, the summary row."""
        self.info(f"epoch {epoch}/{epochs} [{stage_name(stage)}] val loss {ev['val_loss']:.4f} "
                  f"top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}%")
        row: dict[str, Any] = {"epoch": epoch, "step": step, "stage": stage, **ev,
                               "trainable_params": trainable,
                               "peak_memory_bytes": peak_memory_bytes}
        self.metrics.record(EpochRecord(**row))
        self.metrics.summary_row(row)
        self.metrics.scalars(step, {f"eval/{k}": v for k, v in ev.items()})

    def stopping(self, *, step: int, signal: str, code: int, then: str) -> None:
        """A stop signal was agreed on; the checkpoint comes next."""
        self.info(f"stopping at step {step} on {signal}: writing a checkpoint, "
                  f"exit code {code} {then}")

    def stopped(self, *, step: int, signal: str) -> None:
        """The stop checkpoint is written: the record that ends this segment of the run."""
        self.metrics.record(StopRecord(step=step, signal=signal))

    def end(self, *, step: int, epoch: int, stage: int, wall_s: float, trainable: int,
            params_total: int, skipped_steps: int) -> None:
        self.metrics.record(EndRecord(step=step, epoch=epoch, stage=stage, wall_s=wall_s,
                                      trainable_params=trainable, params_total=params_total,
                                      skipped_steps=skipped_steps))
        self.info(f"done: {step} steps, {stage_name(stage)}, {wall_s:.1f} s")

    def close(self) -> None:
        self.log.close()
        self.metrics.close()
