"""What a run writes for people and tools: JSON lines, summary.csv and
TensorBoard scalars, all under the run directory, on rank 0 only.

``metrics.jsonl`` holds one object per line with a ``kind``: ``start``,
``step`` (every logging interval), ``window`` (every window end, with the
per-module, per-layer weight norms the convergence test saw), ``switch``
(a stage change, why, the rank map, trainable parameters before/after),
``epoch`` (evaluation) and ``end``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .records import Record, json_safe


class MetricsWriter:
    """Appends metrics records; a no-op on ranks other than 0.

    Appending (not truncating) keeps the history of a resumed run in one file.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def record(self, rec: Record) -> None:
        """One JSON line of ``rec`` (``records`` defines the layout), its
        ``time`` stamped now unless it has one."""
        if not self.enabled:
            return
        line = rec.to_json()
        if line["time"] is None:
            line["time"] = round(time.time(), 3)
        self._line(line)

    def _line(self, obj: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(json_safe(obj)) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars at optimizer step ``step``."""
        if self._tb is None:
            return
        for k, v in values.items():
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def summary_row(self, row: dict[str, Any]) -> None:
        """Append a row to ``summary.csv`` (header written with the first row)."""
        if not self.enabled:
            return
        path = self.run_dir / "summary.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Log:
    """Rank-0 progress; other ranks print warnings and errors only, prefixed
    with their rank.

    On a terminal (``logging.progress: auto`` or ``bar``) rank 0 shows a
    progress bar with stage, loss, images/s and ETA, and log lines scroll
    above it; in a batch job (output to a file) it prints plain lines every
    ``logging.interval_steps`` steps instead.
    """

    def __init__(self, rank: int, progress: str = "plain"):
        self.rank = rank
        self.bar_mode = rank == 0 and (
            progress == "bar" or (progress == "auto" and sys.stdout.isatty()))
        self._bar = None

    def info(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(f"[prelora] {msg}")
        else:
            print(f"[prelora] {msg}", flush=True)

    def progress(self, step: int, total: int, desc: str, **postfix) -> None:
        """Move the bar to optimizer step ``step`` of ``total`` (bar mode only)."""
        if not self.bar_mode:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
        self._bar.set_description(desc, refresh=False)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def warn(self, msg: str) -> None:
        print(f"[prelora rank {self.rank}] warning: {msg}", file=sys.stderr, flush=True)
