"""The stage machine: which stage a run is in, how the model is shaped for
it, and the rule that decides the switch.

- ``Stage``: 1 full, 2 full + LoRA, 3 LoRA only, with the names the logs use.
- ``StageMachine``: the run's stage, mode, rank map, warm-up count and
  switch step; turns each window's ``Decision`` into a ``Transition`` (or
  none). Pure and serialisable; the trainer executes what it returns.
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
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from .config import config_from_dict
from .records import Decision
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


def rank_histogram(rank_map: dict[str, int]) -> dict[int, int]:
    """How many layers got each rank, ranks ascending."""
    hist: dict[int, int] = {}
    for r in rank_map.values():
        hist[int(r)] = hist.get(int(r), 0) + 1
    return dict(sorted(hist.items()))


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
        repeated key or a value the run's config would refuse (the same
        rule: the ``prelora`` section's).
        """
        names = {f.name for f in fields(cls)}
        changes: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(f"replay: {item!r} is not key=value with key one of "
                                 f"{sorted(names)}")
            if key in changes:
                raise ValueError(f"replay: {key} given twice")
            changes[key] = value.strip()
        return cls.validated({**base.as_dict(), **changes}, "replay")

    @classmethod
    def validated(cls, values: dict[str, Any], source: str) -> "SwitchParams":
        """Parameters from raw ``values`` (numbers or their text), checked by
        the config's rules for the ``prelora`` section; ConfigError (a
        ValueError) names the key and ``source``."""
        cfg = config_from_dict({}, source, [f"prelora.{k}={v}" for k, v in values.items()])
        return cls.from_config(cfg)

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

    @staticmethod
    def pack(base_sumsq: torch.Tensor, eff_sumsq: torch.Tensor, loss: float,
             update_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One rank's share as one float64 buffer for a single SUM all-reduce.

        ``base_sumsq``, ``eff_sumsq``: squared Frobenius norms [modules,
        layers] of the base and effective weights (this rank's part under
        ZeRO-3). ``update_stats``: [3, modules, layers], the relative update
        (percent), energy rank and a 1 where this rank measured the layer
        (0 elsewhere), as ``UpdateTracker.local_stats`` gives them.
        """
        parts = [base_sumsq.flatten(), eff_sumsq.flatten()]
        if update_stats is not None:
            parts.append(update_stats.flatten())
        parts.append(torch.tensor([loss], dtype=torch.float64))
        return torch.cat([t.to(torch.float64) for t in parts])

    @classmethod
    def unpack(cls, buf: torch.Tensor, shape: tuple[int, int], world_size: int, *,
               sharded: bool, adapted: bool, with_updates: bool,
               with_energy: bool) -> "WindowStats":
        """The reduced statistics from ``pack``'s buffer summed over ranks.

        ``sharded``: every rank packed a slice of each weight (ZeRO-3), so
        the sums are whole norms; otherwise each rank packed all of it, so
        they are averaged. ``adapted``: adapters exist (``base_norms`` is
        then kept). Updates are reported only once every layer was measured.
        """
        buf = buf.cpu()
        n = shape[0] * shape[1]
        scale = 1.0 if sharded else 1.0 / world_size
        base = (buf[:n] * scale).view(shape).sqrt()
        stats = cls(norms=(buf[n:2 * n] * scale).view(shape).sqrt(),
                    loss=float(buf[-1]) / world_size, base_norms=base if adapted else None)
        if with_updates:
            u = buf[2 * n:5 * n].view(3, *shape)
            if bool((u[2] > 0).all()):
                stats.updates = u[0]
                if with_energy:
                    stats.energy_ranks = u[1].round().to(torch.int64)
        return stats


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


@dataclass(frozen=True)
class Transition:
    """A stage change the trainer executes: rebuild the engine for ``to``,
    say ``reason``, write the stage's first checkpoint."""

    to: Stage
    step: int
    """Optimizer step at which the change happens."""
    reason: str
    from_full: bool
    """The switch out of stage 1 (the rank map is new: log and write it)."""


class StageMachine:
    """Which stage a run is in and when it moves on. Pure; no collectives.

    Modes: ``full`` stays in stage 1; ``lora`` is in stage 3 from step 0
    with every layer at one rank; ``prelora`` starts in stage 1, switches
    when a window's ``Decision`` says so (to stage 2, or straight to 3 with
    no warm-up), and leaves stage 2 after ``warmup_windows`` windows.
    """

    MODES = ("full", "prelora", "lora")

    def __init__(self, mode: str, warmup_windows: int):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.warmup_windows = warmup_windows
        self.stage = Stage.FULL
        self.rank_map: dict[str, int] = {}
        self.switch_step: Optional[int] = None
        """Optimizer step at which the run left stage 1 (None before)."""
        self.stage2_windows = 0

    @classmethod
    def for_run(cls, mode: str, warmup_windows: int, layer_names: list[str],
                lora_rank: int) -> "StageMachine":
        """A run's machine at step 0 (``lora``: every layer at ``lora_rank``)."""
        m = cls(mode, warmup_windows)
        if mode == "lora":
            m.stage = Stage.LORA
            m.rank_map = {name: lora_rank for name in layer_names}
        return m

    @property
    def can_switch(self) -> bool:
        """The switch test may end stage 1 at this window."""
        return self.mode == "prelora" and self.stage == Stage.FULL

    def after_window(self, decision: Decision, step: int) -> Optional[Transition]:
        """Act on a window's ``decision`` at optimizer step ``step``: the
        transition to execute, or None."""
        if decision.switch:
            if not self.can_switch:
                raise ValueError(f"a switch decision in {self.stage.display} of a "
                                 f"{self.mode!r} run")
            self.rank_map = dict(decision.rank_map)
            self.switch_step = step
            self.stage = Stage.FULL_LORA if self.warmup_windows > 0 else Stage.LORA
            return Transition(self.stage, step, decision.reason, from_full=True)
        if self.stage != Stage.FULL_LORA:
            return None
        self.stage2_windows += 1
        if self.stage2_windows < self.warmup_windows:
            return None
        self.stage = Stage.LORA
        return Transition(Stage.LORA, step,
                          f"{self.stage2_windows} warm-up window(s) of stage 2 done",
                          from_full=False)

    def state_dict(self) -> dict:
        """JSON-serialisable state, for checkpoints."""
        return {"mode": self.mode, "stage": int(self.stage), "rank_map": dict(self.rank_map),
                "switch_step": self.switch_step, "stage2_windows": self.stage2_windows}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; the mode and warm-up length stay the run's
        config's (a resumed run may change neither its past nor its stage)."""
        self.stage = Stage(state["stage"])
        self.rank_map = {k: int(v) for k, v in state["rank_map"].items()}
        self.switch_step = state["switch_step"]
        self.stage2_windows = state["stage2_windows"]
