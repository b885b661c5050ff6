"""Reading runs for the report and the comparison: a run directory's
records as a ``Run``, the numbers derived from them per stage, and the rows
of a scaling directory. Numbers only: nothing here imports matplotlib, so
tools that only read (``prelora-compare``'s table) stay light.

A resumed run appends to its ``metrics.jsonl``; ``load_run`` drops the
records a resume superseded, so every window, step and evaluation counts once.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..records import (EndRecord, EpochRecord, ScalingRow, StartRecord, StepRecord, StopRecord,
                       SwitchRecord, WindowRecord, read_records)


class ReportError(ValueError):
    """A run directory or scaling directory cannot be reported on."""


@dataclass
class Run:
    """The records of one run directory, each window/step/evaluation once."""

    path: Path
    name: str
    start: StartRecord
    """The first ``start`` record of the surviving history."""
    starts: list[StartRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    windows: list[WindowRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    switches: list[SwitchRecord] = field(default_factory=list)
    end: Optional[EndRecord] = None
    stops: list[StopRecord] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.starts[-1].mode

    @property
    def label(self) -> str:
        return f"{self.mode} ({self.name})"

    @property
    def steps_per_epoch(self) -> int:
        return int(self.start.steps_per_epoch)

    @property
    def global_batch(self) -> int:
        return int(self.start.global_batch)

    def epoch_of(self, step: float) -> float:
        """Fractional epoch at optimizer step ``step`` (x axis of every curve)."""
        return step / self.steps_per_epoch

    @property
    def first_switch(self) -> Optional[SwitchRecord]:
        """The switch out of stage 1 (to stage 2, or to 3 with no warm-up)."""
        return self.switches[0] if self.switches else None

    @property
    def switch_window(self) -> Optional[int]:
        """Window number at which the run left stage 1."""
        sw = self.first_switch
        if sw is None:
            return None
        at = [w.window for w in self.windows if w.step == sw.step and w.stage == 1]
        return at[-1] if at else None

    @property
    def rank_map(self) -> dict[str, int]:
        """The switch's rank map; ``rank_map.json`` if the records lack it."""
        sw = self.first_switch
        if sw is not None and sw.rank_map:
            return dict(sw.rank_map)
        path = self.path / "rank_map.json"
        if self.mode == "prelora" and path.exists():
            return json.loads(path.read_text())
        return {}

    @property
    def last_step(self) -> int:
        steps = [r.step for r in (*self.steps, *self.windows, *self.epochs)]
        if self.end is not None:
            steps.append(self.end.step)
        return max(steps, default=0)

    @property
    def final_eval(self) -> Optional[EpochRecord]:
        return self.epochs[-1] if self.epochs else None

    def _segments_before(self, t: float) -> float:
        """Seconds trained in the segments (one per start) that ended before
        time ``t``: each from its start to its last record."""
        total = 0.0
        stamps = [r.time for r in (*self.steps, *self.windows, *self.epochs, *self.stops)
                  if r.time is not None]
        for seg_start, nxt in zip(self.starts, self.starts[1:]):
            if seg_start.time is None or nxt.time is None or nxt.time > t:
                continue
            total += max([x for x in stamps if seg_start.time <= x < nxt.time],
                         default=seg_start.time) - seg_start.time
        return total

    def elapsed_s(self, record) -> Optional[float]:
        """Training seconds from the first start to when ``record`` was
        written: its segment's share plus every earlier segment's (a resumed
        run's time between a stop and the restart is not counted)."""
        if record.time is None or any(s.time is None for s in self.starts):
            return None
        own = [s for s in self.starts if s.time <= record.time]
        if not own:
            return None
        return self._segments_before(record.time) + record.time - own[-1].time

    @property
    def wall_s(self) -> Optional[float]:
        """Training wall time in seconds: the ``end`` record's, plus earlier
        segments of a resumed run measured from their record timestamps."""
        if self.end is None:
            return None
        # Each resume starts a new segment; the end record only covers the last.
        return float(self.end.wall_s) + self._segments_before(math.inf)


def load_run_config(run_dir: Path):
    """The run's ``config.yaml`` as a ``Config``; ``ReportError`` without one."""
    from ..config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ReportError(f"{run_dir}: no config.yaml (is this a run directory?)")
    return load_config(path)


def load_run(run_dir: str | Path, name: Optional[str] = None) -> Run:
    """Read ``RUN_DIR/metrics.jsonl`` into a ``Run``.

    A ``start`` record of a resumed run (``resumed_step`` s) supersedes every
    earlier record after step s; a fresh start in a reused directory
    supersedes everything before it. Of what remains, a later record for the
    same window (or step, or evaluation step) wins.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise ReportError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    kept: list = []
    for rec in read_records(run_dir):
        if isinstance(rec, StartRecord):
            if rec.resumed_from is None:
                kept = []
            else:
                cut = rec.resumed_step or 0
                kept = [r for r in kept if getattr(r, "step", -1) <= cut]
        kept.append(rec)
    starts = [r for r in kept if isinstance(r, StartRecord)]
    if not starts:
        raise ReportError(f"{run_dir}: metrics.jsonl has no 'start' record")

    def latest(cls: type, key) -> list:
        out: dict[Any, Any] = {}
        for r in kept:
            if isinstance(r, cls):
                out[key(r)] = r
        return sorted(out.values(), key=lambda r: (r.step, getattr(r, "window", 0)))

    ends = [r for r in kept if isinstance(r, EndRecord)]
    return Run(path=run_dir, name=name or run_dir.resolve().name, start=starts[0],
               starts=starts,
               steps=latest(StepRecord, lambda r: r.step),
               windows=latest(WindowRecord, lambda r: r.window),
               epochs=latest(EpochRecord, lambda r: r.step),
               switches=latest(SwitchRecord, lambda r: r.stage),
               end=ends[-1] if ends else None,
               stops=[r for r in kept if isinstance(r, StopRecord)])


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the directory name, or the path below the common
    parent where two names collide (seed0/full vs seed1/full)."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    return [str(p.resolve().relative_to(common)).replace(os.sep, "/") or p.name for p in paths]


def stage_spans(run: Run) -> list[tuple[int, float, float]]:
    """(stage, first epoch, last epoch) of each stage the run went through."""
    spans = []
    stage, x0 = run.start.stage, 0.0
    for sw in run.switches:
        x = run.epoch_of(sw.step)
        spans.append((stage, x0, x))
        stage, x0 = sw.stage, x
    spans.append((stage, x0, max(run.epoch_of(run.last_step), x0)))
    return [s for s in spans if s[2] > s[1] or len(spans) == 1]


def stage_stats(run: Run) -> dict[int, dict[str, Any]]:
    """Per stage: optimizer steps, images/s and step time (seconds) over the
    logging intervals (median: an interval holding an evaluation or an engine
    rebuild is slower than the steps themselves), peak memory (bytes),
    trainable parameters."""
    out: dict[int, dict[str, Any]] = {}

    def slot(stage: int) -> dict[str, Any]:
        return out.setdefault(stage, {"steps": 0, "images_per_s": [], "trainable_params": None,
                                      "peak_memory_bytes": None})

    slot(run.start.stage)["trainable_params"] = run.start.trainable
    bounds = [(run.start.stage, 0)] + [(sw.stage, sw.step) for sw in run.switches]
    for i, (stage, s0) in enumerate(bounds):
        s1 = bounds[i + 1][1] if i + 1 < len(bounds) else run.last_step
        slot(stage)["steps"] += max(0, s1 - s0)
    for sw in run.switches:
        slot(sw.stage)["trainable_params"] = sw.trainable_after
    for r in run.steps:
        if r.images_per_s and math.isfinite(r.images_per_s) and r.images_per_s > 0:
            slot(r.stage)["images_per_s"].append(float(r.images_per_s))
    for r in run.epochs:
        s = slot(r.stage)
        s["trainable_params"] = r.trainable_params
        s["peak_memory_bytes"] = max(s["peak_memory_bytes"] or 0, r.peak_memory_bytes)
    for s in out.values():
        ips = s.pop("images_per_s")
        s["intervals"] = len(ips)
        s["images_per_s_median"] = statistics.median(ips) if ips else None
        times = [run.global_batch / x for x in ips]
        s["step_time_s_median"] = statistics.median(times) if times else None
        s["step_time_s_mean"] = statistics.fmean(times) if times else None
        s["images_per_s_all"] = ips
    return dict(sorted(out.items()))


def stage_movement(run: Run) -> dict[int, dict[str, dict[str, Any]]]:
    """Per stage, per module: windows, mean |dW| and mean and last relative
    update (percent per window; None where the run did not measure it)."""
    acc: dict[int, dict[str, dict[str, list[float]]]] = {}
    for w in run.windows:
        by_module = acc.setdefault(w.stage, {})
        for m in w.modules:
            slot = by_module.setdefault(m, {"dW": [], "du": []})
            for key, values in (("dW", w.dW), ("du", w.du)):
                v = (values or {}).get(m)
                if v is not None:
                    slot[key].append(abs(v))
    return {stage: {m: {"windows": sum(1 for w in run.windows if w.stage == stage),
                        "dW": statistics.fmean(v["dW"]) if v["dW"] else None,
                        "du": statistics.fmean(v["du"]) if v["du"] else None,
                        "du_last": v["du"][-1] if v["du"] else None}
                    for m, v in by_module.items()}
            for stage, by_module in sorted(acc.items())}


def rank_matrix(rank_map: dict[str, int]) -> tuple[list[str], list[int], np.ndarray]:
    """(modules, layers, ranks[layer, module]) from ``{"blocks.L.module": r}``;
    NaN where a layer has no adapter on a module."""
    modules: list[str] = []
    cells = {}
    for name, r in rank_map.items():
        prefix, layer, module = name.split(".", 2)
        if module not in modules:
            modules.append(module)
        cells[(int(layer), module)] = int(r)
    layers = sorted({l for l, _ in cells})
    mat = np.full((len(layers), len(modules)), np.nan)
    for (l, m), r in cells.items():
        mat[layers.index(l), modules.index(m)] = r
    return modules, layers, mat


# --------------------------------------------------------------------------- #
# Scaling rows


def load_scaling_rows(directory: str | Path,
                      skipped: Optional[list[str]] = None) -> list[ScalingRow]:
    """Every scaling row in ``directory``: one JSON object per ``*.json``
    file, checked.

    A file is a row when its object has a ``scaling`` key; other JSON files
    (``scripts/scaling.sh`` keeps the bench's full results beside the rows)
    are passed over, their names appended to ``skipped``.
    """
    directory = Path(directory)
    rows = []
    for f in sorted(directory.glob("*.json")):
        try:
            obj = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{f}: not JSON ({e})") from None
        if not isinstance(obj, dict) or "scaling" not in obj:
            if skipped is not None:
                skipped.append(f.name)
            continue
        try:
            rows.append(ScalingRow.from_json(obj))
        except ValueError as e:
            raise ReportError(f"{f}: {e}") from None
    if not rows:
        raise ReportError(f"{directory}: no scaling rows (*.json objects with a 'scaling' key)")
    return rows


def scaling_efficiency(rows: list[ScalingRow]) -> list[dict[str, Any]]:
    """Rows grouped by (stage, scaling, gpus), repeats averaged, each with its
    efficiency against the smallest GPU count of its (stage, scaling) group.

    weak: (images/s per GPU at N) / (at N_min);
    strong: (images/s at N / at N_min) / (N / N_min).
    Each entry has the row's keys, ``repeats`` and ``efficiency``.
    """
    groups: dict[tuple, list[ScalingRow]] = {}
    for r in rows:
        groups.setdefault((r.stage, r.scaling, r.gpus), []).append(r)
    merged = []
    for (stage, scaling, gpus), rs in sorted(groups.items()):
        last = rs[-1]
        m: dict[str, Any] = {k: getattr(last, k) for k in ("stage", "scaling", "nodes", "gpus",
                                                            "global_batch", "device")}
        for k in ("images_per_s", "images_per_s_per_gpu", "step_time_s",
                  "allreduce_bytes_per_step", "peak_memory_bytes"):
            m[k] = statistics.fmean(float(getattr(r, k)) for r in rs)
        m["repeats"] = len(rs)
        merged.append(m)
    for m in merged:
        base = min((b for b in merged if (b["stage"], b["scaling"]) == (m["stage"], m["scaling"])),
                   key=lambda b: b["gpus"])
        if m["scaling"] == "weak":
            m["efficiency"] = m["images_per_s_per_gpu"] / base["images_per_s_per_gpu"]
        else:
            speedup = m["images_per_s"] / base["images_per_s"]
            m["efficiency"] = speedup / (m["gpus"] / base["gpus"])
    return merged
