"""The report's plots, PNG files only (matplotlib's Agg backend: no display
on compute or CI nodes). Per run:

- ``curves.png``: training/validation loss and top-1/top-5 against epoch,
  the three stages shaded and the switch marked;
- ``convergence.png``: each module's weight-norm change per window against
  tau, and the loss change against zeta (what Algorithm 1 tests);
- ``rank_map.png``: the rank Algorithm 2 gave each layer and module;
- ``throughput.png``: images/s, peak memory and trainable parameters per stage.

And across runs: ``compare_top1.png`` (one line per run, a colour per arm),
``replay.png`` (a what-if replay) and ``scaling.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from ..replay import ReplayResult  # noqa: E402
from ..stages import Stage, stage_name  # noqa: E402
from .read import ReportError, Run, rank_matrix, stage_spans, stage_stats  # noqa: E402

STAGE_COLORS = {Stage.FULL: "#4c72b0", Stage.FULL_LORA: "#dd8452", Stage.LORA: "#55a868"}
MODE_COLORS = {"full": "#4c72b0", "prelora": "#c44e52", "lora": "#55a868"}
#: Colours for arms beyond the three modes (a ``--variant``), in order.
ARM_PALETTE = ["#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#dd8452"]
DPI = 100  # keeps every PNG well under 200 KB


def arm_colors(arms: list[str]) -> dict[str, str]:
    """One colour per distinct arm, in order of appearance: a mode's own
    colour for an arm named after it, otherwise the next unused one of
    ``ARM_PALETTE`` (cycling when there are more arms than colours)."""
    out: dict[str, str] = {}
    for arm in dict.fromkeys(arms):
        if arm in MODE_COLORS and MODE_COLORS[arm] not in out.values():
            out[arm] = MODE_COLORS[arm]
    free = [c for c in ARM_PALETTE if c not in out.values()] or ARM_PALETTE
    for i, arm in enumerate(a for a in dict.fromkeys(arms) if a not in out):
        out[arm] = free[i % len(free)]
    return {arm: out[arm] for arm in dict.fromkeys(arms)}


def _shade_stages(ax, run: Run, x_of=None, legend: bool = True) -> None:
    """Shade each stage's span and mark each switch with a dashed line."""
    for stage, x0, x1 in stage_spans(run):
        a, b = (x0, x1) if x_of is None else (x_of(x0), x_of(x1))
        ax.axvspan(a, b, color=STAGE_COLORS[stage], alpha=0.12, lw=0,
                   label=stage_name(stage) if legend else None)
    for sw in run.switches:
        x = run.epoch_of(sw.step) if x_of is None else x_of(run.epoch_of(sw.step))
        ax.axvline(x, color="0.3", ls="--", lw=1)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_curves(run: Run, path: Path) -> Path:
    """Loss and accuracy against epoch, stages shaded, switch marked."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    if run.windows:
        ax_l.plot([run.epoch_of(w.step) for w in run.windows], [w.loss for w in run.windows],
                  color="0.35", lw=1, label="train loss (window mean)")
    if run.epochs:
        ex = [run.epoch_of(r.step) for r in run.epochs]
        ax_l.plot(ex, [r.val_loss for r in run.epochs], "o-", color="#c44e52", ms=3,
                  label="val loss")
        ax_a.plot(ex, [r.top1 for r in run.epochs], "o-", color="#c44e52", ms=3, label="top-1")
        ax_a.plot(ex, [r.top5 for r in run.epochs], "s--", color="#8172b3", ms=3, lw=1,
                  label="top-5")
    _shade_stages(ax_l, run)
    _shade_stages(ax_a, run, legend=False)
    sw = run.first_switch
    if sw is not None:
        ax_a.annotate(f"switch\nwindow {run.switch_window}", xy=(run.epoch_of(sw.step), 2),
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
    has_du = any(w.du for w in run.windows)
    fig, axes = plt.subplots(3 if has_du else 2, 1, figsize=(9, 9 if has_du else 6.5),
                             sharex=True, constrained_layout=True)
    ax_w, ax_l = axes[0], axes[-1]
    xs = [w.window for w in run.windows]
    modules = run.windows[-1].modules
    for m in modules:
        ax_w.plot(xs, _positive([w.dW.get(m) for w in run.windows]), ".-", lw=1, ms=4, label=m)
    if has_du:
        ax_u = axes[1]
        for m in modules:
            ax_u.plot(xs, _positive([(w.du or {}).get(m) for w in run.windows]), ".-",
                      lw=1, ms=4, label=m)
        last = run.windows[-1]
        if last.criterion == "update":
            ax_u.axhline(last.tau_update, color="k", lw=1.5,
                         label=f"tau_update = {last.tau_update}%")
        ax_u.set(ylabel="||W_t - W_t-1|| / ||W_t-1|| (%)",
                 title="relative update per window (layer mean, effective weight)")
        ax_u.legend(fontsize=8, ncol=2)
    ax_l.plot(xs, _positive([w.dL for w in run.windows]), ".-", color="0.25", lw=1, ms=4,
              label="|dL|")
    tau, zeta = run.windows[-1].tau, run.windows[-1].zeta
    ax_w.axhline(tau, color="k", lw=1.5, label=f"tau = {tau}%")
    ax_l.axhline(zeta, color="k", lw=1.5, label=f"zeta = {zeta}%")
    by_stage: dict[int, list[int]] = {}
    for w in run.windows:
        by_stage.setdefault(w.stage, []).append(w.window)
    for ax in axes:
        ax.set_yscale("log")
        for stage, ws in by_stage.items():
            # A window is the span ending at its number: (w-1, w].
            ax.axvspan(min(ws) - 1, max(ws), color=STAGE_COLORS[stage], alpha=0.12, lw=0,
                       label=stage_name(stage) if ax is ax_w else None)
        if run.switch_window is not None:
            ax.axvline(run.switch_window, color="0.3", ls="--", lw=1)
    # Runs recorded before the effective weight was tracked show a frozen
    # base as exactly 0 in stage 3.
    frozen = [w.window for w in run.windows
              if w.stage == Stage.LORA and not any(w.dW.values())]
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
    # Two lines: three full stage names side by side overlap on one.
    names = [stage_name(s).replace(" (", "\n(") for s in stages]
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


def plot_runs_top1(runs: list[Run], path: Path, title: str = "validation top-1",
                   arms: Optional[list[str]] = None, x: str = "epoch") -> Path:
    """Top-1 against epoch (``x="epoch"``) or training seconds (``x="wall"``),
    one line per run, labelled by mode and directory; a marker where each run
    left stage 1.

    ``arms``: the arm of each run (default: its mode); each arm has its own
    colour (``arm_colors``), the runs of one arm (seeds) their own line style.
    """
    if x not in ("epoch", "wall"):
        raise ValueError(f"x must be 'epoch' or 'wall', got {x!r}")
    arms = [r.mode for r in runs] if arms is None else list(arms)
    if len(arms) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(arms)} arms")
    colors = arm_colors(arms)
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for run, arm in zip(runs, arms):
        pts = [(run.epoch_of(r.step) if x == "epoch" else run.elapsed_s(r), r.top1)
               for r in run.epochs]
        pts = [(a, b) for a, b in pts if a is not None]
        if not pts:
            continue
        n = seen[arm] = seen.get(arm, -1) + 1
        xs, ys = [a for a, _ in pts], [b for _, b in pts]
        line, = ax.plot(xs, ys, styles[n % len(styles)], marker="o", ms=3, lw=1.5,
                        color=colors[arm], label=run.label)
        sw = run.first_switch
        at = None if sw is None else (run.epoch_of(sw.step) if x == "epoch"
                                      else run.elapsed_s(sw))
        if at is not None:
            ax.plot([at], [np.interp(at, xs, ys)], marker="v", ms=9, color=line.get_color(),
                    ls="none")
    if any(r.first_switch for r in runs):
        ax.plot([], [], "v", color="0.3", ls="none", label="switch out of stage 1")
    tops = [r.top1 for run in runs for r in run.epochs]
    # The runs' own range: 0-100 would flatten a comparison at 38 % into a line.
    ylim = (max(0.0, min(tops) - 5), min(100.0, max(tops) + 5)) if tops else (0, 100)
    ax.set(xlabel="epoch" if x == "epoch" else "training time (s)", ylabel="top-1 (%)",
           ylim=ylim, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_tradeoff(arms: dict[str, dict[str, Any]], path: Path,
                  title: str = "the switch point's trade-off") -> Path:
    """Each arm of a comparison (``prelora-compare``'s summary entries, full
    training included) at its share of optimizer steps in stage 3: the
    paired top-1 difference to full (points, with its 95 % interval) on the
    left, the paired wall time / full on the right."""
    pts = sorted(((100 * (v.get("stage3_share") or 0.0), label, v) for label, v in arms.items()
                  if "paired_top1_minus_full" in v), key=lambda t: t[0])
    if not pts:
        raise ValueError("no arm has a paired difference to full training")
    colors = arm_colors([label for _, label, _ in pts])
    fig, (ax_a, ax_w) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for share, label, v in pts:
        d = v["paired_top1_minus_full"]
        err = None if d["ci95"] is None else [[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]]
        ax_a.errorbar([share], [d["mean"]], yerr=err, fmt="o", capsize=4, color=colors[label],
                      label=label)
        ax_w.plot([share], [v["paired_wall_vs_full"]], "o", color=colors[label], label=label)
    xs = [p[0] for p in pts]
    ax_a.plot(xs, [p[2]["paired_top1_minus_full"]["mean"] for p in pts], "-", color="0.6", lw=1)
    ax_w.plot(xs, [p[2]["paired_wall_vs_full"] for p in pts], "-", color="0.6", lw=1)
    ax_a.axhline(0.0, color="0.3", lw=0.8)
    ax_w.axhline(1.0, color="0.3", lw=0.8)
    ax_a.set(xlabel="optimizer steps in stage 3 (%)", ylabel="top-1 - full, paired (points)",
             title="accuracy (mean, 95 % interval over seeds)")
    ax_w.set(xlabel="optimizer steps in stage 3 (%)", ylabel="wall time / full",
             title="cost (mean of seed-by-seed ratios)")
    for ax in (ax_a, ax_w):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
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
    last = run.windows[-1] if run.windows else None
    run_tau, run_zeta = (last.tau, last.zeta) if last else (None, None)
    run_tau_update = last.tau_update if last and last.criterion == "update" else None
    first = ((ax_w, [c.decision.max_update for c in res.checks], p.tau_update, run_tau_update,
              "tau_update")
             if p.criterion == "update" else
             (ax_w, [c.decision.max_abs_dW for c in res.checks], p.tau, run_tau, "tau"))
    for ax, ys, thr, run_thr, name in (
            first, (ax_l, [c.decision.max_abs_dL for c in res.checks], p.zeta, run_zeta, "zeta")):
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


def plot_scaling(table: list[dict[str, Any]], path: Path) -> Path:
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
        ax.set(xlabel="GPUs (ranks on a CPU)", title=stage_name(stage))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("scaling efficiency")
    top = max([1.1] + [m["efficiency"] * 1.1 for m in table])
    axes[0].set_ylim(0, top)
    return _save(fig, path)


