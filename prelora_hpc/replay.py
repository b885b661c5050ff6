"""What-if replay of the switch decision on a run's recorded window history.

A run's ``metrics.jsonl`` holds, for every window end, the per-module,
per-layer weight norms and the window's loss: everything Algorithm 1 and
Algorithm 2 look at. ``replay`` feeds those windows, oldest first, through
the same ``NormTracker`` and the same two functions the trainer uses, with
thresholds of your choice, and says at which window the run would have
switched and with which rank map.

    from prelora_hpc.replay import ReplayParams, replay
    params = ReplayParams.parse("tau=0.5,k=4", ReplayParams.from_config(cfg))
    result = replay(window_records, params, actual_switch=switch_record)

Only stage-1 windows can be replayed: after the actual switch the recorded
norms are those of base weights that train beside adapters (stage 2) and
then freeze (stage 3), which is not what a run still in stage 1 would have
seen. A replay that does not pass within the stage-1 windows therefore
answers "no switch within the recorded stage-1 windows", never "later".

Everything here is a pure function of the records given; nothing reads
files or talks to other processes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

import torch.nn as nn

from .convergence import NormTracker, assign_ranks, partial_convergence, window_changes


@dataclass(frozen=True)
class ReplayParams:
    """The knobs of the switch decision (``prelora`` section of the config)."""

    tau: float
    """Weight-norm change threshold, percent per window."""
    zeta: float
    """Loss change threshold, percent per window."""
    k: int
    """Windows the partial convergence test looks at."""
    r_min: int
    """Smallest LoRA rank (power of two)."""
    r_max: int
    """Largest LoRA rank (power of two)."""
    min_windows: int = 0
    """Never switch before this many windows have completed."""

    @classmethod
    def from_config(cls, cfg) -> "ReplayParams":
        """The values a run used, from its resolved ``Config``."""
        p = cfg.prelora
        return cls(tau=p.tau, zeta=p.zeta, k=p.k, r_min=p.r_min, r_max=p.r_max,
                   min_windows=p.min_windows)

    @classmethod
    def parse(cls, text: str, base: "ReplayParams") -> "ReplayParams":
        """``"tau=0.5,zeta=5,k=4"`` (any subset of the fields) over ``base``.

        Raises ValueError naming the offending item for an unknown key, a
        repeated key or a value that is not a number of the right kind.
        """
        kinds = {f.name: (float if f.type in (float, "float") else int) for f in fields(cls)}
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
        for name in ("tau", "zeta"):
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WindowCheck:
    """The test statistics at one window under the replayed parameters."""

    window: int
    step: int
    tested: bool
    """Algorithm 1 runs here (k windows kept and min_windows reached)."""
    passed: bool
    """Algorithm 1 passes here; the first such window is the switch."""
    max_abs_dW: Optional[float]
    """Largest |dW| (percent) over the modules and the last k windows."""
    max_abs_dL: Optional[float]
    """Largest |dL| (percent) over the last k windows."""


@dataclass
class ReplayResult:
    """When the replayed run would have switched, beside what the run did."""

    params: ReplayParams
    switched: bool
    window: Optional[int] = None
    step: Optional[int] = None
    epoch: Optional[int] = None
    rank_map: dict[str, int] = field(default_factory=dict)
    stage1_windows: int = 0
    """How many stage-1 windows the history holds (the replay's horizon)."""
    last_stage1_window: Optional[int] = None
    actual_window: Optional[int] = None
    actual_step: Optional[int] = None
    actual_rank_map: dict[str, int] = field(default_factory=dict)
    checks: list[WindowCheck] = field(default_factory=list)
    note: str = ""
    """One sentence saying what the answer means (notably for no switch)."""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = self.params.as_dict()
        return d


def stage1_windows(windows: list[dict]) -> list[dict]:
    """The stage-1 ``window`` records, by window number.

    The window at which the run switched is recorded in stage 1 (the record
    is written before the switch), so it is included.
    """
    return sorted((w for w in windows if w["stage"] == 1), key=lambda w: w["window"])


def _stand_in_model(modules: list[str], num_layers: int) -> nn.Module:
    """A module tree shaped like a timm ViT (``blocks.L.<module>`` with a weight).

    ``NormTracker`` insists on a model to find its layers in; replaying
    through the trainer's own tracker (rather than a copy of its averaging
    and bookkeeping) is what makes the replay agree with the run to the bit.
    """
    root = nn.Module()
    blocks = nn.ModuleList()
    for _ in range(num_layers):
        block = nn.Module()
        for name in modules:
            parent = block
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, nn.Linear(1, 1, bias=False))
        blocks.append(block)
    root.add_module("blocks", blocks)
    return root


def _window_stats(history: tuple[dict[str, list[float]], list[float]]
                  ) -> tuple[float, float]:
    d_norm, d_loss = window_changes(*history)
    return (max(abs(v) for vals in d_norm.values() for v in vals),
            max(abs(v) for v in d_loss))


def replay(windows: list[dict], params: ReplayParams,
           actual_switch: Optional[dict] = None) -> ReplayResult:
    """Replay Algorithm 1 and 2 over the stage-1 ``window`` records.

    ``windows``: the run's ``window`` records (any stages; deduplicated by
    window number). ``actual_switch``: the run's first ``switch`` record, if
    it switched, for the side-by-side answer. The decision rule is the
    trainer's (``Trainer._decide_on_rank0``): every window is recorded in a
    tracker keeping the last k; once k are kept and at least
    ``min_windows`` have been seen, Algorithm 1 runs on them; the first pass
    switches with Algorithm 2's ranks from the last two windows. ``checks``
    covers every stage-1 window, also those after the replayed switch (the
    test's statistics as if the run had stayed in stage 1). The run's
    mode is not consulted: replaying a ``full`` run asks when it would have
    switched had it been a ``prelora`` run.
    """
    params.check()
    hist = stage1_windows(windows)
    result = ReplayResult(params=params, switched=False, stage1_windows=len(hist))
    if actual_switch is not None:
        result.actual_step = actual_switch["step"]
        result.actual_rank_map = dict(actual_switch.get("rank_map") or {})
        at = [w["window"] for w in hist if w["step"] == actual_switch["step"]]
        result.actual_window = at[-1] if at else None
    if not hist:
        result.note = ("no stage-1 windows recorded (a 'lora' run, or a run that stopped "
                       "before its first window): nothing to replay")
        return result
    result.last_stage1_window = hist[-1]["window"]
    modules = list(hist[0]["modules"])
    num_layers = len(hist[0]["norms"][0])
    tracker = NormTracker(_stand_in_model(modules, num_layers), modules, params.k)
    for w in hist:
        if list(w["modules"]) != modules:
            raise ValueError(f"window {w['window']} tracks {w['modules']}, window "
                             f"{hist[0]['window']} {modules}: not one run's history")
        tracker.record(w["norms"], w["loss"])
        check = WindowCheck(window=w["window"], step=w["step"], tested=False, passed=False,
                            max_abs_dW=None, max_abs_dL=None)
        history = tracker.history()
        if len(history[1]) >= 2:
            check.max_abs_dW, check.max_abs_dL = _window_stats(history)
        result.checks.append(check)
        if not tracker.ready or tracker.windows_seen < params.min_windows:
            continue
        check.tested = True
        check.passed = partial_convergence(*history, params.tau, params.zeta)
        if check.passed and not result.switched:
            ranks = assign_ranks(tracker.layer_changes(), params.r_min, params.r_max)
            result.switched = True
            result.window, result.step, result.epoch = w["window"], w["step"], w["epoch"]
            result.rank_map = tracker.rank_map(ranks)
    result.note = _note(result)
    return result


def _note(r: ReplayResult) -> str:
    if r.switched:
        if r.actual_window is None:
            return f"would switch at window {r.window} (step {r.step}); the run never switched"
        if r.window == r.actual_window:
            same = "the same" if r.rank_map == r.actual_rank_map else "a different"
            return f"would switch at the same window as the run ({r.window}), with {same} rank map"
        return (f"would switch at window {r.window} (step {r.step}), "
                f"{r.actual_window - r.window} window(s) before the run did")
    horizon = f"windows 1..{r.last_stage1_window}" if r.last_stage1_window else "no windows"
    if r.actual_window is not None:
        return (f"no switch within the recorded stage-1 windows ({horizon}): the run switched "
                f"at window {r.actual_window}, and the norms recorded after it are of base "
                f"weights training beside adapters and then frozen, so whether these "
                f"parameters would have switched later cannot be answered from this run")
    return f"no switch within the recorded stage-1 windows ({horizon}); the run never switched"


def rank_histogram(rank_map: dict[str, int]) -> dict[int, int]:
    """How many layers got each rank, ranks ascending."""
    hist: dict[int, int] = {}
    for r in rank_map.values():
        hist[int(r)] = hist.get(int(r), 0) + 1
    return dict(sorted(hist.items()))
