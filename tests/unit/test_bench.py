"""prelora-bench without a process group: presets, the rank maps, the
parameter arithmetic against the rank map's own (sum over adapted layers of
r x (in + out), plus the kept norms, pos_embed, cls_token and head), the
ring all-reduce model and the projection, the command line's usage errors,
and the scaling rows and count it prints. The runs themselves are in
tests/integration/test_bench.py.
"""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

from prelora_hpc.bench import main
from prelora_hpc.bench.cost import (PROJECTION_NODES, allreduce_time, count_only, hidden_fraction,
                                    load_rank_map, project, representative_rank_map,
                                    ring_allreduce_traffic)
from prelora_hpc.bench.output import format_count, scaling_row
from prelora_hpc.bench.presets import BENCH_FIXED, load_preset, preset_names
from prelora_hpc.config import ConfigError, load_config
from prelora_hpc.model import build_model
from prelora_hpc.records import SCALING_ROW_KEYS, ScalingRow

TOY = list(load_preset("toy").overrides) + BENCH_FIXED


def toy_model() -> nn.Module:
    return build_model(load_config(None, TOY).model)


def expected_stage3(rank_map: dict[str, int]) -> int:
    """Adapters r x (in + out) per adapted layer, plus what stage 3 keeps by
    default: every LayerNorm, pos_embed, cls_token and the head."""
    model = toy_model()
    adapters = sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
                   for n, r in rank_map.items())
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters())
    kept = norms + model.pos_embed.numel() + model.cls_token.numel() + \
        sum(p.numel() for p in model.head.parameters())
    return adapters + kept


# --------------------------------------------------------------------------- presets


def test_shipped_presets_load_and_make_valid_configs():
    assert preset_names() == ["cpu-small", "toy", "vit-large"]
    for name in preset_names():
        p = load_preset(name)
        assert p.name == name and p.steps >= 1 and p.warmup >= 1 and p.window_steps >= 1
        load_config(None, list(p.overrides) + BENCH_FIXED)  # every override is a real key
    toy = load_preset("toy")
    assert (toy.steps, toy.warmup, toy.window_steps) == (3, 1, 50)
    assert "deepspeed.micro_batch_size=4" in toy.overrides
    assert load_preset("vit-large").window_steps == 313


def test_preset_from_a_yaml_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("description: mine\nsteps: 2\nwarmup: 1\nwindow_steps: 10\n"
                 "overrides: [model.depth=1]\n")
    p = load_preset(str(f))
    assert p.name == str(f) and p.overrides == ("model.depth=1",) and p.steps == 2


def test_preset_with_an_unknown_key_names_the_key_and_the_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("description: x\nsteps: 2\nwarmup: 1\nwindow_steps: 10\nwarmpu: 3\n"
                 "overrides: []\n")
    with pytest.raises(ConfigError) as e:
        load_preset(str(f))
    assert "'warmpu'" in str(e.value) and str(f) in str(e.value)


def test_preset_errors_name_the_problem(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("description: x\nsteps: 0\nwarmup: 1\nwindow_steps: 10\noverrides: []\n")
    with pytest.raises(ConfigError, match=r"steps must be >= 1"):
        load_preset(str(f))
    f.write_text("description: x\nsteps: 1\nwarmup: 1\noverrides: []\n")
    with pytest.raises(ConfigError, match=r"missing key 'window_steps'"):
        load_preset(str(f))
    with pytest.raises(ConfigError, match=r"no such preset \(shipped: cpu-small, toy, vit-large\)"):
        load_preset("tiny")


# --------------------------------------------------------------------------- rank maps


def test_representative_rank_map_is_algorithm_2():
    mods = ["attn.qkv", "mlp.fc1"]
    a = representative_rank_map(24, mods, 8, 64, seed=3)
    assert a == representative_rank_map(24, mods, 8, 64, seed=3)
    assert len(a) == 48 and set(a.values()) <= {8, 16, 32, 64}
    for m in mods:
        layer_ranks = [a[f"blocks.{l}.{m}"] for l in range(24)]
        # min-max normalization: the most settled layer gets r_min, the most
        # changing one r_max.
        assert min(layer_ranks) == 8 and max(layer_ranks) == 64


def test_rank_map_from_an_earlier_bench_result(tmp_path):
    ranks = {"blocks.0.attn.qkv": 8, "blocks.1.mlp.fc2": 2}
    f = tmp_path / "bench.json"
    f.write_text(json.dumps({"preset": "toy", "rank_map": {"source": "x", "ranks": ranks}}))
    assert load_rank_map(f) == ranks


def test_rank_map_file_errors(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"blocks.0.attn.qkv": 0}))
    with pytest.raises(ValueError, match="positive int"):
        load_rank_map(f)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="non-empty object"):
        load_rank_map(f)


# --------------------------------------------------------------------------- arithmetic


def test_ring_model_arithmetic():
    assert ring_allreduce_traffic(1000, 1) == 0
    assert ring_allreduce_traffic(1000, 2) == 1000
    assert ring_allreduce_traffic(1000, 4) == 1500
    # 1 GB over 8 ranks at 200 Gb/s: 2 * 7/8 * 8e9 bits / 2e11 b/s = 0.07 s;
    # plus 2 calls x 2 log2(8) hops x 10 us.
    t = allreduce_time(1e9, 8, 200.0, 10e-6, calls=2)
    assert t == pytest.approx(0.07 + 2 * 6 * 10e-6)
    stage = {"compute_time_s": 0.1, "allreduce_bytes_per_step": 1e9, "allreduce_calls_per_step": 1}
    rows = project(stage, 16, 200.0, 0.0, gpus_per_node=4, nodes=[1, 2, 512])
    assert rows[0]["efficiency"] == 1.0
    assert rows[0]["images_per_s"] == pytest.approx(4 * 16 / (0.1 + 2 * 3 / 4 * 8e9 / 2e11))
    assert rows[1]["efficiency"] < 1.0 and rows[2]["efficiency"] < rows[1]["efficiency"]
    # The overlap term: the hidden share of the all-reduce leaves the step.
    comm = rows[1]["comm_time_s"]
    half = project(stage, 16, 200.0, 0.0, gpus_per_node=4, nodes=[2], overlap=0.5)[0]
    assert half["step_time_s"] == pytest.approx(0.1 + 0.5 * comm)
    assert half["hidden_comm_s"] == pytest.approx(0.5 * comm)
    assert hidden_fraction(0.1 + comm, 0.1, comm) == 0.0
    assert hidden_fraction(0.1 + 0.25 * comm, 0.1, comm) == pytest.approx(0.75)
    assert hidden_fraction(0.05, 0.1, comm) == 1.0 and hidden_fraction(0.5, 0.1, 0.0) == 0.0
    default = project(stage, 16, 200.0, 0.0)
    assert [row["nodes"] for row in default] == PROJECTION_NODES
    assert [row["gpus"] for row in default] == [4 * n for n in PROJECTION_NODES]


def test_count_only_matches_arithmetic_and_reference_is_under_ten_percent():
    cfg = load_config(None, TOY)
    rm = representative_rank_map(2, cfg.lora.target_modules, 2, 8)
    c = count_only(cfg, rm)
    assert c["stage1_trainable"] == sum(p.numel() for p in toy_model().parameters())
    assert c["rank_map"]["stage3_trainable"] == expected_stage3(rm)
    assert c["all_r_max"]["stage3_trainable"] == expected_stage3({k: 8 for k in rm})
    # fp32: 4 bytes per trainable scalar on the wire.
    assert c["rank_map"]["grad_bytes"] == 4 * expected_stage3(rm)
    # The reference model (ViT-L/16, 224 px, 1000 classes) at ranks 8..64:
    # even with every layer at r_max stage 3 trains under 10% of stage 1.
    ref = load_config(None, list(load_preset("vit-large").overrides))
    rm = representative_rank_map(24, ref.lora.target_modules, 8, 64)
    c = count_only(ref, rm)
    assert c["stage1_trainable"] > 300_000_000
    assert c["rank_map"]["trainable_fraction"] < c["all_r_max"]["trainable_fraction"] < 0.10
    # bf16: gradients travel in 2 bytes.
    assert c["grad_element_bytes"] == 2 and c["stage1_grad_bytes"] == 2 * c["stage1_trainable"]
    text = format_count(c)
    assert f"{c['stage1_trainable']:,} parameters trained in stage 1" in text
    assert "every layer at r_max" in text


# --------------------------------------------------------------------------- output


def test_scaling_row_has_exactly_the_report_keys():
    result = {"world_size": 2, "nodes": 1, "global_batch": 8, "device": "cpu (x86_64, 2 cores)",
              "stage3": {"step_time_s": 0.5, "allreduce_bytes_per_step": 1000,
                         "peak_memory_bytes": 2**20}}
    row = scaling_row(result, 3, "weak")
    assert tuple(row) == SCALING_ROW_KEYS
    assert row["images_per_s"] == pytest.approx(16.0) and row["images_per_s_per_gpu"] == 8.0
    assert ScalingRow.from_json(json.loads(json.dumps(row))).gpus == 2


# --------------------------------------------------------------------------- command line


def test_cli_usage_errors(capsys, tmp_path):
    assert main(["--scaling-row", "weak"]) == 2
    assert main(["--preset", "toy", "--stages", "2"]) == 2
    assert main(["--preset", "nosuch"]) == 2
    assert "no such preset" in capsys.readouterr().err
    f = tmp_path / "typo.yaml"
    f.write_text("description: x\nsteps: 1\nwarmup: 1\nwindow_steps: 1\nsteps_: 1\noverrides: []\n")
    assert main(["--preset", str(f), "--count-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'steps_'" in err and str(f) in err


def test_cli_count_only(capsys):
    assert main(["--preset", "toy", "--count-only"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "every layer at r_max" in out
