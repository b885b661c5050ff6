"""prelora-bench at a toy size: the JSON's structure, and the stage-3
trainable count and gradient bytes checked against the rank map's own
arithmetic (sum over adapted layers of r x (in + out), plus the kept norms,
pos_embed, cls_token and head, times 4 bytes in fp32); the floor's count
against the kept parameters alone; the DDP peer's losses against our
engine's. Every step is the trainer's ``TrainStep``. No timing is asserted:
timings are figures for docs/benchmarks.md, not properties. The arithmetic
without a process group is in tests/unit/test_bench.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from mpi_util import ROOT, env, run_mpi
from prelora_hpc.bench.cost import PROJECTION_NODES, representative_rank_map
from prelora_hpc.bench.probes import STEP_FLAG_ALLREDUCE
from prelora_hpc.records import SCALING_ROW_KEYS
from unit.test_bench import expected_stage3, toy_model

RATIO_KEYS = ("step_time_ratio", "grad_bytes_ratio", "peak_memory_ratio", "trainable_fraction")
STAGE_KEYS = ("step_time_s", "compute_time_s", "images_per_s", "trainable_params", "total_params",
              "optimizer_state_bytes", "grad_bytes", "allreduce_bytes_per_step",
              "allreduce_calls_per_step", "peak_memory_bytes", "step_times_s")


def run_bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "prelora_hpc.bench", "--preset", "toy", "--json", str(out), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def check_stage3_arithmetic(r: dict, rank_map: dict[str, int]) -> None:
    s1, s3 = r["stage1"], r["stage3"]
    n1 = sum(p.numel() for p in toy_model().parameters())
    n3 = expected_stage3(rank_map)
    assert s1["trainable_params"] == n1
    assert s3["trainable_params"] == n3
    # fp32 on the CPU: 4 bytes per trainable scalar, frozen ones move nothing.
    assert s1["grad_bytes"] == 4 * n1
    assert s3["grad_bytes"] == 4 * n3
    # What DeepSpeed's comms logger saw: the gradients plus at most a few
    # scalars DeepSpeed's step reduces, plus the training step's flag
    # agreement (outside the logger).
    for s in (s1, s3):
        assert 0 <= s["allreduce_bytes_per_step"] - s["grad_bytes"] <= 64
        assert s["allreduce_bytes_per_step"] - s["grad_bytes"] >= STEP_FLAG_ALLREDUCE["bytes"]
    # AdamW: two fp32 moments per trainable scalar (plus scalar step counters).
    assert 8 * n3 <= s3["optimizer_state_bytes"] <= 8 * n3 + 8 * 64
    assert r["trainable_fraction"] == pytest.approx(n3 / n1, rel=0, abs=1e-12)
    assert r["grad_bytes_ratio"] == pytest.approx(n3 / n1, rel=0, abs=1e-12)


def test_one_process_json(tmp_path):
    r = run_bench(tmp_path, "--steps", "2", "--warmup", "1")
    for k in RATIO_KEYS:
        assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, k
    for s in ("stage1", "stage3"):
        for k in STAGE_KEYS:
            assert k in r[s], (s, k)
        assert len(r[s]["step_times_s"]) == 2
        # The first step is timed on its own: a compiled model's compilation.
        assert r[s]["first_step_s"] > 0
    assert r["world_size"] == 1 and r["nodes"] == 1 and r["global_batch"] == 4
    assert r["model"]["compile"] is False
    # The default map: Algorithm 2 over every tracked layer of the 2 blocks.
    ranks = r["rank_map"]["ranks"]
    assert len(ranks) == 8 and set(ranks.values()) <= {2, 4, 8}
    assert ranks == representative_rank_map(2, ["attn.qkv", "attn.proj", "mlp.fc1",
                                                "mlp.fc2"], 2, 8, seed=0)
    check_stage3_arithmetic(r, ranks)
    checks = r["stage3"]["checks"]
    for name in ("frozen_without_grad", "engine_trains_exactly_trainable",
                 "no_dense_weight_products", "lora_dropout_identity", "low_precision_masters"):
        assert checks[name]["ok"] is True, (name, checks[name])
    # The detector does see weight gradients when they exist (stage 1).
    assert r["stage1"]["checks"]["dense_weight_products"] > 0
    bk = r["stage1"]["bookkeeping"]
    assert bk["window_steps"] == 50 and bk["per_window_s"] > 0
    proj = r["projection"]
    for s in ("stage1", "stage3"):
        rows = proj[s]
        assert [row["nodes"] for row in rows] == PROJECTION_NODES
        assert [row["gpus"] for row in rows] == [4 * n for n in PROJECTION_NODES]
        assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert r["network"]["bandwidth_source"] == "assumed"
    assert "projection_check" not in r  # one rank: nothing to compare


def kept_only() -> int:
    """What the floor trains: stage 3's kept parameters, no adapters."""
    return expected_stage3({})


def check_peer_and_floor(r: dict) -> None:
    """The DDP peer and the floor train what they claim, and the peer does
    exactly our engine's arithmetic: from the same seed on the same batch its
    warm-up losses (the second one after an AdamW update with weight-decay
    groups and the norm clip) equal our engine's."""
    peer = r["peer"]
    assert peer["kind"] == "ddp"
    for s in ("stage1", "stage3"):
        ours, theirs = r[s], peer[s]
        assert theirs["trainable_params"] == ours["trainable_params"]
        assert theirs["grad_bytes"] == ours["grad_bytes"]
        assert theirs["optimizer_holds_exactly_trainable"] is True
        assert theirs["frozen_with_grad"] == 0
        assert len(theirs["warmup_losses"]) == len(ours["warmup_losses"]) == 2
        assert theirs["warmup_losses"] == pytest.approx(ours["warmup_losses"], rel=1e-5)
        assert r[f"{s}_over_peer"] == pytest.approx(ours["step_time_s"] / theirs["step_time_s"])
        il = theirs["interleaved"]
        assert il["rounds"] == r["steps"] and il["ours_step_time_s"] > 0
        assert r[f"{s}_over_peer_interleaved"] == pytest.approx(
            il["ours_step_time_s"] / il["peer_step_time_s"])
    # Stage 3's DDP holds no frozen tensor; stage 1's has none to hold.
    assert peer["stage3"]["frozen_tensors"] > 0 and peer["stage1"]["frozen_tensors"] == 0
    fl = r["floor"]
    assert fl["config"] == "floor" and fl["adapter_params"] == 0
    assert fl["trainable_params"] == fl["kept_params"] == kept_only()
    assert fl["trainable_params"] == r["stage3"]["kept_params"]
    assert fl["grad_bytes"] == 4 * kept_only()
    # Same initial base, same batch: the first loss is the same model's.
    assert fl["warmup_losses"][0] == pytest.approx(r["stage3"]["warmup_losses"][0], rel=1e-6)
    assert r["stage3_over_floor"] == pytest.approx(r["stage3"]["step_time_s"] / fl["step_time_s"])
    # Stage 1, stage 3 and the floor stepped in turn: the ratios to quote.
    il = r["interleaved"]
    assert il["rounds"] == r["steps"]
    assert r["step_time_ratio_interleaved"] == il["stage3_over_stage1"] == pytest.approx(
        il["stage3_step_time_s"] / il["stage1_step_time_s"])
    assert r["stage3_over_floor_interleaved"] == il["stage3_over_floor"] == pytest.approx(
        il["stage3_step_time_s"] / il["floor_step_time_s"])


def test_ddp_peer_and_floor_one_process(tmp_path):
    md = tmp_path / "bench.md"
    r = run_bench(tmp_path, "--steps", "1", "--warmup", "2", "--no-checks", "--peer", "ddp",
                  "--markdown", str(md))
    check_peer_and_floor(r)
    # The Markdown table: one row per configuration, stage 1 its own unit.
    rows = [l for l in md.read_text().splitlines() if l.startswith("| ") and "ms |" in l]
    assert len(rows) == 5
    assert rows[0].startswith("| stage 1 (ours) |") and rows[0].endswith("| 1.000 |")
    assert f"stage 1 ours / peer: **{r['stage1_over_peer']:.3f}**" in md.read_text()
    assert (f"stage 3 / stage 1, steps interleaved: **{r['step_time_ratio_interleaved']:.3f}**"
            in md.read_text())
    # One rank: nothing to reduce, the step is all compute.
    for s in ("stage1", "stage3"):
        assert r["peer"][s]["compute_time_s"] == r["peer"][s]["step_time_s"]


def test_no_floor_and_no_peer_keep_the_schema(tmp_path):
    r = run_bench(tmp_path, "--steps", "1", "--warmup", "1", "--no-checks", "--no-floor",
                  "--no-interleave")
    assert r["floor"] is None and r["peer"] is None and r["interleaved"] is None
    for k in ("stage1_over_peer", "stage3_over_peer", "stage1_over_peer_interleaved",
              "stage3_over_peer_interleaved", "stage3_over_floor", "stage3_above_floor_s",
              "step_time_ratio_interleaved", "stage3_over_floor_interleaved"):
        assert r[k] is None, k


def test_rank_map_file_and_single_stage(tmp_path):
    model = toy_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]
    rank_map = {n: (8 if i == 0 else 1) for i, n in enumerate(names)}
    f = tmp_path / "rank_map.json"
    f.write_text(json.dumps(rank_map))
    r = run_bench(tmp_path, "--steps", "1", "--warmup", "1", "--stages", "3",
                  "--rank-map", str(f), "--no-checks")
    assert "stage1" not in r and all(r[k] is None for k in RATIO_KEYS)
    # Stage 3 and its floor stepped in turn; no stage 1 to divide by.
    assert r["step_time_ratio_interleaved"] is None and r["interleaved"]["stage3_over_stage1"] is None
    assert r["stage3_over_floor_interleaved"] > 0
    assert r["stage3"]["trainable_params"] == expected_stage3(rank_map)
    assert r["stage3"]["grad_bytes"] == 4 * expected_stage3(rank_map)
    assert r["rank_map"]["source"] == str(f)


@pytest.mark.mpi
def test_two_ranks_json_and_scaling_row(tmp_path):
    out = tmp_path / "bench.json"
    rows = tmp_path / "rows"
    run_mpi([sys.executable, "-m", "prelora_hpc.bench", "--preset", "toy", "--steps", "2",
             "--warmup", "2", "--json", str(out), "--scaling-row", "weak",
             "--json-row-dir", str(rows), "--peer", "ddp"], np=2, timeout=600)
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["global_batch"] == 8
    check_stage3_arithmetic(r, r["rank_map"]["ranks"])
    # Two ranks: DeepSpeed and DDP both average the gradients over ranks,
    # so the losses still agree; each also has a time without the reduction.
    check_peer_and_floor(r)
    for s in ("stage1", "stage3"):
        assert r["peer"][s]["compute_time_s"] > 0
    # On more than one rank the bandwidth is measured and the additive model
    # is compared with the measured step.
    assert r["network"]["bandwidth_source"] == "measured"
    for s in ("stage1", "stage3"):
        c = r["projection_check"][s]
        assert c["projected_step_s"] == pytest.approx(c["compute_s"] + c["projected_comm_s"])
        assert c["overlap"] == 0.0 and 0.0 <= c["hidden_fraction"] <= 1.0
        assert 0.0 <= r["projection_check"][f"peer_{s}"]["hidden_fraction"] <= 1.0
        assert r[s]["compute_time_s"] is not None
    for stage in (1, 3):
        row = json.loads((rows / f"weak-{stage}-n2.json").read_text())
        assert tuple(row) == SCALING_ROW_KEYS
        assert row["stage"] == stage and row["gpus"] == 2 and row["nodes"] == 1
        assert row["global_batch"] == 8
        assert row["allreduce_bytes_per_step"] == r[f"stage{stage}"]["allreduce_bytes_per_step"]
        assert row["images_per_s"] == pytest.approx(8 / row["step_time_s"])
        assert row["images_per_s_per_gpu"] == pytest.approx(row["images_per_s"] / 2)


@pytest.mark.mpi
def test_zero3_stage3_trains_the_adapters_as_ddp_does(tmp_path):
    """Under ZeRO-3, with every weight partitioned, the fused LoRA layer
    reads gathered weights (the engine marks LoRA layers as DeepSpeed leaf
    modules): stage 3's losses over the warm-up steps, which update the
    adapters, are the DDP peer's, which holds every weight whole."""
    out = tmp_path / "bench.json"
    run_mpi([sys.executable, "-m", "prelora_hpc.bench", "--preset", "toy", "--stages", "3",
             "--steps", "1", "--warmup", "4", "--no-floor", "--no-checks", "--peer", "ddp",
             "--json", str(out), "deepspeed.zero_stage=3",
             # Partition every weight, however small (the default keeps small
             # ones whole, which would hide a weight read without its gather).
             'deepspeed.extra={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}'],
            np=2, timeout=600)
    r = json.loads(out.read_text())
    assert r["zero_stage"] == 3
    ours, theirs = r["stage3"]["warmup_losses"], r["peer"]["stage3"]["warmup_losses"]
    assert len(ours) == 4 and len(set(ours)) == 4  # the adapters trained
    assert ours == pytest.approx(theirs, rel=1e-6)
