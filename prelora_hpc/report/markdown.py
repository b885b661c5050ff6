"""The report's text: ``report.md`` of a run, ``runs.md`` of several,
``scaling.md``, and the plain-text answers the command prints (the replay,
the scaling table). Strings only: no plotting, no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..replay import ReplayResult
from ..stages import rank_histogram
from ..stages import stage_name
from .read import Run, stage_movement, stage_stats


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
    best = max(run.epochs, key=lambda r: r.top1) if run.epochs else None
    s = run.start
    rows = [
        ("mode", run.mode),
        ("ranks x global batch", f"{s.world_size} x {s.global_batch}"),
        ("optimizer steps", f"{run.last_step} of {s.total_steps} ({s.steps_per_epoch} per "
                            f"epoch), windows of {s.window_steps} steps"),
        ("final top-1 / top-5", "n/a" if ev is None else
         f"{ev.top1:.2f}% / {ev.top5:.2f}% (epoch {run.epoch_of(ev.step):.1f})"),
        ("best top-1", "n/a" if best is None else
         f"{best.top1:.2f}% (epoch {run.epoch_of(best.step):.1f})"),
        ("training wall time", _fmt(run.wall_s, ".1f", " s") if run.end else "not finished"),
        ("parameters", f"{s.params_total:,}"),
    ]
    if len(run.starts) > 1:
        rows.append(("resumed", f"{len(run.starts) - 1} time(s), at step(s) "
                     + ", ".join(str(r.resumed_step) for r in run.starts[1:])))
    for sw in run.switches:
        what = f"step {sw.step} (epoch {run.epoch_of(sw.step):.2f})"
        if sw is run.first_switch and run.switch_window is not None:
            what = f"window {run.switch_window}, " + what
        rows.append((f"to {stage_name(sw.stage)}", f"{what}: {sw.reason}"))
    if run.mode == "prelora" and not run.switches:
        rows.append(("switch", "none: the partial convergence test never passed"))
    lines = [f"# Run report: {run.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    lines += ["", "## Per stage", "",
              "| stage | steps | images/s (median) | step time (median) | trainable params "
              "| peak memory (rank 0) |", "|---|---:|---:|---:|---:|---:|"]
    for stage, st in stage_stats(run).items():
        lines.append(f"| {stage_name(stage)} | {st['steps']} | "
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
                lines.append(f"| {stage_name(stage)} | {m} | {mv['windows']} | "
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



def runs_markdown(runs: list[Run], plot: Optional[str]) -> str:
    """``runs.md``: one table row per run, then the top-1 plot ``plot``."""
    lines = ["# Runs", "", "| run | mode | final top-1 | final top-5 | switch (epoch) "
             "| training wall time |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        ev = r.final_eval
        sw = r.first_switch
        switch = "-" if sw is None else f"{r.epoch_of(sw.step):.2f}"
        lines.append(f"| {r.path} | {r.mode} | {_fmt(ev and ev.top1, '.2f', '%')} | "
                     f"{_fmt(ev and ev.top5, '.2f', '%')} | {switch} | "
                     f"{_fmt(r.wall_s, '.1f', ' s')} |")
    lines += [""]
    if plot:
        lines += [f"![top-1 against epoch]({plot})", ""]
    return "\n".join(lines)


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




def scaling_markdown(table: list[dict[str, Any]]) -> str:
    """``scaling.md``: the table of ``scaling_efficiency``, then the plot."""
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



def format_scaling_table(table: list[dict[str, Any]]) -> str:
    """The scaling table as fixed-width text (what the command prints)."""
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


