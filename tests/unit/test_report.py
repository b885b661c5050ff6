"""prelora-report without training: reading records (resumes, reused
directories), the replay's horizon, the scaling report, the exit codes, and
the whole report of a small recorded run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from prelora_hpc.records import SwitchRecord, parse_record
from prelora_hpc.replay import ReplayParams, replay
from prelora_hpc.report import main
from prelora_hpc.report.read import load_run, load_scaling_rows, scaling_efficiency


def _valid_png(path, min_bytes=5_000):
    assert path.exists(), f"{path} was not written"
    assert min_bytes < path.stat().st_size < 200_000, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG"
        # A blank canvas has one colour; a plot has axes, lines and text.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def _write_records(path, records):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"time": 1000.0 + i, **r}) + "\n")


def _window(n, loss, stage=1, scale=1.0):
    # The layout of a window line before update statistics were recorded.
    return {"kind": "window", "window": n, "step": 5 * n, "epoch": n // 4, "stage": stage,
            "loss": loss, "dW": {}, "dL": None, "tau": 1.0, "zeta": 10.0,
            "modules": ["attn.qkv", "mlp.fc1"],
            "norms": [[scale * (1 + 0.1 * l) for l in range(3)] for _ in range(2)]}


START = {"kind": "start", "mode": "prelora", "world_size": 2, "global_batch": 64,
         "steps_per_epoch": 20, "total_steps": 100, "window_steps": 5, "params_total": 10,
         "trainable": 10, "stage": 1, "resumed_from": None, "resumed_step": 0}


def test_bad_replay_spec_and_missing_run_are_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tua"):
        ReplayParams.parse("tua=1", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))
    with pytest.raises(ValueError, match="power of two"):
        ReplayParams.parse("r_max=12", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))
    with pytest.raises(ValueError, match="'prelora.k' in replay: must be >= 2"):
        ReplayParams.parse("k=1", ReplayParams(tau=1, zeta=1, k=2, r_min=4, r_max=8))


def test_a_malformed_record_is_bad_input_named_by_file_and_line(tmp_path, capsys):
    _write_records(tmp_path, [START, _window(1, 2.0)])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "window", "window": 2\n')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl, line 3" in err


def test_a_report_that_cannot_be_written_is_a_runtime_error(tmp_path, capsys):
    _write_records(tmp_path / "run", [START, _window(1, 2.0)])
    (tmp_path / "taken").write_text("a file where the output directory should go")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prelora-report: error:") and "taken" in err and "\n" not in err


def test_a_resumed_run_counts_each_window_once_and_later_records_win(tmp_path):
    records = [START, _window(1, 2.0), _window(2, 1.9), _window(3, 1.8),
               {"kind": "step", "step": 15, "epoch": 0, "stage": 1, "loss": 1.8, "lr": 1e-3,
                "images_per_s": 100.0},
               # Killed after window 3; the checkpoint was at step 10 (window 2).
               {**START, "resumed_from": "ckpt/step10", "resumed_step": 10},
               _window(3, 1.7), _window(4, 1.6)]
    _write_records(tmp_path, records)
    run = load_run(tmp_path)
    assert [w.window for w in run.windows] == [1, 2, 3, 4]
    assert run.windows[2].loss == 1.7  # the resumed run's window 3
    assert run.steps == []  # step 15 of the abandoned attempt is superseded
    assert len(run.starts) == 2 and run.start.resumed_from is None


def test_a_fresh_run_in_a_reused_directory_replaces_the_old_one(tmp_path):
    start = {**START, "mode": "full", "world_size": 1, "global_batch": 8, "steps_per_epoch": 4,
             "total_steps": 8}
    _write_records(tmp_path, [start, _window(1, 2.0), _window(2, 1.0),
                              {**start, "mode": "prelora"}, _window(1, 3.0)])
    run = load_run(tmp_path)
    assert run.mode == "prelora" and [w.loss for w in run.windows] == [3.0]


def test_replay_only_uses_stage1_windows():
    # The run switched at window 2. Windows 3 and 4 (stages 2 and 3) are
    # flat and would pass the test at window 3 under min_windows=3; the
    # replay must not look at them.
    windows = [parse_record(w) for w in (
        _window(1, 2.0, scale=1.0), _window(2, 2.0, scale=1.5),
        _window(3, 2.0, stage=2, scale=1.5), _window(4, 2.0, stage=3, scale=1.5))]
    switch = SwitchRecord(step=10, epoch=0, stage=2, reason="test", rank_map={},
                          trainable_before=10, trainable_after=12, trainable_pct=120.0,
                          params_total=10)
    params = ReplayParams(tau=1.0, zeta=1.0, k=2, r_min=4, r_max=8, min_windows=3)
    res = replay(windows, params, switch)
    assert not res.switched and res.stage1_windows == 2 and res.actual_window == 2
    assert "no switch within the recorded stage-1 windows" in res.note
    res = replay(windows, ReplayParams(tau=100, zeta=1, k=2, r_min=4, r_max=8), None)
    assert res.switched and res.window == 2


def _recorded_run(path):
    """A short prelora run through all three stages, as the trainer records it."""
    modules = ["attn.qkv", "mlp.fc1"]
    rank_map = {f"blocks.{l}.{m}": r for l, rs in enumerate(([4, 8], [8, 16], [4, 4]))
                for m, r in zip(modules, rs)}
    recs = [START]
    for n in range(1, 9):
        stage = 1 if n <= 4 else (2 if n == 5 else 3)
        recs.append({**_window(n, 2.0 / n, stage=stage, scale=1 + 0.2 / n),
                     "dW": {m: 0.5 / n for m in modules}, "dL": -10.0 / n,
                     "du": {m: 2.0 / n for m in modules}, "criterion": "norm",
                     "tau_update": 0.5})
        recs.append({"kind": "step", "step": 5 * n, "epoch": n // 4, "stage": stage,
                     "loss": 2.0 / n, "lr": 1e-3, "images_per_s": 100.0 + 10 * stage + n})
        if n == 4:
            recs.append({"kind": "switch", "step": 20, "epoch": 1, "stage": 2,
                         "reason": "|dW| <= 1.0% over 2 windows", "rank_map": rank_map,
                         "trainable_before": 10, "trainable_after": 12, "trainable_pct": 120.0,
                         "params_total": 10})
        if n == 5:
            recs.append({"kind": "switch", "step": 25, "epoch": 1, "stage": 3,
                         "reason": "1 warm-up window(s) of stage 2 done", "rank_map": rank_map,
                         "trainable_before": 12, "trainable_after": 2, "trainable_pct": 20.0,
                         "params_total": 10})
        if n % 4 == 0:
            recs.append({"kind": "epoch", "epoch": n // 4, "step": 5 * n, "stage": stage,
                         "val_loss": 2.0 / n, "top1": 40.0 + 5 * n, "top5": 80.0 + n,
                         "trainable_params": 12, "peak_memory_bytes": 2**28})
    recs.append({"kind": "end", "step": 40, "epoch": 2, "stage": 3, "wall_s": 12.5,
                 "trainable_params": 2, "params_total": 10, "skipped_steps": 0})
    _write_records(path, recs)
    return path


def test_the_report_of_a_recorded_run_has_every_plot_and_table(tmp_path, capsys):
    run_dir = _recorded_run(tmp_path / "run")
    out = tmp_path / "rep"
    assert main([str(run_dir), "--out", str(out)]) == 0
    plots = ["curves.png", "convergence.png", "rank_map.png", "throughput.png"]
    for name in plots:
        _valid_png(out / name)
    md = (out / "report.md").read_text()
    assert "80.00% / 88.00%" in md and "window 4, step 20" in md
    assert "stage 3 (LoRA only)" in md and "12.5 s" in md
    rows = [l for l in md.splitlines() if l.startswith("| ") and "---" not in l]
    assert all(l.replace("\\|", "").count("|") in (3, 7) for l in rows), rows
    printed = capsys.readouterr().out
    assert all(str(out / n) in printed for n in plots + ["report.md"])


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
    assert main(["scaling", str(tmp_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "bench-weak-n4.json" in captured.err
    _valid_png(out / "scaling.png")
    md = (out / "scaling.md").read_text()
    assert md.count("A100-SXM4-40GB") == len(rows)
    table = scaling_efficiency(load_scaling_rows(tmp_path))
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
    assert main(["scaling", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "step_time_s" in err


def test_reading_runs_does_not_load_matplotlib():
    # The comparison's table and any tool that only reads runs stay light.
    code = ("import sys, prelora_hpc.report, prelora_hpc.report.read, prelora_hpc.compare; "
            "sys.exit('matplotlib' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, f"reading runs loaded matplotlib {p.stderr}"
