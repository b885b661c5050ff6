"""Train ``full``, ``prelora`` and ``lora`` with the same seed, data, schedule
and budget, then put their results in one table.

    prelora-compare --out runs/compare --seeds 0,1,2 run.epochs=30 model.img_size=16
    prelora-compare --modes full,prelora --variant update:prelora.criterion=update
    scripts/compare.sh                       # the settings of docs/results.md

A ``--variant LABEL:key=value,...`` is one more arm: a prelora run (unless
its overrides set ``run.mode``) with those overrides on top of the common
ones, e.g. another switch criterion. Each arm is compared with ``full``
seed by seed: the paired difference in top-1 (mean and 95 % interval over
seeds, Student's t), the share of optimizer steps spent in stage 3 and the
wall time relative to full.

For every seed and mode it runs

    mpiexec -n NP prelora-train --config CONFIG --output-dir OUT/seed<S>/<mode> \\
        OVERRIDES... run.mode=<mode> run.seed=<S>

(modes interleaved within a seed, so a slow spell on a shared machine hits
all three alike), then writes ``OUT/compare.md`` and ``OUT/compare.json``
(``--table`` renames them): final top-1/top-5 (mean and spread over seeds),
wall time, time to accuracy, median step time and trainable parameters per
stage, the switch epoch and the rank-map histogram; and
``OUT/compare_top1.png`` and ``OUT/compare_top1_wall.png`` (top-1 against
epoch and against training seconds, every run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .stages import rank_histogram
from .report.read import ReportError, Run, load_run, stage_stats

MODES = ("full", "prelora", "lora")
RESERVED = ("run.mode", "run.seed", "run.output_dir")
"""Overrides the comparison sets itself for every run."""

#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30);
#: beyond 30 the normal quantile is within 2 %.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Seed-by-seed ``a - b``: per-seed values, mean, sample standard
    deviation and the 95 % confidence interval of the mean (Student's t;
    None with a single seed)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"per_seed": d, "mean": mean, "std": None, "ci95": None}
    sd = statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"per_seed": d, "mean": mean, "std": sd, "ci95": [mean - half, mean + half]}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"update:prelora.criterion=update,prelora.tau_update=0.5"`` ->
    (label, overrides); the run mode is prelora unless the overrides set it."""
    label, sep, body = text.partition(":")
    label = label.strip()
    if not sep or not label or label in MODES or "/" in label:
        raise argparse.ArgumentTypeError(
            f"a variant is LABEL:key=value,... with a label other than {list(MODES)}, "
            f"got {text!r}")
    overrides = [o.strip() for o in body.split(",") if o.strip()]
    if any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(f"variant {label}: overrides must be key=value, "
                                         f"got {body!r}")
    bad = [o for o in overrides if o.split("=", 1)[0].strip() in ("run.seed", "run.output_dir")]
    if bad:
        raise argparse.ArgumentTypeError(f"variant {label}: {bad} are set per run")
    if not any(o.split("=", 1)[0].strip() == "run.mode" for o in overrides):
        overrides.insert(0, "run.mode=prelora")
    return label, overrides


class CompareError(RuntimeError):
    """A training run failed or the output directory is in the way."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a repeated or non-integer seed is an error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, "
                                         f"got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and at least one, got {text!r}")
    return seeds


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"modes must be distinct ones of {list(MODES)}, "
                                         f"got {text!r}")
    return modes


def _exe(name: str) -> str:
    # The console script beside this interpreter first: the venv's, even when
    # its bin/ is not on PATH.
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _finished(run_dir: Path) -> bool:
    try:
        return load_run(run_dir).end is not None
    except (ReportError, ValueError, KeyError, OSError):
        return False


def train_one(run_dir: Path, label: str, seed: int, args, overrides: list[str]) -> float:
    """Train one run of arm ``label`` to the end; returns the process wall
    time in seconds. ``overrides`` include the arm's ``run.mode``.

    Output (rank 0's progress, every rank's errors) goes to
    ``<run_dir>/train.log``.
    """
    if (run_dir / "metrics.jsonl").exists():
        if args.reuse and _finished(run_dir):
            print(f"[compare] {label} seed {seed}: reusing the finished run in {run_dir}",
                  flush=True)
            return float("nan")
        if not (args.overwrite or args.reuse):
            raise CompareError(f"{run_dir} already holds a run; pass --reuse to keep finished "
                               f"runs or --overwrite to train again")
        # A half-written run (or --overwrite): metrics.jsonl appends, so a
        # fresh run needs a clean directory.
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [*shlex.split(args.mpiexec), "-n", str(args.np), _exe("prelora-train"), "--config", str(args.config),
           "--output-dir", str(run_dir), *overrides, f"run.seed={seed}"]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per rank: NP ranks already fill the cores of a small machine,
    # and oversubscribed threads make the wall times noise.
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"[compare] {label} seed {seed}: {shlex.join(cmd)}", flush=True)
    log = run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise CompareError(f"{label} seed {seed}: no result within {args.timeout} s; "
                               f"see {log}") from None
    took = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise CompareError(f"{label} seed {seed}: prelora-train exited {p.returncode}; "
                           f"see {log}\n{tail}")
    print(f"[compare] {label} seed {seed}: done in {took:.1f} s", flush=True)
    return took


TTA_MARGIN = 1.0
"""Time to accuracy's target: full training's final top-1 minus this, points."""


def time_to_accuracy(run: Run, target: float) -> Optional[float]:
    """Training seconds until ``run``'s validation top-1 first reached
    ``target`` percent (an evaluation's record time from the first start,
    evaluations included, as MLPerf counts); None if it never did."""
    for ev in run.epochs:
        if ev.top1 >= target:
            return run.elapsed_s(ev)
    return None


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "per_seed": values}


def summarize(runs: dict[str, list[Run]], seeds: list[int],
              process_s: Optional[dict[str, list[float]]] = None) -> dict[str, dict]:
    """One entry per mode: ``top1``/``top5`` (mean of the final evaluation,
    percent), ``wall_s`` (mean training wall time), their spreads over
    seeds, per-stage step time and trainable parameters, the switch and the
    rank-map histogram summed over seeds.

    ``runs[mode][i]`` is the run of ``seeds[i]``; ``process_s`` the process
    wall times (NaN for a reused run), if measured.
    """
    out = {}
    for mode, rs in runs.items():
        finals = [r.final_eval for r in rs]
        if any(ev is None for ev in finals) or any(r.end is None for r in rs):
            raise CompareError(f"{mode}: a run has no final evaluation or did not finish")
        top1 = _spread([ev.top1 for ev in finals])
        top5 = _spread([ev.top5 for ev in finals])
        wall = _spread([r.wall_s for r in rs])
        per_stage: dict[int, dict[str, list]] = {}
        for r in rs:
            for stage, st in stage_stats(r).items():
                slot = per_stage.setdefault(stage, {"step_time_s": [], "images_per_s": [],
                                                    "trainable_params": [], "steps": []})
                if st["step_time_s_median"] is not None:
                    slot["step_time_s"].append(st["step_time_s_median"])
                    slot["images_per_s"].append(st["images_per_s_median"])
                slot["trainable_params"].append(st["trainable_params"])
                slot["steps"].append(st["steps"])
        stages = {str(s): {"step_time_s": _mean(v["step_time_s"]),
                           "images_per_s": _mean(v["images_per_s"]),
                           # Same model and stage: the same count for every seed.
                           "trainable_params": v["trainable_params"][0],
                           "steps": _mean(v["steps"])}
                  for s, v in sorted(per_stage.items())}
        switches = [r.first_switch for r in rs]
        switch_epochs = [r.epoch_of(sw.step) for r, sw in zip(rs, switches) if sw]
        hist: dict[int, int] = {}
        for r in rs:
            for rank, n in rank_histogram(r.rank_map).items():
                hist[rank] = hist.get(rank, 0) + n
        procs = [x for x in (process_s or {}).get(mode, []) if not math.isnan(x)]
        out[mode] = {
            "top1": top1["mean"], "top1_std": top1["std"], "top1_min": top1["min"],
            "top1_max": top1["max"], "top1_per_seed": top1["per_seed"],
            "top5": top5["mean"], "top5_std": top5["std"], "top5_per_seed": top5["per_seed"],
            "wall_s": wall["mean"], "wall_s_std": wall["std"], "wall_s_per_seed": wall["per_seed"],
            "process_s": _mean(procs),
            "seeds": list(seeds),
            "epochs": rs[0].epoch_of(rs[0].last_step),
            "params_total": rs[0].start.params_total,
            "stages": stages,
            "switch_epoch": statistics.fmean(switch_epochs) if switch_epochs else None,
            "switch_epoch_per_seed": [None if sw is None else r.epoch_of(sw.step)
                                      for r, sw in zip(rs, switches)],
            "switch_window_per_seed": [r.switch_window for r in rs],
            "rank_histogram": {str(k): v for k, v in sorted(hist.items())},
            "runs": [str(r.path) for r in rs],
        }
    for v in out.values():
        total = sum(st["steps"] for st in v["stages"].values())
        v["stage3_share"] = v["stages"].get("3", {}).get("steps", 0) / total if total else None
    if "full" in out:
        # Relative to full training, the question the comparison asks: seed
        # by seed, since the seed moves full training by about as much.
        base = out["full"]
        for v in out.values():
            v["top1_minus_full"] = v["top1"] - base["top1"]
            v["wall_vs_full"] = v["wall_s"] / base["wall_s"] if base["wall_s"] > 0 else None
            v["paired_top1_minus_full"] = paired_difference(v["top1_per_seed"],
                                                            base["top1_per_seed"])
            v["paired_wall_vs_full"] = statistics.fmean(
                w / f for w, f in zip(v["wall_s_per_seed"], base["wall_s_per_seed"]))
        # MLPerf-style: seconds to within TTA_MARGIN of the same seed's full run.
        targets = [t - TTA_MARGIN for t in base["top1_per_seed"]]
        for label, v in out.items():
            tta = [time_to_accuracy(r, t) for r, t in zip(runs[label], targets)]
            v["tta_target_per_seed"] = targets
            v["tta_s_per_seed"] = tta
            v["tta_reached"] = sum(x is not None for x in tta)
            v["tta_s"] = None if None in tta else statistics.fmean(tta)
        for v in out.values():
            pairs = [(a, b) for a, b in zip(v["tta_s_per_seed"], base["tta_s_per_seed"])
                     if a is not None and b]
            v["paired_tta_vs_full"] = (statistics.fmean(a / b for a, b in pairs)
                                       if v["tta_reached"] == len(seeds) and pairs else None)
    return out


def _pm(mean: float, std: float, n: int, spec: str = ".2f") -> str:
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if n > 1 else "")


def tta_cell(v: dict) -> str:
    """Mean seconds to the target over seeds, or how many seeds reached it."""
    n = len(v["tta_s_per_seed"])
    if v["tta_s"] is not None:
        return f"{v['tta_s']:.0f}"
    return f"not reached ({v['tta_reached']} of {n} seeds)"


def arms_title(labels: list[str]) -> str:
    """The arms compared, in order: ``"full vs prelora vs update"``."""
    return " vs ".join(labels)


def compare_markdown(summary: dict[str, dict], command: str, plots: tuple[str, ...] = ()) -> str:
    """``compare.md``: the table, what each column means, the command."""
    stages = sorted({s for v in summary.values() for s in v["stages"]})
    n = max(len(v["top1_per_seed"]) for v in summary.values())
    rel = all("top1_minus_full" in v for v in summary.values())
    head = (["arm", "top-1 (%)", "top-5 (%)", "wall time (s)"]
            + (["top-1 - full, paired (points, 95 % CI)", "wall time / full",
                f"time to full - {TTA_MARGIN:g} pt (s)", "time to accuracy / full"] if rel else [])
            + ["steps in stage 3"]
            + [f"step time stage {s} (s)" for s in stages]
            + [f"trainable params stage {s}" for s in stages]
            + ["switch (epoch)", "rank map histogram (rank: layers)"])
    lines = [f"# {arms_title(list(summary))}", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 2) + "|---|"]
    for mode, v in summary.items():
        st = v["stages"]
        cells = [mode, _pm(v["top1"], v["top1_std"], n), _pm(v["top5"], v["top5_std"], n),
                 _pm(v["wall_s"], v["wall_s_std"], n, ".1f")]
        if rel:
            pd = v["paired_top1_minus_full"]
            ci = "" if pd["ci95"] is None else f" [{pd['ci95'][0]:+.2f}, {pd['ci95'][1]:+.2f}]"
            cells += [f"{pd['mean']:+.2f}{ci}", f"{v['paired_wall_vs_full']:.3f}",
                      tta_cell(v), "-" if v["paired_tta_vs_full"] is None
                      else f"{v['paired_tta_vs_full']:.3f}"]
        cells.append("-" if v["stage3_share"] is None else f"{100 * v['stage3_share']:.0f} %")
        cells += ["-" if st.get(s, {}).get("step_time_s") is None
                  else f"{st[s]['step_time_s']:.3f}" for s in stages]
        cells += ["-" if s not in st else f"{st[s]['trainable_params']:,}" for s in stages]
        cells.append("-" if v["switch_epoch"] is None else ", ".join(
            "-" if e is None else f"{e:.2f}" for e in v["switch_epoch_per_seed"]))
        cells.append(", ".join(f"{k}: {c}" for k, c in v["rank_histogram"].items()) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = next(iter(summary.values()))["seeds"]
    lines += ["",
              f"Seeds {seeds}; top-1/top-5 at the final evaluation, mean ± sample standard "
              "deviation over seeds. Against full: the seed-by-seed difference in top-1, its "
              "mean and 95 % confidence interval (Student's t over seeds), and the mean of "
              "the seed-by-seed wall-time ratios. Steps in stage 3: the share of optimizer "
              "steps trained with the base frozen, mean over seeds. Wall "
              "time: the training loop (the `end` record's `wall_s`, without process "
              "start-up). Step time: median over the logging "
              "intervals of the stage (an interval holding an evaluation or an engine rebuild "
              "is slower), mean over seeds. Time to accuracy (MLPerf-style): training "
              f"seconds until validation top-1 first reached the same seed's full-training "
              f"final top-1 minus {TTA_MARGIN:g} point, evaluations included; its ratio is "
              "the mean of the seed-by-seed ratios. Switch: the epoch at which each seed's run left "
              "stage 1. Rank map histogram: layers per rank, summed over seeds.", "",
              "Command:", "", "```", command, "```", ""]
    for p, what in zip(plots, ("top-1 against epoch", "top-1 against training wall-clock time",
                               "steps in stage 3 against top-1 and wall time")):
        lines += [f"![{what}]({p})", ""]
    return "\n".join(lines)


def write_results(summary: dict[str, dict], runs: dict[str, list[Run]], labels: list[str],
                  out: Path, command: str, table: str = "compare") -> tuple[str, list[Path]]:
    """``TABLE_top1.png`` (against epoch), ``TABLE_top1_wall.png`` (against
    training seconds; a colour per arm), ``TABLE_tradeoff.png`` (each arm's
    stage-3 share against its top-1 difference and wall time; with full
    among the arms), ``TABLE.json`` and ``TABLE.md`` into ``out``; returns
    the Markdown and the plots' paths."""
    from .report.plots import plot_runs_top1, plot_tradeoff

    # Seed by seed, the arms interleaved as they trained.
    order = [(label, runs[label][i]) for i in range(len(runs[labels[0]])) for label in labels]
    plots = [plot_runs_top1([r for _, r in order], out / name,
                            title=f"validation top-1: {arms_title(labels)}",
                            arms=[label for label, _ in order], x=x)
             for name, x in ((f"{table}_top1.png", "epoch"), (f"{table}_top1_wall.png", "wall"))]
    if len(summary) > 1 and "full" in summary:
        plots.append(plot_tradeoff(summary, out / f"{table}_tradeoff.png",
                                   title=f"the switch point's trade-off: {arms_title(labels)}"))
    (out / f"{table}.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = compare_markdown(summary, command, tuple(p.name for p in plots))
    (out / f"{table}.md").write_text(md)
    return md, plots


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-compare",
        description="Train full, prelora and lora with identical settings and tabulate them.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every run")
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"),
                   help="base config (default: configs/quickstart.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="output directory: OUT/seed<S>/<mode> and the table "
                        "(default: runs/compare)")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="e.g. 0,1,2 (default: 0)")
    p.add_argument("--modes", type=parse_modes, default=list(MODES),
                   help="subset of full,prelora,lora (default: all three)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   metavar="LABEL:key=value,...",
                   help="one more arm: a prelora run with these overrides (repeatable)")
    p.add_argument("--np", type=int, default=2, help="MPI ranks per run (default: 2)")
    p.add_argument("--mpiexec", default=None,
                   help="mpiexec to use, with any options of its own, e.g. "
                        "'mpiexec -ppn 1 -hosts node0,node1' (default: the one on PATH "
                        "or beside this Python)")
    p.add_argument("--table", default="compare",
                   help="file name stem of the results in OUT: TABLE.md, TABLE.json, "
                        "TABLE_top1.png (default: compare); two comparisons can share "
                        "OUT, and so each other's runs, under different stems")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reuse", action="store_true",
                   help="keep runs that already finished in OUT (retrain unfinished ones)")
    g.add_argument("--overwrite", action="store_true", help="delete and retrain existing runs")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-compare``: 0 when every run finished and the table is written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_intermixed_args(argv)
    clash = [o for o in args.overrides if o.split("=", 1)[0].strip() in RESERVED]
    if clash:
        print(f"prelora-compare: error: {clash} are set per run by the comparison "
              f"(--modes, --seeds, --out)", file=sys.stderr)
        return 2
    from .config import ConfigError, load_config

    arms = [(m, [f"run.mode={m}"]) for m in args.modes] + list(args.variant)
    labels = [label for label, _ in arms]
    if len(set(labels)) != len(labels):
        print(f"prelora-compare: error: arm labels repeat: {labels}", file=sys.stderr)
        return 2
    try:
        # Fail now on a bad key, not after the first run has trained.
        for _, extra in arms:
            load_config(args.config, [*args.overrides, *extra])
    except ConfigError as e:
        print(f"prelora-compare: config error: {e}", file=sys.stderr)
        return 2
    args.mpiexec = args.mpiexec or shutil.which("mpiexec") or _exe("mpiexec")
    runs: dict[str, list[Run]] = {label: [] for label in labels}
    process_s: dict[str, list[float]] = {label: [] for label in labels}
    try:
        for seed in args.seeds:
            for label, extra in arms:
                run_dir = args.out / f"seed{seed}" / label
                process_s[label].append(train_one(run_dir, label, seed, args,
                                                  [*args.overrides, *extra]))
                runs[label].append(load_run(run_dir, f"seed{seed}/{label}"))
        summary = summarize(runs, args.seeds, process_s)
        md, plots = write_results(summary, runs, labels, args.out,
                                  shlex.join(["prelora-compare", *argv]), args.table)
    except (CompareError, ReportError, ValueError, OSError) as e:
        # A run that failed, or trained but left records that cannot be read,
        # or results that cannot be written: a runtime error, not a usage one.
        print(f"prelora-compare: error: {e}", file=sys.stderr)
        return 1
    print(md)
    print(f"wrote {args.out / (args.table + '.md')}, {args.out / (args.table + '.json')}, "
          + ", ".join(map(str, plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
