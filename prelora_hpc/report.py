"""Plots and a short Markdown summary of finished (or running) runs.

    prelora-report runs/qs                                  # plots + report.md in runs/qs
    prelora-report runs/cmp/full runs/cmp/prelora runs/cmp/lora   # + compare_top1.png
    prelora-report runs/qs --replay tau=0.5,zeta=5,k=4      # what-if switch decision
    prelora-report scaling runs/scaling                     # scaling.png + scaling.md

Everything is read from the run directory: ``metrics.jsonl`` (the records the
trainer writes on rank 0) and ``config.yaml``. Plots per run:

- ``curves.png``: training/validation loss and top-1/top-5 against epoch,
  the three stages shaded and the switch marked;
- ``convergence.png``: each module's weight-norm change per window against
  tau, and the loss change against zeta (what Algorithm 1 tests);
- ``rank_map.png``: the rank Algorithm 2 gave each layer and module;
- ``throughput.png``: images/s, peak memory and trainable parameters per stage.

A resumed run appends to its ``metrics.jsonl``; ``load_run`` drops the
records a resume superseded, so every window, step and evaluation counts once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on compute or CI nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from .metrics import read_metrics  # noqa: E402
from .replay import ReplayParams, ReplayResult, rank_histogram, replay  # noqa: E402
from .stages import Stage  # noqa: E402

STAGE_COLORS = {1: "#4c72b0", 2: "#dd8452", 3: "#55a868"}
STAGE_LABELS = {int(s): s.display for s in Stage}
MODE_COLORS = {"full": "#4c72b0", "prelora": "#c44e52", "lora": "#55a868"}
DPI = 100  # keeps every PNG well under 200 KB


class ReportError(ValueError):
    """A run directory or scaling directory cannot be reported on."""


# --------------------------------------------------------------------------- #
# Reading a run


@dataclass
class Run:
    """The records of one run directory, each window/step/evaluation once."""

    path: Path
    name: str
    start: dict
    """The first ``start`` record of the surviving history."""
    starts: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    switches: list[dict] = field(default_factory=list)
    end: Optional[dict] = None
    stops: list[dict] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.starts[-1]["mode"]

    @property
    def label(self) -> str:
        return f"{self.mode} ({self.name})"

    @property
    def steps_per_epoch(self) -> int:
        return int(self.start["steps_per_epoch"])

    @property
    def global_batch(self) -> int:
        return int(self.start["global_batch"])

    def epoch_of(self, step: float) -> float:
        """Fractional epoch at optimizer step ``step`` (x axis of every curve)."""
        return step / self.steps_per_epoch

    @property
    def first_switch(self) -> Optional[dict]:
        """The switch out of stage 1 (to stage 2, or to 3 with no warm-up)."""
        return self.switches[0] if self.switches else None

    @property
    def switch_window(self) -> Optional[int]:
        """Window number at which the run left stage 1."""
        sw = self.first_switch
        if sw is None:
            return None
        at = [w["window"] for w in self.windows if w["step"] == sw["step"] and w["stage"] == 1]
        return at[-1] if at else None

    @property
    def rank_map(self) -> dict[str, int]:
        """The switch's rank map; ``rank_map.json`` if the records lack it."""
        sw = self.first_switch
        if sw is not None and sw.get("rank_map"):
            return dict(sw["rank_map"])
        path = self.path / "rank_map.json"
        if self.mode == "prelora" and path.exists():
            return json.loads(path.read_text())
        return {}

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in (*self.steps, *self.windows, *self.epochs)]
        if self.end is not None:
            steps.append(self.end["step"])
        return max(steps, default=0)

    @property
    def final_eval(self) -> Optional[dict]:
        return self.epochs[-1] if self.epochs else None

    @property
    def wall_s(self) -> Optional[float]:
        """Training wall time: the ``end`` record's, plus earlier segments of a
        resumed run measured from their record timestamps."""
        if self.end is None:
            return None
        total = float(self.end["wall_s"])
        # Each resume starts a new segment; the end record only covers the last.
        for seg_start, nxt in zip(self.starts, self.starts[1:]):
            stamps = [r["time"] for r in (*self.steps, *self.windows, *self.epochs, *self.stops)
                      if seg_start["time"] <= r.get("time", -1) < nxt["time"]]
            if stamps:
                total += max(stamps) - seg_start["time"]
        return total


def _config(run_dir: Path):
    from .config import load_config

    path = run_dir / "config.yaml"
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
    kept: list[dict] = []
    for rec in read_metrics(run_dir):
        if rec["kind"] == "start":
            if rec.get("resumed_from") is None:
                kept = []
            else:
                cut = rec.get("resumed_step") or 0
                kept = [r for r in kept if r.get("step", -1) <= cut]
        kept.append(rec)
    starts = [r for r in kept if r["kind"] == "start"]
    if not starts:
        raise ReportError(f"{run_dir}: metrics.jsonl has no 'start' record")

    def latest(kind: str, key) -> list[dict]:
        out: dict[Any, dict] = {}
        for r in kept:
            if r["kind"] == kind:
                out[key(r)] = r
        return sorted(out.values(), key=lambda r: (r["step"], r.get("window", 0)))

    ends = [r for r in kept if r["kind"] == "end"]
    return Run(path=run_dir, name=name or run_dir.resolve().name, start=starts[0],
               starts=starts,
               steps=latest("step", lambda r: r["step"]),
               windows=latest("window", lambda r: r["window"]),
               epochs=latest("epoch", lambda r: r["step"]),
               switches=latest("switch", lambda r: r["stage"]),
               end=ends[-1] if ends else None,
               stops=[r for r in kept if r["kind"] == "stop"])


def stage_spans(run: Run) -> list[tuple[int, float, float]]:
    """(stage, first epoch, last epoch) of each stage the run went through."""
    spans = []
    stage, x0 = run.start["stage"], 0.0
    for sw in run.switches:
        x = run.epoch_of(sw["step"])
        spans.append((stage, x0, x))
        stage, x0 = sw["stage"], x
    spans.append((stage, x0, max(run.epoch_of(run.last_step), x0)))
    return [s for s in spans if s[2] > s[1] or len(spans) == 1]


def stage_stats(run: Run) -> dict[int, dict[str, Any]]:
    """Per stage: optimizer steps, images/s and step time over the logging
    intervals (median: an interval holding an evaluation or an engine rebuild
    is slower than the steps themselves), peak memory, trainable parameters."""
    out: dict[int, dict[str, Any]] = {}

    def slot(stage: int) -> dict[str, Any]:
        return out.setdefault(stage, {"steps": 0, "images_per_s": [], "trainable_params": None,
                                      "peak_memory_bytes": None})

    slot(run.start["stage"])["trainable_params"] = run.start["trainable"]
    bounds = [(run.start["stage"], 0)] + [(sw["stage"], sw["step"]) for sw in run.switches]
    for i, (stage, s0) in enumerate(bounds):
        s1 = bounds[i + 1][1] if i + 1 < len(bounds) else run.last_step
        slot(stage)["steps"] += max(0, s1 - s0)
    for sw in run.switches:
        slot(sw["stage"])["trainable_params"] = sw["trainable_after"]
    for r in run.steps:
        if r.get("images_per_s") and math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0:
            slot(r["stage"])["images_per_s"].append(float(r["images_per_s"]))
    for r in run.epochs:
        s = slot(r["stage"])
        s["trainable_params"] = r["trainable_params"]
        s["peak_memory_bytes"] = max(s["peak_memory_bytes"] or 0, r["peak_memory_bytes"])
    for s in out.values():
        ips = s.pop("images_per_s")
        s["intervals"] = len(ips)
        s["images_per_s_median"] = statistics.median(ips) if ips else None
        times = [run.global_batch / x for x in ips]
        s["step_time_s_median"] = statistics.median(times) if times else None
        s["step_time_s_mean"] = statistics.fmean(times) if times else None
        s["images_per_s_all"] = ips
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- #
# Plots


def _shade_stages(ax, run: Run, x_of=None, legend: bool = True) -> None:
    """Shade each stage's span and mark each switch with a dashed line."""
    for stage, x0, x1 in stage_spans(run):
        a, b = (x0, x1) if x_of is None else (x_of(x0), x_of(x1))
        ax.axvspan(a, b, color=STAGE_COLORS[stage], alpha=0.12, lw=0,
                   label=STAGE_LABELS[stage] if legend else None)
    for sw in run.switches:
        x = run.epoch_of(sw["step"]) if x_of is None else x_of(run.epoch_of(sw["step"]))
        ax.axvline(x, color="0.3", ls="--", lw=1)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_curves(run: Run, path: Path) -> Path:
    """Loss and accuracy against epoch, stages shaded, switch marked."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    if run.windows:
        ax_l.plot([run.epoch_of(w["step"]) for w in run.windows], [w["loss"] for w in run.windows],
                  color="0.35", lw=1, label="train loss (window mean)")
    if run.epochs:
        ex = [run.epoch_of(r["step"]) for r in run.epochs]
        ax_l.plot(ex, [r["val_loss"] for r in run.epochs], "o-", color="#c44e52", ms=3,
                  label="val loss")
        ax_a.plot(ex, [r["top1"] for r in run.epochs], "o-", color="#c44e52", ms=3, label="top-1")
        ax_a.plot(ex, [r["top5"] for r in run.epochs], "s--", color="#8172b3", ms=3, lw=1,
                  label="top-5")
    _shade_stages(ax_l, run)
    _shade_stages(ax_a, run, legend=False)
    sw = run.first_switch
    if sw is not None:
        ax_a.annotate(f"switch\nwindow {run.switch_window}", xy=(run.epoch_of(sw["step"]), 2),
                      xytext=(4, 0), textcoords="offset points", fontsize=8, color="0.3")
    ax_l.set(xlabel="epoch", ylabel="loss", title=f"loss: {run.label}")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100),
             title=f"validation accuracy: {run.label}")
    ax_l.legend(fontsize=8)
    ax_a.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _positive(values: list[Optional[float]]) -> list[float]:
    # A log axis cannot show 0 (frozen weights in stage 3 do not move): NaN
    # leaves a gap instead of a fake value.
    return [abs(v) if v is not None and v != 0 else float("nan") for v in values]


def plot_convergence(run: Run, path: Path) -> Path:
    """Per-module |dW| per window against tau (the effective weight
    ``W0 + s B A`` once adapters exist), the relative update per module
    where the run measured it, and |dL| against zeta."""
    if not run.windows:
        raise ReportError(f"{run.path}: no window records to plot")
    has_du = any(w.get("du") for w in run.windows)
    fig, axes = plt.subplots(3 if has_du else 2, 1, figsize=(9, 9 if has_du else 6.5),
                             sharex=True, constrained_layout=True)
    ax_w, ax_l = axes[0], axes[-1]
    xs = [w["window"] for w in run.windows]
    modules = run.windows[-1]["modules"]
    for m in modules:
        ax_w.plot(xs, _positive([w["dW"].get(m) for w in run.windows]), ".-", lw=1, ms=4, label=m)
    if has_du:
        ax_u = axes[1]
        for m in modules:
            ax_u.plot(xs, _positive([(w.get("du") or {}).get(m) for w in run.windows]), ".-",
                      lw=1, ms=4, label=m)
        last = run.windows[-1]
        if last.get("criterion") == "update":
            ax_u.axhline(last["tau_update"], color="k", lw=1.5,
                         label=f"tau_update = {last['tau_update']}%")
        ax_u.set(ylabel="||W_t - W_t-1|| / ||W_t-1|| (%)",
                 title="relative update per window (layer mean, effective weight)")
        ax_u.legend(fontsize=8, ncol=2)
    ax_l.plot(xs, _positive([w["dL"] for w in run.windows]), ".-", color="0.25", lw=1, ms=4,
              label="|dL|")
    tau, zeta = run.windows[-1]["tau"], run.windows[-1]["zeta"]
    ax_w.axhline(tau, color="k", lw=1.5, label=f"tau = {tau}%")
    ax_l.axhline(zeta, color="k", lw=1.5, label=f"zeta = {zeta}%")
    by_stage: dict[int, list[int]] = {}
    for w in run.windows:
        by_stage.setdefault(w["stage"], []).append(w["window"])
    for ax in axes:
        ax.set_yscale("log")
        for stage, ws in by_stage.items():
            # A window is the span ending at its number: (w-1, w].
            ax.axvspan(min(ws) - 1, max(ws), color=STAGE_COLORS[stage], alpha=0.12, lw=0,
                       label=STAGE_LABELS[stage] if ax is ax_w else None)
        if run.switch_window is not None:
            ax.axvline(run.switch_window, color="0.3", ls="--", lw=1)
    # Runs recorded before the effective weight was tracked show a frozen
    # base as exactly 0 in stage 3.
    frozen = [w["window"] for w in run.windows
              if w["stage"] == 3 and not any(w["dW"].values())]
    if frozen:
        ax_w.text((min(frozen) - 1 + max(frozen)) / 2, tau,
                  "base frozen: dW = 0\n(not on a log axis)",
                  ha="center", va="bottom", fontsize=8, color="0.3")
    ax_w.set(ylabel="|dW| (% per window)",
             title=f"weight-norm change per module (layer mean; W0 + s B A once adapted): "
                   f"{run.label}")
    ax_l.set(xlabel="window" + (f" (switch at {run.switch_window})" if run.switch_window else ""),
             ylabel="|dL| (% per window)", title="training-loss change per window")
    ax_w.legend(fontsize=8, ncol=2)
    ax_l.legend(fontsize=8)
    return _save(fig, path)


def rank_matrix(rank_map: dict[str, int]) -> tuple[list[str], list[int], np.ndarray]:
    """(modules, layers, ranks[layer, module]) from ``{"blocks.L.module": r}``."""
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


def _draw_rank_map(ax, rank_map: dict[str, int], title: str, vmin: int, vmax: int):
    modules, layers, mat = rank_matrix(rank_map)
    img = ax.imshow(mat, cmap="viridis", norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin + 1)),
                    aspect="auto")
    for i in range(len(layers)):
        for j in range(len(modules)):
            if not np.isnan(mat[i, j]):
                r = int(mat[i, j])
                ax.text(j, i, str(r), ha="center", va="center", fontsize=9,
                        color="white" if r < math.sqrt(vmin * vmax) else "black")
    ax.set_xticks(range(len(modules)), modules, fontsize=8)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=8)
    ax.set(xlabel="module", ylabel="layer (block)", title=title)
    return img


def plot_rank_map(rank_map: dict[str, int], path: Path, title: str) -> Path:
    """Heatmap layer x module, each cell annotated with its rank."""
    if not rank_map:
        raise ReportError("empty rank map")
    ranks = sorted(set(rank_map.values()))
    _, layers, _ = rank_matrix(rank_map)
    fig, ax = plt.subplots(figsize=(6, 1.5 + 0.35 * len(layers)), constrained_layout=True)
    img = _draw_rank_map(ax, rank_map, title, ranks[0], ranks[-1])
    cb = fig.colorbar(img, ax=ax, label="LoRA rank")
    cb.set_ticks(ranks, labels=[str(r) for r in ranks])
    cb.minorticks_off()
    return _save(fig, path)


def plot_throughput(run: Run, path: Path) -> Path:
    """Images/s (box over logging intervals), peak memory and trainable
    parameters, per stage."""
    stats = stage_stats(run)
    stages = list(stats)
    names = [f"stage {s}" for s in stages]
    colors = [STAGE_COLORS[s] for s in stages]
    fig, (ax_t, ax_m, ax_p) = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
    data = [stats[s]["images_per_s_all"] or [float("nan")] for s in stages]
    box = ax_t.boxplot(data, tick_labels=names, patch_artist=True, widths=0.5)
    for patch, c in zip(box["boxes"], colors):
        patch.set(facecolor=c, alpha=0.5)
    for i, s in enumerate(stages):
        med = stats[s]["images_per_s_median"]
        if med is not None:
            ax_t.annotate(f"{med:.0f}", (i + 1, med), xytext=(18, 0), textcoords="offset points",
                          fontsize=8, va="center")
    ax_t.set(ylabel="images/s (all ranks)", title="throughput per logging interval")
    mem = [(stats[s]["peak_memory_bytes"] or 0) / 2**20 for s in stages]
    ax_m.bar(names, mem, color=colors, alpha=0.7)
    for i, v in enumerate(mem):
        ax_m.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax_m.set(ylabel="MiB (rank 0)", title="peak memory by the end of the stage")
    params = [stats[s]["trainable_params"] or 0 for s in stages]
    ax_p.bar(names, params, color=colors, alpha=0.7)
    for i, v in enumerate(params):
        ax_p.annotate(f"{v:,}", (i, v), ha="center", va="bottom", fontsize=8)
    ax_p.set(ylabel="parameters", title="trainable parameters")
    fig.suptitle(run.label, fontsize=10)
    return _save(fig, path)


def plot_runs_top1(runs: list[Run], path: Path, title: str = "validation top-1") -> Path:
    """Top-1 against epoch, one line per run, labelled by mode and directory;
    a marker where each run left stage 1."""
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for run in runs:
        if not run.epochs:
            continue
        n = seen[run.mode] = seen.get(run.mode, -1) + 1
        xs = [run.epoch_of(r["step"]) for r in run.epochs]
        ys = [r["top1"] for r in run.epochs]
        line, = ax.plot(xs, ys, styles[n % len(styles)], marker="o", ms=3, lw=1.5,
                        color=MODE_COLORS.get(run.mode), label=run.label)
        sw = run.first_switch
        if sw is not None:
            x = run.epoch_of(sw["step"])
            ax.plot([x], [np.interp(x, xs, ys)], marker="v", ms=9, color=line.get_color(),
                    ls="none")
    if any(r.first_switch for r in runs):
        ax.plot([], [], "v", color="0.3", ls="none", label="switch out of stage 1")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", ylim=(0, 100), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_replay(run: Run, res: ReplayResult, path: Path) -> Path:
    """The replayed test statistics against the thresholds, both switch
    points, and the actual and replayed rank maps side by side."""
    maps = [(m, t) for m, t in ((res.actual_rank_map, f"run: window {res.actual_window}"),
                               (res.rank_map, f"replay: window {res.window}")) if m]
    fig = plt.figure(figsize=(11, 7.5 if maps else 4), constrained_layout=True)
    grid = fig.add_gridspec(2 if maps else 1, 2, height_ratios=[1, 1.1] if maps else [1])
    ax_w, ax_l = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    xs = [c.window for c in res.checks]
    p = res.params
    last = run.windows[-1] if run.windows else {}
    run_tau, run_zeta = last.get("tau"), last.get("zeta")
    first = ((ax_w, [c.max_update for c in res.checks], p.tau_update,
              last.get("tau_update") if last.get("criterion") == "update" else None, "tau_update")
             if p.criterion == "update" else
             (ax_w, [c.max_abs_dW for c in res.checks], p.tau, run_tau, "tau"))
    for ax, ys, thr, run_thr, name in (
            first, (ax_l, [c.max_abs_dL for c in res.checks], p.zeta, run_zeta, "zeta")):
        ax.plot(xs, _positive(ys), ".-", color="0.3", lw=1, ms=4,
                label=f"max over the last {p.k} windows")
        ax.axhline(thr, color="#c44e52", lw=1.5, label=f"replay {name} = {thr}%")
        if run_thr is not None and run_thr != thr:
            ax.axhline(run_thr, color="k", lw=1, ls=":", label=f"run's {name} = {run_thr}%")
        if res.actual_window is not None:
            ax.axvline(res.actual_window, color="0.3", ls="--", lw=1,
                       label=f"run switched (window {res.actual_window})")
        if res.switched:
            ax.axvline(res.window, color="#c44e52", ls="-", lw=2, alpha=0.6,
                       label=f"replay switches (window {res.window})")
        ax.set_yscale("log")
        ax.set(xlabel="stage-1 window", ylabel={"tau": "|dW| (%)", "zeta": "|dL| (%)",
                                                "tau_update": "relative update (%)"}[name])
        ax.legend(fontsize=7)
    ax_w.set_title("relative update (update test)" if p.criterion == "update"
                   else "weight-norm change (Algorithm 1)", fontsize=10)
    ax_l.set_title("loss change", fontsize=10)
    if maps:
        ranks = sorted({r for m, _ in maps for r in m.values()})
        for j, (m, t) in enumerate(maps):
            _draw_rank_map(fig.add_subplot(grid[1, j]), m, t, ranks[0], ranks[-1])
    fig.suptitle(f"replay of {run.label}: " + ", ".join(f"{k}={v}" for k, v in p.as_dict().items()),
                 fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# Summaries


def stage_movement(run: Run) -> dict[int, dict[str, dict[str, Any]]]:
    """Per stage, per module: windows, mean |dW| and mean and last relative
    update (percent per window; None where the run did not measure it)."""
    acc: dict[int, dict[str, dict[str, list[float]]]] = {}
    for w in run.windows:
        by_module = acc.setdefault(w["stage"], {})
        for m in w["modules"]:
            slot = by_module.setdefault(m, {"dW": [], "du": []})
            for key in ("dW", "du"):
                v = (w.get(key) or {}).get(m)
                if v is not None:
                    slot[key].append(abs(v))
    return {stage: {m: {"windows": sum(1 for w in run.windows if w["stage"] == stage),
                        "dW": statistics.fmean(v["dW"]) if v["dW"] else None,
                        "du": statistics.fmean(v["du"]) if v["du"] else None,
                        "du_last": v["du"][-1] if v["du"] else None}
                    for m, v in by_module.items()}
            for stage, by_module in sorted(acc.items())}


def _fmt_bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _fmt(x: Optional[float], spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _cell(v: Any) -> str:
    # A switch reason quotes "|dW|": escaped, or it splits the table cell.
    return str(v).replace("|", "\\|")


def summary_markdown(run: Run, images: list[Path]) -> str:
    """``report.md`` of one run: the numbers people ask first, then the plots."""
    ev = run.final_eval
    best = max(run.epochs, key=lambda r: r["top1"]) if run.epochs else None
    s = run.start
    rows = [
        ("mode", run.mode),
        ("ranks x global batch", f"{s['world_size']} x {s['global_batch']}"),
        ("optimizer steps", f"{run.last_step} of {s['total_steps']} ({s['steps_per_epoch']} per "
                            f"epoch), windows of {s['window_steps']} steps"),
        ("final top-1 / top-5", "n/a" if ev is None else
         f"{ev['top1']:.2f}% / {ev['top5']:.2f}% (epoch {run.epoch_of(ev['step']):.1f})"),
        ("best top-1", "n/a" if best is None else
         f"{best['top1']:.2f}% (epoch {run.epoch_of(best['step']):.1f})"),
        ("training wall time", _fmt(run.wall_s, ".1f", " s") if run.end else "not finished"),
        ("parameters", f"{s['params_total']:,}"),
    ]
    if len(run.starts) > 1:
        rows.append(("resumed", f"{len(run.starts) - 1} time(s), at step(s) "
                     + ", ".join(str(r.get('resumed_step')) for r in run.starts[1:])))
    for sw in run.switches:
        what = f"step {sw['step']} (epoch {run.epoch_of(sw['step']):.2f})"
        if sw is run.first_switch and run.switch_window is not None:
            what = f"window {run.switch_window}, " + what
        rows.append((f"to stage {sw['stage']}", f"{what}: {sw['reason']}"))
    if run.mode == "prelora" and not run.switches:
        rows.append(("switch", "none: the partial convergence test never passed"))
    lines = [f"# Run report: {run.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    lines += ["", "## Per stage", "",
              "| stage | steps | images/s (median) | step time (median) | trainable params "
              "| peak memory (rank 0) |", "|---|---:|---:|---:|---:|---:|"]
    for stage, st in stage_stats(run).items():
        lines.append(f"| {STAGE_LABELS[stage]} | {st['steps']} | "
                     f"{_fmt(st['images_per_s_median'], '.1f')} | "
                     f"{_fmt(st['step_time_s_median'], '.3f', ' s')} | "
                     f"{_fmt(st['trainable_params'], ',')} | "
                     f"{_fmt_bytes(st['peak_memory_bytes'])} |")
    moves = stage_movement(run)
    if moves:
        lines += ["", "## What still moves", "",
                  "Per stage and module (layer mean), percent per window: the change of the "
                  "weight norm (|dW|) and the relative update ||W_t - W_t-1|| / ||W_t-1||, "
                  "both of the effective weight W0 + s B A once adapters exist.", "",
                  "| stage | module | windows | mean \\|dW\\| | mean update | last update |",
                  "|---|---|---:|---:|---:|---:|"]
        for stage, by_module in moves.items():
            for m, mv in by_module.items():
                lines.append(f"| {STAGE_LABELS[stage]} | {m} | {mv['windows']} | "
                             f"{_fmt(mv['dW'], '.3f')} | {_fmt(mv['du'], '.3f')} | "
                             f"{_fmt(mv['du_last'], '.3f')} |")
    rm = run.rank_map
    if rm:
        hist = ", ".join(f"r={r}: {n}" for r, n in rank_histogram(rm).items())
        lines += ["", "## Rank map", "", f"{len(rm)} adapted layers; layers per rank: {hist}."]
    elif run.mode == "lora":
        lines += ["", "## Rank map", "", "Mode `lora`: every layer has the configured "
                  "`lora.rank` from step 0."]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def write_run_report(run: Run, out: Path) -> list[Path]:
    """Every plot of one run plus ``report.md`` into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if run.epochs or run.windows:
        images.append(plot_curves(run, out / "curves.png"))
    if run.windows:
        images.append(plot_convergence(run, out / "convergence.png"))
    if run.rank_map:
        sw = run.first_switch
        where = "" if sw is None else f" (window {run.switch_window}, step {sw['step']})"
        images.append(plot_rank_map(run.rank_map, out / "rank_map.png", f"rank map{where}"))
    if run.steps or run.epochs:
        images.append(plot_throughput(run, out / "throughput.png"))
    md = out / "report.md"
    md.write_text(summary_markdown(run, images))
    return images + [md]


def write_multi_report(runs: list[Run], out: Path) -> list[Path]:
    """``compare_top1.png`` and ``runs.md`` (a table of the runs) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = plot_runs_top1(runs, out / "compare_top1.png")
    lines = ["# Runs", "", "| run | mode | final top-1 | final top-5 | switch (epoch) "
             "| training wall time |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        ev = r.final_eval
        sw = r.first_switch
        switch = "-" if sw is None else f"{r.epoch_of(sw['step']):.2f}"
        lines.append(f"| {r.path} | {r.mode} | {_fmt(ev and ev['top1'], '.2f', '%')} | "
                     f"{_fmt(ev and ev['top5'], '.2f', '%')} | {switch} | "
                     f"{_fmt(r.wall_s, '.1f', ' s')} |")
    lines += ["", f"![top-1 against epoch]({png.name})", ""]
    md = out / "runs.md"
    md.write_text("\n".join(lines))
    return [png, md]


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the directory name, or the path below the common
    parent where two names collide (seed0/full vs seed1/full)."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    return [str(p.resolve().relative_to(common)).replace(os.sep, "/") or p.name for p in paths]


# --------------------------------------------------------------------------- #
# Replay


def format_replay(run: Run, res: ReplayResult) -> str:
    """The replay's answer as text, beside what the run did."""
    p = res.params
    lines = [f"replay of {run.path} ({run.mode}): "
             + ", ".join(f"{k}={v}" for k, v in p.as_dict().items()),
             f"  stage-1 windows recorded: {res.stage1_windows}"]
    if res.actual_step is not None:
        lines.append(f"  the run:    switched at window {res.actual_window} "
                     f"(step {res.actual_step}, epoch {run.epoch_of(res.actual_step):.2f})")
    else:
        lines.append("  the run:    never switched")
    if res.switched:
        lines.append(f"  the replay: switches at window {res.window} "
                     f"(step {res.step}, epoch {run.epoch_of(res.step):.2f})")
    else:
        lines.append("  the replay: does not switch")
    lines.append(f"  {res.note}")
    modules = list(dict.fromkeys(name.split(".", 2)[2] for name in
                                 (res.rank_map or res.actual_rank_map)))
    for title, m in (("run", res.actual_rank_map), ("replay", res.rank_map)):
        if not m:
            continue
        lines.append(f"  rank map ({title}), layers per rank "
                     + ", ".join(f"r={r}: {n}" for r, n in rank_histogram(m).items()))
        for mod in modules:
            ranks = [m[k] for k in sorted((k for k in m if k.split(".", 2)[2] == mod),
                                          key=lambda k: int(k.split(".", 2)[1]))]
            lines.append(f"    {mod:<10} {ranks}")
    return "\n".join(lines)


def run_replay(run: Run, spec: str, out: Path) -> tuple[ReplayResult, list[Path]]:
    """Replay with ``spec`` (``"tau=..,zeta=.."``, missing keys from the run's
    config); writes ``replay.png`` and ``replay.json`` into ``out``."""
    base = ReplayParams.from_config(_config(run.path))
    params = ReplayParams.parse(spec, base)
    res = replay(run.windows, params, run.first_switch)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_replay(run, res, out / "replay.png")
    js = out / "replay.json"
    js.write_text(json.dumps({"run": str(run.path), "mode": run.mode, **res.as_dict()}, indent=1))
    return res, [png, js]


# --------------------------------------------------------------------------- #
# Scaling

SCALING_KEYS = ("stage", "scaling", "nodes", "gpus", "global_batch", "images_per_s",
                "images_per_s_per_gpu", "step_time_s", "allreduce_bytes_per_step",
                "peak_memory_bytes", "device")


def load_scaling_rows(directory: str | Path, skipped: Optional[list[str]] = None) -> list[dict]:
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
            row = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{f}: not JSON ({e})") from None
        if not isinstance(row, dict) or "scaling" not in row:
            if skipped is not None:
                skipped.append(f.name)
            continue
        missing = [k for k in SCALING_KEYS if k not in row]
        if missing:
            raise ReportError(f"{f}: missing keys {missing}")
        if row["stage"] not in (1, 3) or row["scaling"] not in ("weak", "strong"):
            raise ReportError(f"{f}: stage must be 1 or 3 and scaling 'weak' or 'strong', got "
                              f"{row['stage']!r}, {row['scaling']!r}")
        if not row["gpus"] or row["gpus"] <= 0 or not row["images_per_s"] > 0:
            raise ReportError(f"{f}: gpus and images_per_s must be > 0")
        rows.append({**row, "file": f.name})
    if not rows:
        raise ReportError(f"{directory}: no scaling rows (*.json objects with a 'scaling' key)")
    return rows


def scaling_efficiency(rows: list[dict]) -> list[dict]:
    """Rows grouped by (stage, scaling, gpus), repeats averaged, each with its
    efficiency against the smallest GPU count of its (stage, scaling) group.

    weak: (images/s per GPU at N) / (at N_min);
    strong: (images/s at N / at N_min) / (N / N_min).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["scaling"], r["gpus"]), []).append(r)
    merged = []
    for (stage, scaling, gpus), rs in sorted(groups.items()):
        m = {k: rs[-1][k] for k in ("stage", "scaling", "nodes", "gpus", "global_batch", "device")}
        for k in ("images_per_s", "images_per_s_per_gpu", "step_time_s",
                  "allreduce_bytes_per_step", "peak_memory_bytes"):
            m[k] = statistics.fmean(float(r[k]) for r in rs)
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


def scaling_markdown(table: list[dict]) -> str:
    head = ("| stage | scaling | nodes | GPUs | global batch | images/s | images/s/GPU | step time "
            "| all-reduce / step | peak memory | efficiency | device |")
    lines = ["# Scaling", "", head, "|" + "---|" * 2 + "---:|" * 9 + "---|"]
    for m in table:
        lines.append(
            f"| {m['stage']} | {m['scaling']} | {m['nodes']} | {m['gpus']} | {m['global_batch']} | "
            f"{m['images_per_s']:,.1f} | {m['images_per_s_per_gpu']:,.1f} | "
            f"{m['step_time_s']:.4f} s | {m['allreduce_bytes_per_step'] / 2**20:,.1f} MiB | "
            f"{m['peak_memory_bytes'] / 2**30:.2f} GiB | {m['efficiency']:.2f} | {m['device']} |")
    lines += ["", "Efficiency: weak = images/s per GPU at N / at the smallest N; "
              "strong = speedup / (N / smallest N).", "", "![scaling efficiency](scaling.png)", ""]
    return "\n".join(lines)


def plot_scaling(table: list[dict], path: Path) -> Path:
    """Efficiency against GPU count, stage 1 and stage 3 side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    for ax, stage in zip(axes, (1, 3)):
        for scaling, marker in (("weak", "o"), ("strong", "s")):
            pts = sorted((m["gpus"], m["efficiency"], m["nodes"]) for m in table
                         if m["stage"] == stage and m["scaling"] == scaling)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, lw=1.5,
                        label=f"{scaling} scaling")
                for g, e, n in pts:
                    ax.annotate(f"{n} node{'s' if n != 1 else ''}", (g, e), xytext=(0, 6),
                                textcoords="offset points", fontsize=7, ha="center")
        ax.axhline(1.0, color="0.5", ls=":", lw=1, label="ideal")
        gpus = sorted({m["gpus"] for m in table if m["stage"] == stage})
        if gpus:
            ax.set_xscale("log", base=2)
            ax.set_xticks(gpus, [str(g) for g in gpus])
            ax.minorticks_off()
        what = "full" if stage == 1 else "LoRA only"
        ax.set(xlabel="GPUs (ranks on a CPU)", title=f"stage {stage} ({what})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("scaling efficiency")
    top = max([1.1] + [m["efficiency"] * 1.1 for m in table])
    axes[0].set_ylim(0, top)
    return _save(fig, path)


def write_scaling_report(directory: Path, out: Path,
                         skipped: Optional[list[str]] = None) -> tuple[list[dict], list[Path]]:
    """``scaling.png`` and ``scaling.md`` from the rows in ``directory``."""
    table = scaling_efficiency(load_scaling_rows(directory, skipped))
    out.mkdir(parents=True, exist_ok=True)
    png = plot_scaling(table, out / "scaling.png")
    md = out / "scaling.md"
    md.write_text(scaling_markdown(table))
    return table, [png, md]


def format_scaling_table(table: list[dict]) -> str:
    head = (f"{'stage':>5} {'scaling':>7} {'nodes':>5} {'gpus':>5} {'batch':>6} {'img/s':>10} "
            f"{'img/s/gpu':>10} {'step s':>8} {'AR MiB':>8} {'mem GiB':>8} {'eff':>5}")
    rows = [head]
    for m in table:
        rows.append(f"{m['stage']:>5} {m['scaling']:>7} {m['nodes']:>5} {m['gpus']:>5} "
                    f"{m['global_batch']:>6} {m['images_per_s']:>10.1f} "
                    f"{m['images_per_s_per_gpu']:>10.1f} {m['step_time_s']:>8.4f} "
                    f"{m['allreduce_bytes_per_step'] / 2**20:>8.1f} "
                    f"{m['peak_memory_bytes'] / 2**30:>8.2f} {m['efficiency']:>5.2f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- #
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-report",
        description="Plots and a Markdown summary of run directories; a what-if replay of the "
                    "switch decision; 'prelora-report scaling DIR' for scaling rows.",
        epilog="examples: prelora-report runs/qs | prelora-report runs/a runs/b --out cmp | "
               "prelora-report runs/qs --replay tau=0.5,k=4 | prelora-report scaling runs/scaling")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path)
    p.add_argument("--out", type=Path,
                   help="output directory (default: the run directory; with several runs each "
                        "run's plots go to its own directory, or OUT/<name>, and the comparison "
                        "to OUT, default their common parent)")
    p.add_argument("--replay", metavar="tau=..,zeta=..,k=..,r_min=..,r_max=..",
                   help="replay the switch decision with these values (the rest from the run's "
                        "config) instead of writing the plots")
    return p


def _scaling_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prelora-report scaling",
                                description="Scaling table and efficiency plot from JSON rows.")
    p.add_argument("directory", type=Path, help="directory of *.json rows (scripts/scaling.sh)")
    p.add_argument("--out", type=Path, help="output directory (default: DIRECTORY)")
    args = p.parse_args(argv)
    skipped: list[str] = []
    table, paths = write_scaling_report(args.directory, args.out or args.directory, skipped)
    if skipped:
        print(f"not scaling rows, passed over: {', '.join(skipped)}", file=sys.stderr)
    print(format_scaling_table(table))
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-report``: 0 on success, 2 for a directory it cannot report on."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "scaling":
            return _scaling_main(argv[1:])
        args = _parser().parse_args(argv)
        labels = run_labels(args.run_dirs)
        runs = [load_run(d, name) for d, name in zip(args.run_dirs, labels)]
        several = len(runs) > 1

        def out_of(run: Run) -> Path:
            if args.out is None:
                return run.path
            return args.out / run.name if several else args.out

        if args.replay is not None:
            for run in runs:
                res, paths = run_replay(run, args.replay, out_of(run))
                print(format_replay(run, res))
                for path in paths:
                    print(f"wrote {path}")
            return 0
        for run in runs:
            for path in write_run_report(run, out_of(run)):
                print(f"wrote {path}")
        if several:
            out = args.out or Path(os.path.commonpath([str(r.path.resolve()) for r in runs]))
            for path in write_multi_report(runs, out):
                print(f"wrote {path}")
        return 0
    except (ReportError, ValueError, FileNotFoundError) as e:
        print(f"prelora-report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
