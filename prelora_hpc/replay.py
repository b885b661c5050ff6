"""What-if replay of the switch decision on a run's recorded window history.

A run's ``metrics.jsonl`` holds, for every window end, the per-module,
per-layer weight norms, the window's loss and (unless the run turned
``prelora.track_updates`` off) each layer's relative update and energy
rank: everything either criterion and either rank rule look at. ``replay``
feeds those windows, oldest first, through a ``SwitchPolicy``, the object
the trainer decides with, with knobs of your choice, and says at which
window the run would have switched and with which rank map.

    from prelora_hpc.replay import ReplayParams, replay
    from prelora_hpc.report.read import load_run
    run = load_run("runs/qs")            # typed records, each window once
    params = ReplayParams.parse("tau=0.5,k=4", ReplayParams.from_config(cfg))
    result = replay(run.windows, params, actual_switch=run.first_switch)

Only stage-1 windows can be replayed: after the actual switch the recorded
norms are those of the effective weights of an adapted model (base plus
adapters, the base frozen in stage 3), which is not what a run still in
stage 1 would have seen. A replay that does not pass within the stage-1 windows therefore
answers "no switch within the recorded stage-1 windows", never "later".

Everything here is a pure function of the records given; nothing reads
files or talks to other processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .records import SwitchRecord, WindowRecord
from .stages import Decision, SwitchParams, SwitchPolicy, WindowStats

#: The replay's knobs are the policy's (``prelora`` section of the config).
ReplayParams = SwitchParams


@dataclass
class WindowCheck:
    """The policy's ``Decision`` at one recorded window under the replayed
    parameters (the record the trainer acts on, with where it fell)."""

    window: int
    step: int
    decision: Decision


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


def stage1_windows(windows: list[WindowRecord]) -> list[WindowRecord]:
    """The stage-1 ``window`` records, by window number.

    The window at which the run switched is recorded in stage 1 (the record
    is written before the switch), so it is included.
    """
    return sorted((w for w in windows if w.stage == 1), key=lambda w: w.window)


def replay(windows: list[WindowRecord], params: ReplayParams,
           actual_switch: Optional[SwitchRecord] = None) -> ReplayResult:
    """Replay Algorithm 1 and 2 over the stage-1 ``window`` records.

    ``windows``: the run's ``WindowRecord`` s (any stages; deduplicated by
    window number). ``actual_switch``: the run's first ``SwitchRecord``, if
    it switched, for the side-by-side answer. The decision is made by a
    ``SwitchPolicy``, the object the trainer decides with: every window is
    recorded keeping the last k; once k are kept and at least
    ``min_windows`` have been seen, the criterion runs on them; the first
    pass switches with the rank rule's ranks. ``checks``
    covers every stage-1 window, also those after the replayed switch (the
    test's statistics as if the run had stayed in stage 1). The run's
    mode is not consulted: replaying a ``full`` run asks when it would have
    switched had it been a ``prelora`` run.
    """
    hist = stage1_windows(windows)
    result = ReplayResult(params=params, switched=False, stage1_windows=len(hist))
    if actual_switch is not None:
        result.actual_step = actual_switch.step
        result.actual_rank_map = dict(actual_switch.rank_map or {})
        at = [w.window for w in hist if w.step == actual_switch.step]
        result.actual_window = at[-1] if at else None
    if not hist:
        result.note = ("no stage-1 windows recorded (a 'lora' run, or a run that stopped "
                       "before its first window): nothing to replay")
        return result
    result.last_stage1_window = hist[-1].window
    modules = list(hist[0].modules)
    policy = SwitchPolicy(params, modules, len(hist[0].norms[0]))
    for w in hist:
        if list(w.modules) != modules:
            raise ValueError(f"window {w.window} tracks {w.modules}, window "
                             f"{hist[0].window} {modules}: not one run's history")
        # Records written before update statistics existed have None here.
        d = policy.observe(WindowStats(norms=w.norms, loss=w.loss, updates=w.updates,
                                       energy_ranks=w.energy_ranks),
                           can_switch=True)
        result.checks.append(WindowCheck(window=w.window, step=w.step, decision=d))
        if d.switch and not result.switched:
            result.switched = True
            result.window, result.step, result.epoch = w.window, w.step, w.epoch
            result.rank_map = d.rank_map
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
                f"at window {r.actual_window}, and the norms recorded after it are of an "
                f"adapted model (base plus adapters), so whether these "
                f"parameters would have switched later cannot be answered from this run")
    return f"no switch within the recorded stage-1 windows ({horizon}); the run never switched"
