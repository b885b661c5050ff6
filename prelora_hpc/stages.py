"""The stage machine: which stage a run is in, how the model is shaped for
it, and the rule that decides the switch.

- ``Stage``: 1 full, 2 full + LoRA, 3 LoRA only, with the names the logs use.
- ``shape_for_stage``: inject adapters and set ``requires_grad`` for a stage;
  the trainer, the bench and the exporter all shape models through it.
- ``SwitchPolicy``: window statistics in, ``Decision`` out. Pure: it keeps
  the last ``k`` windows and calls the algorithms of ``convergence``; it
  never communicates. The trainer feeds it on rank 0 with the all-reduced
  statistics and broadcasts the decision; the what-if replay feeds it the
  recorded windows. One rule, two callers.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

import numpy as np
import torch.nn as nn

from .convergence import (WindowHistory, assign_ranks, partial_convergence, update_convergence,
                          window_changes)
from .lora import freeze_base, inject_lora, lora_modules, unfreeze_all


class Stage(enum.IntEnum):
    """A PreLoRA training stage."""

    FULL = 1
    FULL_LORA = 2
    LORA = 3

    @property
    def display(self) -> str:
        """The name logs, reports and plots print, e.g. ``stage 3 (LoRA only)``."""
        return {1: "stage 1 (full)", 2: "stage 2 (full + LoRA)", 3: "stage 3 (LoRA only)"}[self]


def stage_name(stage: int) -> str:
    """``Stage(stage).display`` for a plain int (as records store it)."""
    return Stage(stage).display


def shape_for_stage(model: nn.Module, stage: int, rank_map: dict[str, int], cfg) -> nn.Module:
    """Give ``model`` the shape of ``stage``, in place, before an engine is built.

    Stage 1: every parameter trains. Stages 2 and 3: adapters of exactly
    ``rank_map``'s ranks are injected (once; an already adapted model keeps
    its adapters); stage 2 trains everything, stage 3 only the adapters and
    ``cfg.prelora.stage3_trainable``. Returns ``model``.
    """
    stage = Stage(stage)
    if stage >= Stage.FULL_LORA and rank_map and not lora_modules(model):
        inject_lora(model, rank_map, cfg.lora.alpha, cfg.lora.dropout)
    if stage == Stage.LORA:
        freeze_base(model, cfg.prelora.stage3_trainable)
    else:
        unfreeze_all(model)
    return model


@dataclass(frozen=True)
class SwitchParams:
    """The knobs of the switch decision (the ``prelora`` section of a config)."""

    tau: float
    """Weight-norm change threshold, percent per window (criterion 'norm')."""
    zeta: float
    """Loss change threshold, percent per window (both criteria)."""
    k: int
    """Windows the test looks at."""
    r_min: int
    """Smallest LoRA rank (power of two)."""
    r_max: int
    """Largest LoRA rank (power of two)."""
    min_windows: int = 0
    """Never switch before this many windows have completed."""
    criterion: str = "norm"
    """'norm' (Algorithm 1) or 'update' (relative update of the weights)."""
    tau_update: float = 1.0
    """Relative-update threshold, percent per window (criterion 'update')."""
    rank_rule: str = "norm"
    """'norm' (Algorithm 2) or 'energy' (share of the update's energy)."""
    energy: float = 0.9
    """Share of the last window's update energy a rank must hold ('energy')."""

    CRITERIA = ("norm", "update")
    RANK_RULES = ("norm", "energy")

    @classmethod
    def from_config(cls, cfg) -> "SwitchParams":
        """The values a run uses, from its resolved ``Config``."""
        p = cfg.prelora
        return cls(tau=p.tau, zeta=p.zeta, k=p.k, r_min=p.r_min, r_max=p.r_max,
                   min_windows=p.min_windows, criterion=p.criterion, tau_update=p.tau_update,
                   rank_rule=p.rank_rule, energy=p.energy)

    @property
    def needs_updates(self) -> bool:
        """True when the decision needs the update statistics (``UpdateTracker``)."""
        return self.criterion == "update" or self.rank_rule == "energy"

    @classmethod
    def parse(cls, text: str, base: "SwitchParams") -> "SwitchParams":
        """``"tau=0.5,zeta=5,k=4"`` (any subset of the fields) over ``base``.

        Raises ValueError naming the offending item for an unknown key, a
        repeated key or a value that is not of the right kind.
        """
        kinds = {f.name: {"float": float, "int": int, "str": str}[str(f.type)]
                 for f in fields(cls)}
        changes: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"replay: {item!r} is not key=value with key one of "
                                 f"{sorted(kinds)}")
            if key in changes:
                raise ValueError(f"replay: {key} given twice")
            try:
                changes[key] = kinds[key](value.strip())
            except ValueError:
                raise ValueError(f"replay: {key}={value.strip()!r} is not "
                                 f"{'a number' if kinds[key] is float else 'an integer'}") from None
        out = replace(base, **changes)
        out.check()
        return out

    def check(self) -> None:
        """Raise ValueError for values the trainer's config would reject."""
        for name in ("tau", "zeta", "tau_update"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"replay: {name} must be finite and >= 0, got {v}")
        if self.k < 2:
            raise ValueError(f"replay: k must be >= 2, got {self.k}")
        if self.min_windows < 0:
            raise ValueError(f"replay: min_windows must be >= 0, got {self.min_windows}")
        for name in ("r_min", "r_max"):
            r = getattr(self, name)
            if r <= 0 or r & (r - 1):
                raise ValueError(f"replay: {name} must be a power of two, got {r}")
        if self.r_min > self.r_max:
            raise ValueError(f"replay: r_min={self.r_min} > r_max={self.r_max}")
        if self.criterion not in self.CRITERIA:
            raise ValueError(f"replay: criterion must be one of {self.CRITERIA}, "
                             f"got {self.criterion!r}")
        if self.rank_rule not in self.RANK_RULES:
            raise ValueError(f"replay: rank_rule must be one of {self.RANK_RULES}, "
                             f"got {self.rank_rule!r}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"replay: energy must be in (0, 1], got {self.energy}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WindowStats:
    """What every rank measured at a window end, reduced over ranks.

    ``norms``: Frobenius norm of each tracked (effective) weight,
    [modules, layers]. ``loss``: the window's mean training loss over all
    ranks. ``updates``: relative update of each layer over the window,
    percent, [modules, layers], or None where not measured (first window,
    or a criterion that does not need it). ``energy_ranks``: each layer's
    energy rank, same shape, or None. ``base_norms``: the base weights'
    norms once adapters exist, for the record (the policy does not read it).
    """

    norms: Any
    loss: float
    updates: Optional[Any] = None
    energy_ranks: Optional[Any] = None
    base_norms: Optional[Any] = None


@dataclass
class Decision:
    """What the policy decided at a window end (rank 0's, broadcast to all)."""

    switch: bool
    rank_map: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    dW: dict[str, float] = field(default_factory=dict)
    """Last window's norm change per module, percent (None before 2 windows)."""
    dL: Optional[float] = None
    du: dict[str, float] = field(default_factory=dict)
    """Last window's mean relative update per module, percent (if measured)."""
    tested: bool = False
    """The criterion ran (k windows kept, min_windows reached, switch allowed)."""
    passed: bool = False
    max_abs_dW: Optional[float] = None
    """Largest |dW| over the modules and the kept windows, percent."""
    max_abs_dL: Optional[float] = None
    max_update: Optional[float] = None
    """Largest module-mean relative update over the last k - 1 windows, percent."""


class SwitchPolicy:
    """The switch decision, fed one window at a time. Pure; no collectives.

    ``observe(stats, can_switch)`` records the window and returns a
    ``Decision``: ``switch`` is True at the first window where switching is
    allowed (``can_switch``), ``k`` windows are kept, ``min_windows`` have
    been seen and the configured criterion passes; the rank map then comes
    from the configured rank rule.
    """

    def __init__(self, params: SwitchParams, modules: list[str], num_layers: int,
                 block_prefix: str = "blocks"):
        params.check()
        self.params = params
        self.history = WindowHistory(modules, num_layers, params.k, block_prefix)
        self._updates: deque[Optional[list[list[float]]]] = deque(maxlen=params.k)
        self._energy: Optional[list[list[int]]] = None

    @property
    def module_names(self) -> list[str]:
        return self.history.module_names

    def _update_means(self) -> Optional[dict[str, list[float]]]:
        """Module-mean relative updates of the last k - 1 windows, or None
        if any of them was not measured."""
        last = list(self._updates)[1:] if len(self._updates) == self.params.k else []
        if not last or any(u is None for u in last):
            return None
        n = self.history.num_layers
        return {a: [math.fsum(u[i]) / n for u in last] for i, a in enumerate(self.module_names)}

    def observe(self, stats: WindowStats, can_switch: bool) -> Decision:
        """Record one window and decide. ``can_switch``: the run may switch now
        (a prelora run in stage 1); other windows are recorded and reported."""
        p = self.params
        self.history.record(stats.norms, stats.loss)
        upd = None if stats.updates is None else np.asarray(stats.updates, dtype=np.float64).tolist()
        self._updates.append(upd)
        if stats.energy_ranks is not None:
            self._energy = np.asarray(stats.energy_ranks).astype(int).tolist()
        d = Decision(switch=False)
        wn, losses = self.history.history()
        if upd is not None:
            n = self.history.num_layers
            d.du = {a: math.fsum(upd[i]) / n for i, a in enumerate(self.module_names)}
        if len(losses) >= 2:
            dws, dls = window_changes(wn, losses)
            d.dW = {m: v[-1] for m, v in dws.items()}
            d.dL = dls[-1]
            d.max_abs_dW = max(abs(v) for vals in dws.values() for v in vals)
            d.max_abs_dL = max(abs(v) for v in dls)
        means = self._update_means()
        if means is not None:
            d.max_update = max(v for vals in means.values() for v in vals)
        if not can_switch or not self.history.ready or self.history.windows_seen < p.min_windows:
            return d
        d.tested = True
        if p.criterion == "norm":
            d.passed = partial_convergence(wn, losses, p.tau, p.zeta)
            why = (f"max |dW| {d.max_abs_dW:.3f}% <= tau {p.tau}%, "
                   f"max |dL| {d.max_abs_dL:.3f}% <= zeta {p.zeta}%")
        else:
            d.passed = means is not None and update_convergence(means, losses, p.tau_update,
                                                                 p.zeta)
            why = (f"max relative update {d.max_update or 0.0:.3f}% <= tau_update "
                   f"{p.tau_update}%, max |dL| {d.max_abs_dL:.3f}% <= zeta {p.zeta}%")
        if not d.passed:
            return d
        d.switch = True
        d.rank_map = self.history.rank_map(self._ranks())
        d.reason = (f"{'partial convergence' if p.criterion == 'norm' else 'update test'} over "
                    f"the last {len(losses)} windows: {why}")
        return d

    def _ranks(self) -> dict[str, list[int]]:
        p = self.params
        if p.rank_rule == "energy":
            if self._energy is None:
                raise ValueError("rank_rule 'energy' needs the energy ranks of the last window")
            return {a: list(self._energy[i]) for i, a in enumerate(self.module_names)}
        return assign_ranks(self.history.layer_changes(), p.r_min, p.r_max)

    def state_dict(self) -> dict:
        """The kept history (JSON-serialisable), for checkpoints."""
        return {"history": self.history.state_dict(), "updates": list(self._updates),
                "energy": self._energy}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; also accepts a bare ``WindowHistory``
        state (checkpoints written before update statistics existed)."""
        if "history" not in state:
            state = {"history": state, "updates": [], "energy": None}
        self.history.load_state_dict(state["history"])
        self._updates = deque(state["updates"], maxlen=self.params.k)
        self._energy = state["energy"]
