"""prelora-compare: trains the three modes and a variant with one setting and tabulates
them (tests/unit/test_compare.py: parsing, statistics and the table without training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from mpi_util import ROOT, env, mpiexec
from prelora_hpc import compare
from run_helpers import read_metrics

# A few steps each; small windows and loose thresholds so that prelora
# passes through all three stages within them.
FEW_STEPS = ["run.epochs=1", "run.max_steps=8", "model.img_size=16", "logging.interval_steps=2",
             "prelora.window_steps=2", "prelora.k=2", "prelora.tau=100", "prelora.zeta=100",
             "prelora.warmup_windows=1"]
# One more arm: the update criterion, loose enough to switch within 8 steps.
VARIANT = ["--variant", "update:prelora.criterion=update,prelora.tau_update=100"]
ARMS = [*compare.MODES, "update"]


def _compare(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "prelora_hpc.compare", *map(str, args)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    p = _compare("--out", out, "--seeds", "0", "--mpiexec", mpiexec(), *VARIANT, *FEW_STEPS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p


@pytest.mark.mpi
def test_compare_trains_all_three_modes_with_the_same_settings(compared):
    out, _ = compared
    for mode in compare.MODES:
        run = out / "seed0" / mode
        start = read_metrics(run, "start")[-1]
        assert start["mode"] == mode and start["total_steps"] == 8
        end = read_metrics(run, "end")[-1]
        assert end["step"] == 8
        # Every mode finishes and writes its metrics, summary and config.
        assert {"start", "window", "epoch", "end"} <= {r["kind"] for r in read_metrics(run)}
        assert (run / "summary.csv").is_file() and (run / "config.yaml").is_file()
        if mode == "full":
            assert start["stage"] == 1 and not read_metrics(run, "switch")
            assert end["stage"] == 1 and end["trainable_params"] == start["params_total"]
        elif mode == "lora":
            assert start["stage"] == 3 and not read_metrics(run, "switch")
            assert end["stage"] == 3 and end["trainable_params"] < 0.5 * start["params_total"]
    assert [s["stage"] for s in read_metrics(out / "seed0" / "prelora", "switch")] == [2, 3]
    # The variant arm is a prelora run switching on the update test.
    upd = out / "seed0" / "update"
    assert read_metrics(upd, "start")[-1]["mode"] == "prelora"
    switches = read_metrics(upd, "switch")
    assert [s["stage"] for s in switches] == [2, 3]
    assert switches[0]["reason"].startswith("update test over the last 2 windows")
    windows = read_metrics(upd, "window")
    assert all(w["criterion"] == "update" for w in windows)
    assert windows[-1]["du"] and all(v > 0 for v in windows[-1]["du"].values())


@pytest.mark.mpi
def test_compare_writes_its_table_json_and_plot(compared):
    out, p = compared
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary) == ARMS
    for mode, v in summary.items():
        final = read_metrics(out / "seed0" / mode, "epoch")[-1]
        assert v["top1"] == pytest.approx(final["top1"])
        assert v["wall_s"] == pytest.approx(read_metrics(out / "seed0" / mode, "end")[-1]["wall_s"])
        assert v["seeds"] == [0]
    pre = summary["prelora"]
    assert pre["switch_epoch"] is not None and set(pre["stages"]) == {"1", "2", "3"}
    assert sum(pre["rank_histogram"].values()) == len(
        json.loads((out / "seed0" / "prelora" / "rank_map.json").read_text()))
    assert summary["full"]["switch_epoch"] is None and set(summary["full"]["stages"]) == {"1"}
    assert set(summary["lora"]["stages"]) == {"3"}
    # Each mode against full training: the two numbers the comparison is for.
    for mode, v in summary.items():
        assert v["top1_minus_full"] == pytest.approx(v["top1"] - summary["full"]["top1"])
        assert v["wall_vs_full"] == pytest.approx(v["wall_s"] / summary["full"]["wall_s"])
        assert v["paired_top1_minus_full"]["per_seed"] == [pytest.approx(v["top1_minus_full"])]
        assert v["paired_top1_minus_full"]["ci95"] is None  # one seed: no interval
    steps3 = pre["stages"]["3"]["steps"]
    assert pre["stage3_share"] == pytest.approx(
        steps3 / sum(st["steps"] for st in pre["stages"].values()))
    assert summary["full"]["stage3_share"] == 0 and summary["lora"]["stage3_share"] == 1
    # Fewer trainable parameters once only adapters train.
    assert pre["stages"]["3"]["trainable_params"] < pre["stages"]["1"]["trainable_params"]
    md = (out / "compare.md").read_text()
    assert md.startswith("# full vs prelora vs lora vs update\n")  # the arms compared
    for mode in ARMS:
        assert f"| {mode} | {summary[mode]['top1']:.2f} |" in md
    assert "run.max_steps=8" in md  # the command that made the table
    with Image.open(out / "compare_top1.png") as im:
        im.verify()
    assert (out / "compare_top1.png").stat().st_size > 5_000
    assert "| full |" in p.stdout


@pytest.mark.mpi
def test_existing_runs_are_kept_unless_asked(compared):
    out, _ = compared
    before = (out / "compare.json").read_text()
    p = _compare("--out", out, "--seeds", "0", "--mpiexec", mpiexec(), *VARIANT, *FEW_STEPS,
                 timeout=120)
    assert p.returncode == 1 and "--reuse" in p.stderr
    # --reuse: finished runs are not trained again, the table is rebuilt from them.
    p = _compare("--out", out, "--seeds", "0", "--mpiexec", mpiexec(), "--reuse", *VARIANT,
                 *FEW_STEPS, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("reusing the finished run") == 4
    after = json.loads((out / "compare.json").read_text())
    for mode, v in json.loads(before).items():
        assert after[mode]["top1"] == v["top1"] and after[mode]["wall_s"] == v["wall_s"]
