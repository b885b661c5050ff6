"""prelora-report on a real run: plots and summary, the what-if replay, several
runs on one plot (tests/unit/test_report.py: the same without training)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mpi_util import run_mpi, train_cmd
from prelora_hpc.config import load_config
from prelora_hpc.records import read_records
from prelora_hpc.replay import ReplayParams, replay
from prelora_hpc.report import main
from prelora_hpc.report.read import load_run, run_labels

# Short, but every stage: k=2 and loose thresholds pass the test as soon as
# min_windows allows (window 4 of ~13), warm-up is one window, then stage 3.
# The switch is not at the first window the test could run, so a replay
# that ignores min_windows or k would show.
SHORT_RUN = ["run.epochs=3", "model.img_size=16", "prelora.tau=5", "prelora.zeta=50", "prelora.k=2",
             "prelora.warmup_windows=1", "prelora.min_windows=4", "prelora.window_steps=5",
             "optim.warmup_steps=20", "logging.interval_steps=11"]

PLOTS = ["curves.png", "convergence.png", "rank_map.png", "throughput.png"]


def _valid_png(path, min_bytes=5_000):
    assert path.exists(), f"{path} was not written"
    assert min_bytes < path.stat().st_size < 200_000, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 300 and h >= 200
        # A blank canvas has one colour; a plot has axes, lines and text.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short_run")
    run_mpi(train_cmd(out, *SHORT_RUN, config="configs/quickstart.yaml"), timeout=600)
    return out


@pytest.mark.mpi
def test_short_run_passes_all_three_stages(short_run):
    assert [s.stage for s in read_records(short_run, "switch")] == [2, 3]
    assert read_records(short_run, "end")[-1].stage == 3


@pytest.mark.mpi
def test_report_writes_every_plot_and_the_summary(short_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main([str(short_run), "--out", str(out)]) == 0
    for name in PLOTS:
        _valid_png(out / name)
    md = (out / "report.md").read_text()
    run = load_run(short_run)
    final = run.final_eval
    assert f"{final.top1:.2f}%" in md
    assert f"window {run.switch_window}" in md
    for name in PLOTS:
        assert f"({name})" in md
    # Every table row keeps its cell count: a '|' inside a reason is escaped.
    rows = [l for l in md.splitlines() if l.startswith("| ") and "---" not in l]
    assert all(l.replace("\\|", "").count("|") in (3, 7) for l in rows), rows
    printed = capsys.readouterr().out
    assert all(str(out / n) in printed for n in PLOTS + ["report.md"])


@pytest.mark.mpi
def test_report_defaults_to_the_run_directory(short_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(short_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    assert main([str(run_dir)]) == 0
    for name in PLOTS + ["report.md"]:
        assert (run_dir / name).exists()


@pytest.mark.mpi
def test_replay_with_the_runs_own_values_reproduces_its_switch(short_run):
    run = load_run(short_run)
    params = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    res = replay(run.windows, params, run.first_switch)
    switch = run.first_switch
    assert res.switched
    assert res.window == run.switch_window and res.step == switch.step
    assert res.rank_map == switch.rank_map
    assert res.rank_map == json.loads((short_run / "rank_map.json").read_text())


@pytest.mark.mpi
def test_replay_with_looser_tau_switches_no_later(short_run):
    run = load_run(short_run)
    base = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    for spec in ("tau=50", "tau=50,zeta=1000", "tau=50,min_windows=0"):
        res = replay(run.windows, ReplayParams.parse(spec, base), run.first_switch)
        assert res.switched and res.window <= run.switch_window, spec
    # Without min_windows the loose test passes as soon as k windows exist.
    res = replay(run.windows, ReplayParams.parse("min_windows=0", base), run.first_switch)
    assert res.window == base.k


@pytest.mark.mpi
def test_replay_with_the_update_criterion_uses_the_recorded_updates(short_run):
    run = load_run(short_run)
    base = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    # Every stage-1 window after the first recorded a relative update.
    assert all(w.updates is not None for w in run.windows[1:] if w.stage == 1)
    loose = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=1000,"
                                                   "zeta=1000,min_windows=0", base), None)
    # k = 2 windows, one measured update between them: window 2 at the earliest.
    assert loose.switched and loose.window == 2
    assert all(c.decision.max_update is not None for c in loose.checks[1:])
    strict = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=0", base), None)
    assert not strict.switched
    energy = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=1000,zeta=1000,"
                                                    "min_windows=0,rank_rule=energy", base), None)
    w2 = run.windows[1]
    assert energy.rank_map == {f"blocks.{l}.{m}": int(w2.energy_ranks[i][l])
                               for i, m in enumerate(w2.modules)
                               for l in range(len(w2.energy_ranks[0]))}


@pytest.mark.mpi
def test_replay_that_never_passes_says_it_cannot_see_past_the_switch(short_run, tmp_path, capsys):
    code = main([str(short_run), "--out", str(tmp_path), "--replay", "tau=0"])
    assert code == 0
    text = capsys.readouterr().out
    assert "does not switch" in text
    assert "no switch within the recorded stage-1 windows" in text
    run = load_run(short_run)
    assert f"switched at window {run.switch_window}" in text
    saved = json.loads((tmp_path / "replay.json").read_text())
    assert saved["switched"] is False and saved["params"]["tau"] == 0
    assert saved["stage1_windows"] == run.switch_window
    _valid_png(tmp_path / "replay.png")


@pytest.mark.mpi
def test_replay_cli_prints_both_switches_and_plots_them(short_run, tmp_path, capsys):
    assert main([str(short_run), "--out", str(tmp_path), "--replay",
                        "min_windows=0,r_max=32"]) == 0
    text = capsys.readouterr().out
    assert "the replay: switches at window 2" in text
    saved = json.loads((tmp_path / "replay.json").read_text())
    assert saved["window"] == 2 and saved["params"]["r_max"] == 32
    assert max(saved["rank_map"].values()) == 32
    _valid_png(tmp_path / "replay.png", min_bytes=20_000)


@pytest.mark.mpi
def test_several_runs_on_one_plot(short_run, tmp_path):
    # Two directories named alike: the labels must still tell them apart.
    a, b = tmp_path / "s0" / "prelora", tmp_path / "s1" / "prelora"
    for d in (a, b):
        shutil.copytree(short_run, d, ignore=shutil.ignore_patterns("checkpoints"))
    assert main([str(a), str(b)]) == 0
    _valid_png(tmp_path / "compare_top1.png")
    md = (tmp_path / "runs.md").read_text()
    assert str(a) in md and str(b) in md
    assert run_labels([a, b]) == ["s0/prelora", "s1/prelora"]
    assert (a / "curves.png").exists() and (b / "curves.png").exists()
