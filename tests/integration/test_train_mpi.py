"""The three-stage trainer on real MPI ranks with real DeepSpeed engines (CPU, gloo)."""

import json
import re

import pytest
import torch

from mpi_util import run_mpi, script_cmd, train_cmd
from prelora_hpc.config import load_config
from run_helpers import read_metrics
from prelora_hpc.model import build_model, count_parameters
from prelora_hpc.stages import shape_for_stage

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    p = run_mpi(script_cmd("probe_stages.py", out))
    ranks = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in range(2)]
    return out, ranks, p.stdout


def test_both_ranks_pass_all_stages_with_the_same_rank_map_and_weights(probe):
    out, (r0, r1), log = probe
    assert r0["code"] == 0 and r0["stage"] == 3
    assert r0["rank_map"] and r0["rank_map"] == r1["rank_map"]
    assert r0["lora_ranks"] == r0["rank_map"] == r1["lora_ranks"]
    assert r0["param_sha256"] == r1["param_sha256"]
    switches = read_metrics(out, "switch")
    assert [s["stage"] for s in switches] == [2, 3]
    assert json.loads((out / "rank_map.json").read_text()) == r0["rank_map"]
    assert "switch to stage 2" in log and "switch to stage 3" in log


def test_stage3_freezes_base_bitwise_and_trains_adapters(probe):
    _, ranks, _ = probe
    for r in ranks:
        assert r["stage3_steps"] >= 3
        assert r["base_unchanged"], "a frozen base weight changed in stage 3"
        assert r["lora_changed"], "LoRA weights did not train in stage 3"


def test_engine_optimizer_holds_exactly_the_stage_trainable_set(probe):
    _, (r0, _), _ = probe
    for stage, (in_engine, requires_grad) in r0["engine_sets"].items():
        assert in_engine == requires_grad, f"stage {stage}"
    s3 = set(r0["engine_sets"]["3"][0])
    assert all(".base_layer." not in n for n in s3)
    assert any(".lora_A." in n for n in s3) and "head.weight" in s3
    assert len(set(r0["engine_sets"]["2"][0])) > len(set(r0["engine_sets"]["1"][0])) > len(s3)


def test_stage3_windows_show_what_the_effective_weight_still_moves(probe):
    out, _, log = probe
    windows = read_metrics(out, "window")
    stage3 = [w for w in windows if w["stage"] == 3]
    assert len(stage3) >= 2
    for w in stage3[1:]:
        # The base is frozen, but W0 + s B A moves: dW is not 0.000 %.
        assert any(abs(v) > 0 for v in w["dW"].values()), w["dW"]
        assert w["base_norms"] is not None and w["base_norms"] != w["norms"]
        assert w["du"] and all(v > 0 for v in w["du"].values())
    # The frozen base itself does not move across stage-3 windows.
    assert stage3[1]["base_norms"] == stage3[-1]["base_norms"]
    # Stage 1 tracks the base weights exactly as before: no adapters yet.
    assert all(w["base_norms"] is None for w in windows if w["stage"] == 1)
    assert "[stage 3 (LoRA only)] step" in log and "dW(eff)" in log


def test_stage3_trains_exactly_the_adapters_and_the_chosen_small_tensors(probe):
    """The stage-3 count the run logged and recorded, against a fresh model
    shaped for stage 3 with the run's rank map, and PEFT's r x (in + out)
    per adapter."""
    out, (r0, _), log = probe
    cfg = load_config(out / "config.yaml")
    rank_map = json.loads((out / "rank_map.json").read_text())
    fresh = build_model(cfg.model)
    linears = {n: m for n, m in fresh.named_modules() if n in rank_map}
    adapters = sum(r * (linears[n].in_features + linears[n].out_features)
                   for n, r in rank_map.items())
    model = shape_for_stage(fresh, 3, rank_map, cfg)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if ".lora_" in n) == adapters
    assert not any(".base_layer." in n for n in trainable)
    expected = sum(trainable.values())
    assert expected < count_parameters(model)
    last = read_metrics(out, "switch")[-1]
    assert last["stage"] == 3 and last["trainable_after"] == expected
    assert r0["trainable_count"] == expected
    assert f"-> {expected:,} (" in log


@pytest.mark.parametrize("case", ["rank0_converged", "rank1_converged"])
def test_rank0_decision_is_what_every_rank_does(tmp_path, case):
    run_mpi(script_cmd("decide_divergent.py", tmp_path, case))
    d0, d1 = (json.loads((tmp_path / f"decide_rank{r}.json").read_text()) for r in range(2))
    assert d0 == d1
    switched = [d["switch"] for d in d0]
    if case == "rank0_converged":
        # k = 3: the first test can run at window 3, and rank 0 saw no change.
        assert switched == [False, False, True, True]
        ranks = d0[2]["rank_map"]
        assert ranks["blocks.0.attn.qkv"] == 8 and ranks["blocks.1.attn.qkv"] == 2
    else:
        assert not any(switched)


@pytest.mark.compat
def test_three_rebuilds_do_not_grow_memory(tmp_path):
    """Resident memory after the 3rd rebuild stays within 64 MiB of the 1st
    (the model is ~50k parameters: any leak of engines or optimizer state
    across rebuilds would show as steady growth, see DeepSpeed #5674)."""
    p = run_mpi(script_cmd("rebuild_memory.py", tmp_path))
    rss = [json.loads((tmp_path / f"rss_rank{r}.json").read_text()) for r in range(2)]
    for series in rss:
        assert len(series) == 6
        growth = series[-1] - series[1]
        assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over rebuilds: {series}"


@pytest.mark.parametrize("zero_stage,overlap", [
    (1, "false"),
    pytest.param(2, "true", marks=pytest.mark.compat),
    pytest.param(3, "false", marks=pytest.mark.compat)])
def test_zero_stages_pass_all_stages_and_carry_optimizer_state(tmp_path, zero_stage, overlap):
    """ZeRO 1 reduces after the backward pass, ZeRO 2 here during it
    (overlap_comm, the GPU default): both through every rebuild, the frozen
    base never in a bucket. ZeRO-3 keeps its AdamW state on flat sub-group
    partitions outside the optimizer's groups; it is carried too. The
    moments are read through DeepSpeed's accessor from the engine torn down
    and from the one built for the next stage, before it steps."""
    p = run_mpi(script_cmd("carried_moments.py", tmp_path, *train_cmd(
        tmp_path, f"deepspeed.zero_stage={zero_stage}", "run.epochs=1",
        f"deepspeed.overlap_comm={overlap}")[1:]))
    assert [s["stage"] for s in read_metrics(tmp_path, "switch")] == [2, 3]
    kinds = {r["kind"] for r in read_metrics(tmp_path)}
    assert {"start", "window", "epoch", "end"} <= kinds
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "config.yaml").is_file()
    logged = [int(n) for n in re.findall(r"optimizer state carried for (\d+) tensors", p.stdout)]
    ranks = [torch.load(tmp_path / f"moments_rank{r}.pt", weights_only=False) for r in (0, 1)]
    rec = ranks[0]
    # Two rebuilds, then the last engine torn down at the end.
    assert len(rec["after"]) == 2 and len(rec["before"]) == 3
    for switch, (old, new) in enumerate(zip(rec["before"], rec["after"])):
        # LoRA wraps a layer: its weight becomes base_layer.weight.
        renamed = {n: n.replace(".base_layer.", ".") for n in new}
        kept = [n for n in new if renamed[n] in old]
        fresh = [n for n in new if renamed[n] not in old]
        assert kept and logged[switch] == len(kept), (switch, logged, len(kept))
        assert max(float(old[renamed[n]]["exp_avg"].abs().max()) for n in kept) > 0
        for n in kept:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[n][key], old[renamed[n]][key]), (switch, n, key)
        if switch == 0:
            # Only the new adapters are new, and they start from zero moments.
            assert fresh and all(".lora_" in n for n in fresh)
            for n in fresh:
                assert all(v is None or not v.any() for v in new[n].values()), n
        else:
            assert not fresh and not any(".base_layer." in n for n in new)
    # Every rank's engine holds the same state.
    for a, b in zip(rec["after"], ranks[1]["after"]):
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[n]["exp_avg"], b[n]["exp_avg"]) for n in a)


def test_compiled_model_trains_every_stage_like_eager_and_resumes(tmp_path):
    """``model.compile: true`` recompiles at each rebuild (stage 1, 2, 3),
    trains the same steps as eager (to float-reordering precision) and
    resumes from its checkpoints. One block 16 wide on 4 patches: compile
    time grows with the graph, and one block has every kind of layer.
    ``aot_eager``: dynamo traces and AOTAutograd splits each stage's graphs
    as under inductor, without C++ codegen (which is most of the cost here
    and gains nothing on the CPU); inductor runs in tests/integration/test_gpu.py."""
    common = ["model.depth=1", "model.embed_dim=16", "model.num_heads=1", "model.img_size=16",
              "run.max_steps=8", "logging.interval_steps=1", "optim.schedule=constant",
              "model.compile_backend=aot_eager"]
    run_mpi(train_cmd(tmp_path / "eager", *common))
    run_mpi(train_cmd(tmp_path / "compiled", *common, "model.compile=true"))
    eager = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "eager", "step")}
    compiled = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "compiled", "step")}
    assert sorted(compiled) == list(range(1, 9)) and sorted(eager) == sorted(compiled)
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-3), step
    assert [s["stage"] for s in read_metrics(tmp_path / "compiled", "switch")] == [2, 3]
    p = run_mpi(train_cmd(tmp_path / "compiled", *common, "run.max_steps=10",
                          "model.compile=true"))
    assert "resumed from" in p.stdout and "in stage 3 (LoRA only) at step 8" in p.stdout
    end = read_metrics(tmp_path / "compiled", "end")[-1]
    assert end["step"] == 10 and end["stage"] == 3
