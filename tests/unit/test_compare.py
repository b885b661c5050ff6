"""prelora-compare without training: argument checks, the paired statistics,
the table's title and the plot's colours per arm."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from prelora_hpc import compare
from prelora_hpc.records import EndRecord, EpochRecord, StartRecord
from prelora_hpc.report import plots
from prelora_hpc.report.read import Run


def test_reserved_overrides_and_bad_keys_are_refused_before_training(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path), "run.mode=full"]) == 2
    assert "run.mode" in capsys.readouterr().err
    assert compare.main(["--out", str(tmp_path), "optim.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_seed_and_mode_lists_are_checked():
    assert compare.parse_seeds("0,1,2") == [0, 1, 2]
    assert compare.parse_modes("lora,full") == ["lora", "full"]
    for bad in ("0,0", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="seeds"):
            compare.parse_seeds(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="modes"):
        compare.parse_modes("full,qlora")



def test_paired_difference_mean_and_t_interval():
    # d = 1, 2, 3: mean 2, sd 1, half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732.
    d = compare.paired_difference([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])
    assert d["per_seed"] == [1.0, 2.0, 3.0] and d["mean"] == 2.0 and d["std"] == 1.0
    assert d["ci95"] == pytest.approx([2.0 - 4.303 / 3**0.5, 2.0 + 4.303 / 3**0.5])
    assert compare.t975(4) == 2.776 and compare.t975(1000) == 1.96
    with pytest.raises(ValueError, match="equal"):
        compare.paired_difference([1.0], [1.0, 2.0])


def test_variants_are_parsed_and_checked():
    assert compare.parse_variant("upd:prelora.criterion=update, prelora.tau_update=0.5") == (
        "upd", ["run.mode=prelora", "prelora.criterion=update", "prelora.tau_update=0.5"])
    assert compare.parse_variant("r4:run.mode=lora,lora.rank=4")[1] == ["run.mode=lora",
                                                                       "lora.rank=4"]
    for bad in ("noop", "full:prelora.tau=1", "x:run.seed=3", "x:tau"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.parse_variant(bad)


def _summary_entry(top1):
    return {"top1": top1, "top1_std": 0.0, "top1_per_seed": [top1], "top5": 90.0,
            "top5_std": 0.0, "wall_s": 10.0, "wall_s_std": 0.0, "stages": {},
            "stage3_share": None, "switch_epoch": None, "switch_epoch_per_seed": [None],
            "rank_histogram": {}, "seeds": [0]}


def test_the_table_is_titled_by_the_arms_compared():
    md = compare.compare_markdown({"full": _summary_entry(80.0), "update": _summary_entry(79.0)},
                                  "prelora-compare --modes full")
    assert md.splitlines()[0] == "# full vs update"
    assert "| update | 79.00 |" in md


def _run(name, mode, top1):
    start = StartRecord(mode=mode, world_size=2, global_batch=8, steps_per_epoch=4,
                        total_steps=8, window_steps=2, params_total=10, trainable=10, stage=1)
    epochs = [EpochRecord(epoch=e, step=4 * e, stage=1, val_loss=1.0, top1=top1 + e, top5=90.0,
                          trainable_params=10, peak_memory_bytes=1) for e in (1, 2)]
    return Run(path=Path(name), name=name, start=start, starts=[start], epochs=epochs)


def test_each_arm_has_its_own_colour_also_two_prelora_arms(tmp_path, monkeypatch):
    runs = [_run(f"seed{s}/{arm}", mode, 50.0 + s)
            for s in (0, 1) for arm, mode in (("full", "full"), ("prelora", "prelora"),
                                              ("update", "prelora"))]
    arms = [r.name.split("/")[1] for r in runs]
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_runs_top1(runs, tmp_path / "top1.png", arms=arms)
    lines = [l for l in drawn[0].axes[0].get_lines() if l.get_label() in {r.label for r in runs}]
    color = {l.get_label(): l.get_color() for l in lines}
    by_arm = {arm: {color[r.label] for r, a in zip(runs, arms) if a == arm} for arm in set(arms)}
    assert all(len(c) == 1 for c in by_arm.values())  # the seeds of an arm alike
    assert len({c.pop() for c in by_arm.values()}) == 3  # the arms apart
    assert plots.arm_colors(["full", "prelora", "lora"]) == {
        m: plots.MODE_COLORS[m] for m in ("full", "prelora", "lora")}


def _timed_run(name, mode, curve, start_time=1000.0):
    """A run whose evaluations (top-1 by step) were written at ``start_time``
    plus the step in seconds: one optimizer step per second."""
    start = StartRecord(mode=mode, world_size=2, global_batch=8, steps_per_epoch=4,
                        total_steps=8, window_steps=2, params_total=10, trainable=10, stage=1,
                        time=start_time)
    epochs = [EpochRecord(epoch=step // 4, step=step, stage=1, val_loss=1.0, top1=top1,
                          top5=90.0, trainable_params=10, peak_memory_bytes=1,
                          time=start_time + step) for step, top1 in curve]
    end = EndRecord(step=curve[-1][0], epoch=2, stage=1, wall_s=float(curve[-1][0]),
                    trainable_params=10, params_total=10, time=start_time + curve[-1][0])
    return Run(path=Path(name), name=name, start=start, starts=[start], epochs=epochs, end=end)


def test_time_to_accuracy_is_the_first_evaluation_within_a_point_of_full(tmp_path):
    """Each seed's target is its own full run's final top-1 minus one point;
    an arm that never gets there says so instead of a number."""
    full = [_timed_run("s0/full", "full", [(2, 40.0), (4, 49.5), (8, 50.0)]),
            _timed_run("s1/full", "full", [(2, 40.0), (4, 45.0), (8, 52.0)])]
    fast = [_timed_run("s0/prelora", "prelora", [(2, 49.0), (4, 49.9), (8, 49.8)]),
            _timed_run("s1/prelora", "prelora", [(2, 40.0), (6, 51.0), (8, 51.5)])]
    never = [_timed_run("s0/lora", "lora", [(8, 48.0)]),
             _timed_run("s1/lora", "lora", [(8, 51.0)])]
    s = compare.summarize({"full": full, "prelora": fast, "lora": never}, [0, 1])
    assert s["full"]["tta_s_per_seed"] == [4.0, 8.0]
    assert s["prelora"]["tta_s_per_seed"] == [2.0, 6.0]
    assert s["prelora"]["tta_s"] == 4.0
    assert s["prelora"]["paired_tta_vs_full"] == pytest.approx((2 / 4 + 6 / 8) / 2)
    assert s["lora"]["tta_s_per_seed"] == [None, 8.0] and s["lora"]["tta_s"] is None
    md = compare.compare_markdown(s, "prelora-compare")
    assert "not reached (1 of 2 seeds)" in md
    assert "| prelora |" in md and "| 4 | 0.625 |" in md


def test_a_resumed_run_counts_training_time_not_the_time_it_lay_stopped():
    run = _timed_run("s0/full", "full", [(2, 40.0), (4, 45.0)])
    later = StartRecord(mode="full", world_size=2, global_batch=8, steps_per_epoch=4,
                        total_steps=8, window_steps=2, params_total=10, trainable=10, stage=1,
                        time=5000.0, resumed_step=4)
    run.starts.append(later)
    run.epochs.append(EpochRecord(epoch=2, step=8, stage=1, val_loss=1.0, top1=50.0, top5=90.0,
                                  trainable_params=10, peak_memory_bytes=1, time=5004.0))
    # 4 s before the stop, the hour in the queue not counted, 4 s after it.
    assert run.elapsed_s(run.epochs[-1]) == 8.0
    assert compare.time_to_accuracy(run, 49.0) == 8.0
    assert compare.time_to_accuracy(run, 60.0) is None


def test_the_wall_clock_plot_puts_each_evaluation_at_its_training_time(tmp_path, monkeypatch):
    runs = [_timed_run("s0/full", "full", [(2, 40.0), (8, 50.0)])]
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_runs_top1(runs, tmp_path / "wall.png", x="wall")
    line = next(l for l in drawn[0].axes[0].get_lines() if l.get_label() == runs[0].label)
    assert list(line.get_xdata()) == [2.0, 8.0]
    assert drawn[0].axes[0].get_xlabel() == "training time (s)"


def test_the_tradeoff_plot_puts_each_arm_at_its_stage3_share(tmp_path, monkeypatch):
    arms = {label: {"stage3_share": share, "paired_wall_vs_full": wall,
                    "paired_top1_minus_full": compare.paired_difference(a, [50.0, 52.0])}
            for label, share, wall, a in (("full", 0.0, 1.0, [50.0, 52.0]),
                                          ("prelora", 0.43, 0.8, [49.0, 52.0]),
                                          ("early", 0.5, 0.7, [48.0, 50.0]))}
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_tradeoff(arms, tmp_path / "t.png")
    acc, wall = drawn[0].axes
    line = next(l for l in wall.get_lines() if l.get_label() == "early")
    assert list(line.get_xdata()) == [50.0] and list(line.get_ydata()) == [0.7]
    trend = [l for l in acc.get_lines() if l.get_linestyle() == "-" and len(l.get_xdata()) == 3]
    assert [list(t.get_xdata()) for t in trend] == [[0.0, 43.0, 50.0]]
    assert list(trend[0].get_ydata()) == [0.0, -0.5, -2.0]
    with pytest.raises(ValueError, match="paired"):
        plots.plot_tradeoff({"full": {"stage3_share": 0.0}}, tmp_path / "u.png")


def test_mpiexec_options_reach_the_launcher_word_by_word(tmp_path, capsys):
    """--mpiexec 'LAUNCHER -ppn 1 -hosts a,b' (one rank per node on a
    cluster): the launcher gets its own options, then -n and the trainer."""
    argv_file = tmp_path / "argv"
    launcher = tmp_path / "launcher"
    launcher.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_file}\nexit 3\n")
    launcher.chmod(0o755)
    rc = compare.main(["--out", str(tmp_path / "out"), "--modes", "full", "--np", "2",
                       "--mpiexec", f"{launcher} -ppn 1 -hosts emu0,emu1"])
    assert rc == 1 and "exited 3" in capsys.readouterr().err
    words = argv_file.read_text().split("\n")
    assert words[:6] == ["-ppn", "1", "-hosts", "emu0,emu1", "-n", "2"]
    assert words[6].endswith("prelora-train")
