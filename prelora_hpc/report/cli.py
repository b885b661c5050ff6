"""``prelora-report``: what it writes where, and its command line.

    prelora-report runs/qs                                  # plots + report.md in runs/qs
    prelora-report runs/cmp/full runs/cmp/prelora runs/cmp/lora   # + compare_top1.png
    prelora-report runs/qs --replay tau=0.5,zeta=5,k=4      # what-if switch decision
    prelora-report scaling runs/scaling                     # scaling.png + scaling.md

Exit codes: 0 done; 2 for a usage error or a directory it cannot report on
(no run, a malformed record or row); 1 when writing the results fails. One
line on stderr says what and where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ..replay import ReplayParams, ReplayResult, replay
from . import plots
from .markdown import (format_replay, format_scaling_table, runs_markdown, scaling_markdown,
                       summary_markdown)
from .read import (ReportError, Run, load_run, load_run_config, load_scaling_rows, run_labels,
                   scaling_efficiency)


def write_run_report(run: Run, out: Path) -> list[Path]:
    """Every plot of one run plus ``report.md`` into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if run.epochs or run.windows:
        images.append(plots.plot_curves(run, out / "curves.png"))
    if run.windows:
        images.append(plots.plot_convergence(run, out / "convergence.png"))
    if run.rank_map:
        sw = run.first_switch
        where = "" if sw is None else f" (window {run.switch_window}, step {sw.step})"
        images.append(plots.plot_rank_map(run.rank_map, out / "rank_map.png", f"rank map{where}"))
    if run.steps or run.epochs:
        images.append(plots.plot_throughput(run, out / "throughput.png"))
    md = out / "report.md"
    md.write_text(summary_markdown(run, images))
    return images + [md]


def write_multi_report(runs: list[Run], out: Path) -> list[Path]:
    """``compare_top1.png`` and ``runs.md`` (a table of the runs) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = plots.plot_runs_top1(runs, out / "compare_top1.png")
    md = out / "runs.md"
    md.write_text(runs_markdown(runs, png.name))
    return [png, md]


def run_replay(run: Run, spec: str, out: Path) -> tuple[ReplayResult, list[Path]]:
    """Replay with ``spec`` (``"tau=..,zeta=.."``, missing keys from the run's
    config); writes ``replay.png`` and ``replay.json`` into ``out``."""
    base = ReplayParams.from_config(load_run_config(run.path))
    params = ReplayParams.parse(spec, base)
    res = replay(run.windows, params, run.first_switch)
    out.mkdir(parents=True, exist_ok=True)
    png = plots.plot_replay(run, res, out / "replay.png")
    js = out / "replay.json"
    js.write_text(json.dumps({"run": str(run.path), "mode": run.mode, **res.as_dict()}, indent=1))
    return res, [png, js]


def write_scaling_report(directory: Path, out: Path, skipped: Optional[list[str]] = None
                         ) -> tuple[list[dict[str, Any]], list[Path]]:
    """``scaling.png`` and ``scaling.md`` from the rows in ``directory``."""
    table = scaling_efficiency(load_scaling_rows(directory, skipped))
    out.mkdir(parents=True, exist_ok=True)
    png = plots.plot_scaling(table, out / "scaling.png")
    md = out / "scaling.md"
    md.write_text(scaling_markdown(table))
    return table, [png, md]


def build_parser() -> argparse.ArgumentParser:
    """The ``prelora-report RUN_DIR...`` command line."""
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


def _report_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-report``: 0 on success, 2 for a usage error or a directory it
    cannot report on, 1 when writing fails."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "scaling":
            return _scaling_main(argv[1:])
        return _report_main(argv)
    except (ReportError, ValueError, FileNotFoundError) as e:
        # A run or row that is missing or malformed: bad input.
        print(f"prelora-report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"prelora-report: error: {e}", file=sys.stderr)
        return 1
