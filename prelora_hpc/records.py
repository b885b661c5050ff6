"""The records of ``metrics.jsonl`` as typed classes, one per ``kind``, and
the keys of a scaling row: the one schema the trainer writes and the
report, the comparison and the replay read.

A line of ``metrics.jsonl`` is ``{"kind": ..., "time": ..., **fields}``, the
fields in the order the classes declare them; non-finite floats are written
as strings (``"nan"``, ``"inf"``), which JSON has no number for.

Reading is lenient towards other versions: fields added after the first
release are optional with defaults, so older files parse; fields this
version does not know are kept in ``extra``, so an older reader still reads
a newer file. A line of an unknown ``kind``, or one that lacks a required
field, is an error that names it.

Imports nothing of the package: a foundation, beside ``config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union


def json_safe(v: Any) -> Any:
    """``v`` with every non-finite float (also inside dicts and lists)
    replaced by its string, ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _restore_floats(v: Any) -> Any:
    # The inverse of json_safe, applied only to fields typed as floats.
    if isinstance(v, str) and v in _NON_FINITE:
        return _NON_FINITE[v]
    if isinstance(v, dict):
        return {k: _restore_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_restore_floats(x) for x in v]
    return v


@dataclass(kw_only=True)
class Decision:
    """What the switch policy decided at a window end: rank 0's, broadcast
    to every rank; the trainer acts on it, the replay keeps one per window,
    and every ``window`` record of ``metrics.jsonl`` carries it."""

    switch: bool = False
    """Leave stage 1 now, with ``rank_map``."""
    rank_map: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    """Why, in words, when it switches."""
    dW: dict[str, float] = field(default_factory=dict)
    """Per module: layer-mean weight-norm change from the previous window,
    percent (empty at the first window)."""
    dL: Optional[float] = None
    """Loss change from the previous window, percent; None at the first window."""
    du: Optional[dict[str, float]] = None
    """Per module: layer-mean relative update ||W_t - W_t-1|| / ||W_t-1||,
    percent; None where not measured."""
    tested: bool = False
    """The criterion ran (k windows kept, min_windows reached, switch allowed)."""
    passed: bool = False
    max_abs_dW: Optional[float] = None
    """Largest |dW| over the modules and the kept windows, percent."""
    max_abs_dL: Optional[float] = None
    max_update: Optional[float] = None
    """Largest module-mean relative update over the last k - 1 windows, percent."""


@dataclass(kw_only=True)
class Record:
    """Fields every record has. Subclasses set ``kind``."""

    kind: ClassVar[str] = ""
    time: Optional[float] = None
    """Unix time in seconds when the line was written (filled by the writer)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of the line this version does not know (a newer writer's)."""

    def payload(self) -> dict[str, Any]:
        """The record's own fields, in declared order (not kind, time, extra)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("time", "extra")}

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one line: ``{"kind", "time", **fields, **extra}``,
        non-finite floats as strings."""
        return json_safe({"kind": self.kind, "time": self.time, **self.payload(), **self.extra})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        """The record of one parsed line of this class's kind; a missing
        required field raises ``ValueError`` naming it."""
        own = [f for f in dataclasses.fields(cls) if f.name not in ("time", "extra")]
        names = {f.name for f in own}
        required = [f.name for f in own
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"a {cls.kind!r} record lacks {missing}")
        values = {}
        for f in own:
            if f.name in d:
                # Annotations are strings here (postponed evaluation).
                v = d[f.name]
                values[f.name] = _restore_floats(v) if "float" in str(f.type) else v
        extra = {k: v for k, v in d.items() if k not in names and k not in ("kind", "time")}
        return cls(time=d.get("time"), extra=extra, **values)


@dataclass(kw_only=True)
class StartRecord(Record):
    """A (re)start of training: the run's geometry."""

    kind: ClassVar[str] = "start"
    mode: str
    """``full``, ``prelora`` or ``lora``."""
    world_size: int
    """Ranks."""
    global_batch: int
    """Images per optimizer step over all ranks."""
    steps_per_epoch: int
    """Optimizer steps per epoch."""
    total_steps: int
    """Optimizer steps the run is planned for."""
    window_steps: int
    """Optimizer steps per convergence window."""
    params_total: int
    """Parameters of the model (adapters not counted)."""
    trainable: int
    """Trainable parameters at this start."""
    stage: int
    """Stage the run (re)starts in (1, 2 or 3)."""
    resumed_from: Optional[str] = None
    """Checkpoint directory resumed from; None for a fresh start."""
    resumed_step: int = 0
    """Optimizer step the run (re)starts at."""


@dataclass(kw_only=True)
class StepRecord(Record):
    """One logging interval."""

    kind: ClassVar[str] = "step"
    step: int
    """Optimizer step at the interval's end."""
    epoch: int
    """Epoch the step is in (0-based)."""
    stage: int
    loss: Optional[float]
    """Training loss of the last step."""
    lr: float
    """Learning rate of the base parameters."""
    images_per_s: float
    """Training images per second over all ranks, over the interval
    (validation time left out)."""


@dataclass(kw_only=True)
class WindowRecord(Record, Decision):
    """One window end: the policy's ``Decision`` and what it saw."""

    kind: ClassVar[str] = "window"
    window: int
    """Window number, from 1."""
    step: int
    """Optimizer step at the window's end."""
    epoch: int
    stage: int
    """Stage during the window (the switch window is recorded in stage 1)."""
    loss: float
    """Mean training loss over the window, all ranks."""
    tau: float
    """The run's weight-norm threshold, percent."""
    zeta: float
    """The run's loss threshold, percent."""
    criterion: str = "norm"
    """The run's switch criterion, ``norm`` or ``update``."""
    tau_update: Optional[float] = None
    """The run's relative-update threshold, percent."""
    modules: list[str]
    """Tracked module names, the order of the rows below."""
    norms: list[list[float]]
    """[module][layer] Frobenius norm of the weight (the effective weight once adapted)."""
    base_norms: Optional[list[list[float]]] = None
    """[module][layer] Frobenius norm of the base weight alone, once adapters exist."""
    updates: Optional[list[list[float]]] = None
    """[module][layer] relative update from the previous window, percent."""
    energy_ranks: Optional[list[list[int]]] = None
    """[module][layer] energy rank of the window's update."""


@dataclass(kw_only=True)
class SwitchRecord(Record):
    """A stage change."""

    kind: ClassVar[str] = "switch"
    step: int
    """Optimizer step of the switch."""
    epoch: int
    stage: int
    """The stage switched to."""
    reason: str
    """Why, in words (the test's numbers, or the warm-up done)."""
    rank_map: dict[str, int]
    """LoRA rank per adapted layer, ``{"blocks.L.module": r}``."""
    trainable_before: int
    """Trainable parameters before the switch."""
    trainable_after: int
    """Trainable parameters after it."""
    trainable_pct: float
    """``trainable_after`` as percent of ``params_total``."""
    params_total: int


@dataclass(kw_only=True)
class EpochRecord(Record):
    """An evaluation (also the row of ``summary.csv``)."""

    kind: ClassVar[str] = "epoch"
    epoch: int
    """Epochs done."""
    step: int
    stage: int
    val_loss: float
    """Validation loss."""
    top1: float
    """Validation top-1 accuracy, percent."""
    top5: float
    """Validation top-5 accuracy, percent."""
    trainable_params: int
    peak_memory_bytes: int
    """Peak memory of rank 0 since the stage's engine was built, bytes."""


@dataclass(kw_only=True)
class EndRecord(Record):
    """Training finished."""

    kind: ClassVar[str] = "end"
    step: int
    epoch: int
    stage: int
    wall_s: float
    """Training-loop wall time of the last segment (since the last start), seconds."""
    trainable_params: int
    params_total: int
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient."""


@dataclass(kw_only=True)
class StopRecord(Record):
    """A stop on a signal (walltime, Ctrl-C), after the checkpoint."""

    kind: ClassVar[str] = "stop"
    step: int
    signal: str
    """The signal's name."""


RECORD_TYPES: dict[str, type[Record]] = {
    c.kind: c for c in (StartRecord, StepRecord, WindowRecord, SwitchRecord, EpochRecord,
                        EndRecord, StopRecord)}
"""Record class by ``kind``."""

AnyRecord = Union[StartRecord, StepRecord, WindowRecord, SwitchRecord, EpochRecord, EndRecord,
                  StopRecord]


def parse_record(d: dict[str, Any]) -> AnyRecord:
    """The typed record of one line's JSON object; ``ValueError`` for a
    missing or unknown ``kind`` or a missing required field."""
    if not isinstance(d, dict):
        raise ValueError(f"a record is a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown record kind {kind!r} (known: {sorted(RECORD_TYPES)})")
    return cls.from_json(d)


def read_records(run_dir: str | Path, kind: Optional[str] = None) -> list[AnyRecord]:
    """Every record of ``RUN_DIR/metrics.jsonl`` (optionally of one kind), in
    file order. A line that is not JSON or not a record raises ``ValueError``
    naming the file and line number; a missing file ``FileNotFoundError``."""
    if kind is not None and kind not in RECORD_TYPES:
        raise ValueError(f"unknown record kind {kind!r} (known: {sorted(RECORD_TYPES)})")
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = parse_record(json.loads(line))
            except ValueError as e:  # json.JSONDecodeError is one
                raise ValueError(f"{path}, line {n}: {e}") from None
            if kind is None or rec.kind == kind:
                out.append(rec)
    return out


# --------------------------------------------------------------------------- #
# Scaling rows (``prelora-bench`` writes them, ``prelora-report scaling`` reads)


@dataclass
class ScalingRow:
    """One measurement of throughput at one size, one ``*.json`` file."""

    stage: int
    """1 (full) or 3 (LoRA only)."""
    scaling: str
    """``weak`` (batch grows with the ranks) or ``strong`` (fixed batch)."""
    nodes: int
    gpus: int
    """Ranks (GPUs; CPU ranks in a CPU run)."""
    global_batch: int
    """Images per optimizer step over all ranks."""
    images_per_s: float
    """Images per second over all ranks."""
    images_per_s_per_gpu: float
    step_time_s: float
    """Seconds per optimizer step."""
    allreduce_bytes_per_step: int
    """Gradient bytes all-reduced per step."""
    peak_memory_bytes: int
    """Peak memory of rank 0, bytes."""
    device: str
    """Device name, e.g. ``A100-SXM4-40GB``."""

    def to_json(self) -> dict[str, Any]:
        """The row's JSON object, keys in ``SCALING_ROW_KEYS`` order."""
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, d: Any) -> "ScalingRow":
        """A checked row; ``ValueError`` naming missing keys or a bad value.
        Keys beyond ``SCALING_ROW_KEYS`` are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"a scaling row is a JSON object, got {type(d).__name__}")
        missing = [k for k in SCALING_ROW_KEYS if k not in d]
        if missing:
            raise ValueError(f"missing keys {missing}")
        row = cls(**{k: d[k] for k in SCALING_ROW_KEYS})
        if row.stage not in (1, 3) or row.scaling not in ("weak", "strong"):
            raise ValueError(f"stage must be 1 or 3 and scaling 'weak' or 'strong', got "
                             f"{row.stage!r}, {row.scaling!r}")
        if not row.gpus or row.gpus <= 0 or not row.images_per_s > 0:
            raise ValueError("gpus and images_per_s must be > 0")
        return row


SCALING_ROW_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ScalingRow))
"""Keys of a scaling row, in the order the bench writes them."""


@dataclass
class BenchRatios:
    """The side-by-side ratios of one ``prelora-bench`` result (None where
    the configurations compared were not measured). Every ratio is ours
    over the other, step times over step times unless the name says else."""

    step_time_ratio: Optional[float] = None
    """Stage 3 over stage 1, each timed in its own block."""
    step_time_ratio_interleaved: Optional[float] = None
    """Stage 3 over stage 1, stepped in turn (drift cannot bias it: quote this)."""
    compute_time_ratio: Optional[float] = None
    """Stage 3 over stage 1, compute (forward, backward, optimizer) only."""
    grad_bytes_ratio: Optional[float] = None
    allreduce_bytes_ratio: Optional[float] = None
    peak_memory_ratio: Optional[float] = None
    trainable_fraction: Optional[float] = None
    """Stage 3's trainable parameters over stage 1's."""
    optimizer_state_ratio: Optional[float] = None
    flop_ratio: Optional[float] = None
    """Stage 3's FLOPs per step over stage 1's (with the structural checks)."""
    stage3_over_floor: Optional[float] = None
    """Stage 3 over the floor (stage 3 without adapters' cost)."""
    stage3_over_floor_interleaved: Optional[float] = None
    stage3_above_floor_s: Optional[float] = None
    """Seconds per step stage 3 spends above the floor."""
    stage1_over_peer: Optional[float] = None
    """Ours over the DDP peer, stage 1."""
    stage1_over_peer_interleaved: Optional[float] = None
    stage1_compute_over_peer: Optional[float] = None
    stage3_over_peer: Optional[float] = None
    stage3_over_peer_interleaved: Optional[float] = None
    stage3_compute_over_peer: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

