"""Algorithm 1, Algorithm 2 and the norm tracker, on hand-computed numbers and
a tiny real timm ViT."""

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from prelora_hpc.convergence import (
    NormTracker,
    WindowHistory,
    assign_ranks,
    partial_convergence,
    percent_change,
    window_changes,
)
from prelora_hpc.engine import local_part

MODULES = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


# ---------------------------------------------------------------- Algorithm 1

def test_percent_change_is_relative_to_previous_window():
    # (201 - 200) / 200 * 100 = 0.5; (150 - 200) / 200 * 100 = -25
    assert percent_change(200.0, 201.0, "x") == 0.5
    assert percent_change(200.0, 150.0, "x") == -25.0


@pytest.mark.parametrize("prev,cur", [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, math.inf)])
def test_percent_change_rejects_undefined_changes_naming_the_quantity(prev, cur):
    with pytest.raises(ValueError, match="loss of window 3"):
        percent_change(prev, cur, "loss of window 3")


def test_change_exactly_tau_passes_and_just_above_fails():
    # 200 -> 201 is exactly 0.5 %; loss flat (0 %).
    norms, losses = {"attn.qkv": [200.0, 201.0]}, [2.0, 2.0]
    assert partial_convergence(norms, losses, tau=0.5, zeta=0.0)
    assert not partial_convergence(norms, losses, tau=0.49, zeta=0.0)
    # 100 -> 107 is 7 / 100 * 100 = 7 %, which must not round above tau = 7.
    assert percent_change(100.0, 107.0, "x") == 7.0
    assert partial_convergence({"attn.qkv": [100.0, 107.0]}, [2.0, 2.0], tau=7.0, zeta=0.0)


def test_every_window_pair_is_tested():
    # 100 -> 100.5 is 0.5 %, 100.5 -> 101 is 0.5 / 100.5 * 100 = 0.4975... %
    norms, losses = {"mlp.fc1": [100.0, 100.5, 101.0]}, [1.0, 1.0, 1.0]
    d_norm, d_loss = window_changes(norms, losses)
    assert d_norm["mlp.fc1"] == pytest.approx([0.5, 50.0 / 100.5])
    assert d_loss == [0.0, 0.0]
    assert partial_convergence(norms, losses, tau=0.5, zeta=1.0)
    assert not partial_convergence(norms, losses, tau=0.49, zeta=1.0)
    # Only the last pair moves (101 -> 102.01 is 1 %): still caught.
    late = {"mlp.fc1": [101.0, 101.0, 102.01]}
    assert not partial_convergence(late, losses, tau=0.9, zeta=1.0)


def test_shrinking_norm_counts_by_magnitude():
    # 200 -> 199 is -0.5 %.
    norms, losses = {"attn.proj": [200.0, 199.0]}, [3.0, 3.0]
    assert window_changes(norms, losses)[0]["attn.proj"] == [-0.5]
    assert partial_convergence(norms, losses, tau=0.5, zeta=0.0)
    assert not partial_convergence(norms, losses, tau=0.49, zeta=0.0)


def test_loss_jump_fails_on_zeta_even_with_settled_norms():
    norms = {"attn.qkv": [10.0, 10.0, 10.0]}
    # 4 -> 4.25 is 0.25 / 4 * 100 = 6.25 %; a drop 4 -> 3 is -25 %.
    assert not partial_convergence(norms, [4.0, 4.0, 4.25], tau=0.0, zeta=5.0)
    assert partial_convergence(norms, [4.0, 4.0, 4.25], tau=0.0, zeta=6.25)
    assert not partial_convergence(norms, [4.0, 3.0, 3.0], tau=0.0, zeta=20.0)


def test_one_unsettled_module_fails_the_test():
    norms = {"attn.qkv": [200.0, 200.0], "mlp.fc2": [200.0, 202.0]}  # 0 % and 1 %
    assert not partial_convergence(norms, [1.0, 1.0], tau=0.5, zeta=0.0)
    assert partial_convergence(norms, [1.0, 1.0], tau=1.0, zeta=0.0)


@pytest.mark.parametrize("norms,losses,tau,zeta,message", [
    ({}, [1.0, 1.0], 1.0, 1.0, "weight_norms is empty"),
    ({"a": [1.0]}, [1.0], 1.0, 1.0, "at least 2 windows"),
    ({"a": [1.0, 1.0, 1.0]}, [1.0, 1.0], 1.0, 1.0, r"weight_norms\['a'\] has 3 windows"),
    ({"a": [1.0, 0.0, 1.0]}, [1.0, 1.0, 1.0], 1.0, 1.0, r"weight_norms\['a'\] window 1->2"),
    ({"a": [1.0, 1.0]}, [-2.0, 1.0], 1.0, 1.0, "losses window 0->1"),
    ({"a": [1.0, 1.0, 1.0]}, [1.0, 1.0, math.nan], 1.0, 1.0, r"losses\[2\]"),
    ({"a": [1.0, math.inf]}, [1.0, 1.0], 1.0, 1.0, r"weight_norms\['a'\]\[1\]"),
    ({"a": [1.0, 1.0]}, [1.0, 1.0], -0.1, 1.0, "tau"),
    ({"a": [1.0, 1.0]}, [1.0, 1.0], 1.0, -0.1, "zeta"),
])
def test_partial_convergence_rejects_invalid_input(norms, losses, tau, zeta, message):
    with pytest.raises(ValueError, match=message):
        partial_convergence(norms, losses, tau, zeta)


# ---------------------------------------------------------------- Algorithm 2

def test_ranks_follow_normalised_change():
    # R = [4, 8, 16, 32]; v = [0, .25, .5, .75, 1]; v * 4 = [0, 1, 2, 3, 4]
    # i = [0 (v = 0), 1-1, 2-1, 3-1, 4-1] = [0, 0, 1, 2, 3]
    assert assign_ranks({"attn.qkv": [0.0, 1.0, 2.0, 3.0, 4.0]}, 4, 32) == {
        "attn.qkv": [4, 4, 8, 16, 32]}


def test_ranks_with_three_rank_levels():
    # R = [8, 16, 32]; v = [0, 1/6, 1/4, 1/2, 1]; v * 3 = [0, .5, .75, 1.5, 3]
    # ceil - 1 = [-, 0, 0, 1, 2]
    assert assign_ranks({"m": [0.0, 1.0, 1.5, 3.0, 6.0]}, 8, 32) == {"m": [8, 8, 8, 16, 32]}


def test_negative_changes_use_magnitude():
    # |[0, -1, 2, -3, 4]| = [0, 1, 2, 3, 4], as in the first case.
    assert assign_ranks({"m": [0.0, -1.0, 2.0, -3.0, 4.0]}, 4, 32) == {"m": [4, 4, 8, 16, 32]}
    assert assign_ranks({"m": [-3.0, 3.0]}, 4, 32) == {"m": [4, 4]}


def test_largest_change_gets_r_max_and_smallest_r_min():
    # Min and max are not round numbers: v is exactly 0 and 1 all the same.
    # R = [8, 16, 32, 64]; v(0.3) = 0.2 / 0.6 = 1/3; v * 4 = 1.33; ceil - 1 = 1 -> 16
    assert assign_ranks({"m": [0.3, 0.1, 0.7]}, 8, 64) == {"m": [16, 8, 64]}


def test_all_equal_changes_give_r_min():
    assert assign_ranks({"m": [2.5, 2.5, 2.5]}, 8, 64) == {"m": [8, 8, 8]}


def test_single_layer_gets_r_min():
    assert assign_ranks({"m": [7.0]}, 8, 64) == {"m": [8]}


def test_equal_r_min_and_r_max_gives_that_rank_everywhere():
    assert assign_ranks({"m": [0.0, 1.0, 5.0]}, 16, 16) == {"m": [16, 16, 16]}


def test_modules_are_normalised_independently():
    ranks = assign_ranks({"a": [0.0, 10.0], "b": [0.0, 0.1]}, 4, 8)
    assert ranks == {"a": [4, 8], "b": [4, 8]}


@pytest.mark.parametrize("changes,r_min,r_max,message", [
    ({"m": [1.0]}, 12, 32, "r_min must be a power of two, got 12"),
    ({"m": [1.0]}, 4, 0, "r_max must be a power of two, got 0"),
    ({"m": [1.0]}, 32, 4, "r_min=32 > r_max=4"),
    ({}, 4, 8, "changes is empty"),
    ({"m": [1.0], "n": []}, 4, 8, r"changes\['n'\] has no layers"),
    ({"m": [1.0, math.nan]}, 4, 8, r"changes\['m'\]\[1\]"),
])
def test_assign_ranks_rejects_invalid_input(changes, r_min, r_max, message):
    with pytest.raises(ValueError, match=message):
        assign_ranks(changes, r_min, r_max)


# ------------------------------------------------- NormTracker and WindowHistory

@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10)


def test_local_sumsq_is_squared_frobenius_norm_of_each_layer(vit):
    tracker = NormTracker(vit, MODULES)
    assert tracker.module_names == MODULES and tracker.num_layers == 2
    assert not tracker.sharded
    sumsq = tracker.local_sumsq()
    assert sumsq.dtype == torch.float64 and sumsq.device.type == "cpu"
    assert sumsq.shape == (4, 2)
    for i, module in enumerate(MODULES):
        for layer in range(2):
            name = tracker.layer_name(module, layer)
            assert name == f"blocks.{layer}.{module}"
            weight = vit.get_submodule(name).weight
            assert sumsq[i, layer].item() == pytest.approx(
                torch.linalg.norm(weight).item() ** 2, rel=1e-5)


def test_scaled_layer_shows_ten_percent_and_gets_r_max(vit):
    tracker = NormTracker(vit, MODULES)
    history = WindowHistory(MODULES, tracker.num_layers, k=3)
    history.record(tracker.local_sumsq().sqrt(), loss=2.0)
    with torch.no_grad():
        vit.blocks[1].mlp.fc1.weight.mul_(1.1)  # Frobenius norm scales by 1.1: +10 %
    history.record(tracker.local_sumsq().sqrt(), loss=1.9)
    changes = history.layer_changes()
    assert changes["mlp.fc1"][1] == pytest.approx(10.0, rel=1e-4)
    untouched = [c for m in MODULES for l, c in enumerate(changes[m]) if (m, l) != ("mlp.fc1", 1)]
    assert untouched == [0.0] * 7
    ranks = assign_ranks(changes, 4, 32)
    assert ranks["mlp.fc1"] == [4, 32]
    assert all(ranks[m] == [4, 4] for m in MODULES if m != "mlp.fc1")
    flat = history.rank_map(ranks)
    assert flat["blocks.1.mlp.fc1"] == 32 and flat["blocks.0.attn.qkv"] == 4
    assert len(flat) == 8


def _window(t):
    # norm of module i, layer l at window t: (t + 1) * (i + 1) * (l + 1)
    return np.array([[(t + 1) * (i + 1) * (l + 1) for l in range(2)] for i in range(4)], float)


def test_history_keeps_last_k_layer_averaged_windows():
    tracker = WindowHistory(MODULES, 2, k=3)
    for t in range(5):
        assert tracker.ready == (t >= 3)
        tracker.record(_window(t), loss=float(t + 1))
    assert tracker.ready and tracker.windows_seen == 5
    norms, losses = tracker.history()
    # Kept windows t = 2, 3, 4; layer mean of (t+1)(i+1)(l+1) over l = 0, 1 is (t+1)(i+1) * 1.5.
    assert losses == [3.0, 4.0, 5.0]
    assert list(norms) == MODULES
    for i, module in enumerate(MODULES):
        assert norms[module] == pytest.approx([(t + 1) * (i + 1) * 1.5 for t in (2, 3, 4)])
    # Last step 4 -> 5 is +25 % for every layer.
    assert all(c == pytest.approx([25.0, 25.0]) for c in tracker.layer_changes().values())


def test_history_feeds_partial_convergence(vit):
    norms = NormTracker(vit, MODULES).local_sumsq().sqrt()
    tracker = WindowHistory(MODULES, 2, k=2)
    tracker.record(norms, loss=2.0)
    tracker.record(norms, loss=2.0)
    assert partial_convergence(*tracker.history(), tau=0.0, zeta=0.0)
    tracker.record(norms * 1.02, loss=2.0)  # every norm +2 %
    assert not partial_convergence(*tracker.history(), tau=1.0, zeta=0.0)


def test_state_dict_round_trips_through_json():
    tracker = WindowHistory(MODULES, 2, k=3)
    for t in range(4):
        tracker.record(_window(t) * 1.1, loss=1.0 / (t + 3))
    restored = WindowHistory(MODULES, 2, k=3)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.history() == tracker.history()
    assert restored.layer_changes() == tracker.layer_changes()
    assert restored.windows_seen == 4 and restored.ready
    other = WindowHistory(["attn.qkv"], 2, k=3)
    with pytest.raises(ValueError, match="saved norm history"):
        other.load_state_dict(tracker.state_dict())


class _Wrapped(nn.Module):
    """The shape of a LoRA wrapper: original layer kept as base_layer."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_wrapped_module_is_tracked_through_its_base_weight(vit):
    tracker = NormTracker(vit, MODULES)
    before = tracker.local_sumsq()
    vit.blocks[0].attn.qkv = _Wrapped(vit.blocks[0].attn.qkv)
    with torch.no_grad():
        vit.blocks[0].attn.qkv.lora_B.weight.fill_(5.0)  # adapters must not count
    after = tracker.local_sumsq()
    assert torch.equal(before, after)
    fresh = NormTracker(vit, MODULES)
    assert torch.equal(fresh.local_sumsq(), before)


def test_zero3_partitions_sum_to_the_full_sumsq(vit):
    tracker = NormTracker(vit, MODULES, local_part=local_part)
    weight = vit.blocks[1].attn.proj.weight
    full = torch.linalg.norm(weight).item() ** 2
    flat = weight.detach().flatten()
    half = flat.numel() // 2
    partials = []
    for part in (flat[:half], flat[half:]):  # what two ranks would each hold
        weight.ds_tensor = part.clone()
        assert tracker.sharded
        partials.append(tracker.local_sumsq()[1, 1].item())
    assert partials[0] == pytest.approx((flat[:half] ** 2).sum().item(), rel=1e-5)
    assert sum(partials) == pytest.approx(full, rel=1e-5)


def test_missing_module_is_named(vit):
    with pytest.raises(ValueError, match="'attn.nope'.*blocks.0.attn.nope"):
        NormTracker(vit, ["attn.qkv", "attn.nope"])
    del vit.blocks[1].mlp.fc2
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2"):
        NormTracker(vit, MODULES)


def test_record_rejects_bad_windows():
    tracker = WindowHistory(MODULES, 2, k=3)
    with pytest.raises(ValueError, match=r"expected shape \(4, 2\)"):
        tracker.record(np.ones((2, 4)), loss=1.0)
    bad = np.ones((4, 2))
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1"):
        tracker.record(bad, loss=1.0)
    with pytest.raises(ValueError, match="loss"):
        tracker.record(np.ones((4, 2)), loss=0.0)
    assert tracker.windows_seen == 0
    tracker.record(np.ones((4, 2)), loss=1.0)
    with pytest.raises(ValueError, match="2 recorded windows"):
        tracker.layer_changes()
