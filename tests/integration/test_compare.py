"""prelora-compare: trains the three modes with one setting and tabulates them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from PIL import Image

from mpi_util import ROOT, env, mpiexec
from prelora_hpc import compare
from prelora_hpc.metrics import read_metrics

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
        assert read_metrics(run, "end")[-1]["step"] == 8
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
