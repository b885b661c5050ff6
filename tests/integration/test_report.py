"""prelora-report: plots and summary of a real run, the what-if replay, the
scaling report, and reading a resumed run's records."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mpi_util import run_mpi, train_cmd
from prelora_hpc import report
from prelora_hpc.config import load_config
from prelora_hpc.metrics import read_metrics
from prelora_hpc.replay import ReplayParams, replay

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
    assert [s["stage"] for s in read_metrics(short_run, "switch")] == [2, 3]
    assert read_metrics(short_run, "end")[-1]["stage"] == 3


@pytest.mark.mpi
def test_report_writes_every_plot_and_the_summary(short_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(short_run), "--out", str(out)]) == 0
    for name in PLOTS:
        _valid_png(out / name)
    md = (out / "report.md").read_text()
    run = report.load_run(short_run)
    final = run.final_eval
    assert f"{final['top1']:.2f}%" in md
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
    assert report.main([str(run_dir)]) == 0
    for name in PLOTS + ["report.md"]:
        assert (run_dir / name).exists()


@pytest.mark.mpi
def test_replay_with_the_runs_own_values_reproduces_its_switch(short_run):
    run = report.load_run(short_run)
    params = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    res = replay(run.windows, params, run.first_switch)
    switch = run.first_switch
    assert res.switched
    assert res.window == run.switch_window and res.step == switch["step"]
    assert res.rank_map == switch["rank_map"]
    assert res.rank_map == json.loads((short_run / "rank_map.json").read_text())


@pytest.mark.mpi
def test_replay_with_looser_tau_switches_no_later(short_run):
    run = report.load_run(short_run)
    base = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    for spec in ("tau=50", "tau=50,zeta=1000", "tau=50,min_windows=0"):
        res = replay(run.windows, ReplayParams.parse(spec, base), run.first_switch)
        assert res.switched and res.window <= run.switch_window, spec
    # Without min_windows the loose test passes as soon as k windows exist.
    res = replay(run.windows, ReplayParams.parse("min_windows=0", base), run.first_switch)
    assert res.window == base.k


@pytest.mark.mpi
def test_replay_with_the_update_criterion_uses_the_recorded_updates(short_run):
    run = report.load_run(short_run)
    base = ReplayParams.from_config(load_config(short_run / "config.yaml"))
    # Every stage-1 window after the first recorded a relative update.
    assert all(w["updates"] is not None for w in run.windows[1:] if w["stage"] == 1)
    loose = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=1000,"
                                                   "zeta=1000,min_windows=0", base), None)
    # k = 2 windows, one measured update between them: window 2 at the earliest.
    assert loose.switched and loose.window == 2
    assert all(c.max_update is not None for c in loose.checks[1:])
    strict = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=0", base), None)
    assert not strict.switched
    energy = replay(run.windows, ReplayParams.parse("criterion=update,tau_update=1000,zeta=1000,"
                                                    "min_windows=0,rank_rule=energy", base), None)
    w2 = run.windows[1]
    assert energy.rank_map == {f"blocks.{l}.{m}": int(w2["energy_ranks"][i][l])
                               for i, m in enumerate(w2["modules"])
                               for l in range(len(w2["energy_ranks"][0]))}


@pytest.mark.mpi
def test_replay_that_never_passes_says_it_cannot_see_past_the_switch(short_run, tmp_path, capsys):
    code = report.main([str(short_run), "--out", str(tmp_path), "--replay", "tau=0"])
    assert code == 0
    text = capsys.readouterr().out
    assert "does not switch" in text
    assert "no switch within the recorded stage-1 windows" in text
    run = report.load_run(short_run)
    assert f"switched at window {run.switch_window}" in text
    saved = json.loads((tmp_path / "replay.json").read_text())
    assert saved["switched"] is False and saved["params"]["tau"] == 0
    assert saved["stage1_windows"] == run.switch_window
    _valid_png(tmp_path / "replay.png")


@pytest.mark.mpi
def test_replay_cli_prints_both_switches_and_plots_them(short_run, tmp_path, capsys):
    assert report.main([str(short_run), "--out", str(tmp_path), "--replay",
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
    assert report.main([str(a), str(b)]) == 0
    _valid_png(tmp_path / "compare_top1.png")
    md = (tmp_path / "runs.md").read_text()
    assert str(a) in md and str(b) in md
    assert report.run_labels([a, b]) == ["s0/prelora", "s1/prelora"]
    assert (a / "curves.png").exists() and (b / "curves.png").exists()


# ------------------------------------------------------------------ no MPI


def test_bad_replay_spec_and_missing_run_are_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tua"):
        ReplayParams.parse("tua=1", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))
    with pytest.raises(ValueError, match="power of two"):
        ReplayParams.parse("r_max=12", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))
    with pytest.raises(ValueError, match="k must be"):
        ReplayParams.parse("k=1", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))


def _write_records(path, records):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"time": 1000.0 + i, **r}) + "\n")


def _window(n, loss, stage=1, scale=1.0):
    return {"kind": "window", "window": n, "step": 5 * n, "epoch": n // 4, "stage": stage,
            "loss": loss, "dW": {}, "dL": None, "tau": 1.0, "zeta": 10.0,
            "modules": ["attn.qkv", "mlp.fc1"],
            "norms": [[scale * (1 + 0.1 * l) for l in range(3)] for _ in range(2)]}


def test_a_resumed_run_counts_each_window_once_and_later_records_win(tmp_path):
    start = {"kind": "start", "mode": "prelora", "world_size": 2, "global_batch": 64,
             "steps_per_epoch": 20, "total_steps": 100, "window_steps": 5, "params_total": 10,
             "trainable": 10, "stage": 1, "resumed_from": None, "resumed_step": 0}
    records = [start, _window(1, 2.0), _window(2, 1.9), _window(3, 1.8),
               {"kind": "step", "step": 15, "epoch": 0, "stage": 1, "loss": 1.8, "lr": 1e-3,
                "images_per_s": 100.0},
               # Killed after window 3; the checkpoint was at step 10 (window 2).
               {**start, "resumed_from": "ckpt/step10", "resumed_step": 10},
               _window(3, 1.7), _window(4, 1.6)]
    _write_records(tmp_path, records)
    run = report.load_run(tmp_path)
    assert [w["window"] for w in run.windows] == [1, 2, 3, 4]
    assert run.windows[2]["loss"] == 1.7  # the resumed run's window 3
    assert run.steps == []  # step 15 of the abandoned attempt is superseded
    assert len(run.starts) == 2 and run.start["resumed_from"] is None


def test_a_fresh_run_in_a_reused_directory_replaces_the_old_one(tmp_path):
    start = {"kind": "start", "mode": "full", "world_size": 1, "global_batch": 8,
             "steps_per_epoch": 4, "total_steps": 8, "window_steps": 5, "params_total": 10,
             "trainable": 10, "stage": 1, "resumed_from": None, "resumed_step": 0}
    _write_records(tmp_path, [start, _window(1, 2.0), _window(2, 1.0),
                              {**start, "mode": "prelora"}, _window(1, 3.0)])
    run = report.load_run(tmp_path)
    assert run.mode == "prelora" and [w["loss"] for w in run.windows] == [3.0]


def test_replay_only_uses_stage1_windows(tmp_path):
    # The run switched at window 2. Windows 3 and 4 (stages 2 and 3) are
    # flat and would pass the test at window 3 under min_windows=3; the
    # replay must not look at them.
    windows = [_window(1, 2.0, scale=1.0), _window(2, 2.0, scale=1.5),
               _window(3, 2.0, stage=2, scale=1.5), _window(4, 2.0, stage=3, scale=1.5)]
    params = ReplayParams(tau=1.0, zeta=1.0, k=2, r_min=4, r_max=8, min_windows=3)
    res = replay(windows, params, {"step": 10, "rank_map": {}})
    assert not res.switched and res.stage1_windows == 2 and res.actual_window == 2
    assert "no switch within the recorded stage-1 windows" in res.note
    res = replay(windows, ReplayParams(tau=100, zeta=1, k=2, r_min=4, r_max=8), None)
    assert res.switched and res.window == 2


def _scaling_row(stage, scaling, nodes, gpus, ips, batch):
    return {"stage": stage, "scaling": scaling, "nodes": nodes, "gpus": gpus,
            "global_batch": batch, "images_per_s": ips, "images_per_s_per_gpu": ips / gpus,
            "step_time_s": batch / ips,
            "allreduce_bytes_per_step": 4 * 300e6 if stage == 1 else 4e6,
            "peak_memory_bytes": 30 * 2**30, "device": "A100-SXM4-40GB"}


def test_scaling_report_table_efficiency_and_plot(tmp_path, capsys):
    rows = []
    for stage, per_gpu in ((1, 400.0), (3, 600.0)):
        for nodes, eff_w, eff_s in ((1, 1.0, 1.0), (2, 0.95, 0.9), (4, 0.9, 0.8)):
            g = 4 * nodes
            rows.append(_scaling_row(stage, "weak", nodes, g, per_gpu * eff_w * g, 256 * g))
            rows.append(_scaling_row(stage, "strong", nodes, g, per_gpu * 4 * eff_s * nodes, 1024))
    for i, r in enumerate(rows):
        (tmp_path / f"row{i:02d}.json").write_text(json.dumps(r))
    # scripts/scaling.sh keeps the bench's full results beside the rows.
    (tmp_path / "bench-weak-n4.json").write_text(json.dumps({"preset": "vit-large", "nodes": 1}))
    out = tmp_path / "out"
    assert report.main(["scaling", str(tmp_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "bench-weak-n4.json" in captured.err
    _valid_png(out / "scaling.png")
    md = (out / "scaling.md").read_text()
    assert md.count("A100-SXM4-40GB") == len(rows)
    table = report.scaling_efficiency(report.load_scaling_rows(tmp_path))
    for m in table:
        per_gpu = 400.0 if m["stage"] == 1 else 600.0
        base_ips = per_gpu * 4
        if m["scaling"] == "weak":
            expect = m["images_per_s_per_gpu"] / per_gpu
        else:
            expect = (m["images_per_s"] / base_ips) / (m["gpus"] / 4)
        assert m["efficiency"] == pytest.approx(expect)
    effs = {(m["stage"], m["scaling"], m["nodes"]): m["efficiency"] for m in table}
    assert effs[(1, "weak", 4)] == pytest.approx(0.9)
    assert effs[(3, "strong", 2)] == pytest.approx(0.9)
    printed = captured.out
    assert "eff" in printed and printed.count("\n") >= len(rows) + 1


def test_scaling_row_with_a_missing_key_is_named(tmp_path, capsys):
    row = _scaling_row(1, "weak", 1, 4, 1600.0, 1024)
    del row["step_time_s"]
    (tmp_path / "bad.json").write_text(json.dumps(row))
    assert report.main(["scaling", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "step_time_s" in err
