"""The stage machine: stage names, model shaping, and the switch policy that
the trainer and the replay both decide with (no MPI)."""

import numpy as np
import pytest
import timm
import torch
import torch.distributed as tdist

from prelora_hpc import replay as replay_mod
from prelora_hpc import train as train_mod
from prelora_hpc.config import config_from_dict
from prelora_hpc.convergence import (NormTracker, UpdateTracker, energy_rank, relative_update,
                                     top_singular_values, update_convergence)
from prelora_hpc.lora import inject_lora, lora_modules
from prelora_hpc.records import WindowRecord
from prelora_hpc.stages import (Stage, StageMachine, SwitchParams, SwitchPolicy, WindowStats,
                                shape_for_stage, stage_name)

MODULES = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10)


def _params(**kw):
    base = dict(tau=1.0, zeta=5.0, k=3, r_min=2, r_max=8)
    base.update(kw)
    return SwitchParams(**base)


def test_stage_names():
    assert [stage_name(s) for s in (1, 2, 3)] == [
        "stage 1 (full)", "stage 2 (full + LoRA)", "stage 3 (LoRA only)"]
    assert Stage(3) is Stage.LORA and Stage.LORA.display == "stage 3 (LoRA only)"


def test_shape_for_stage_injects_once_and_freezes_in_stage3(vit):
    cfg = config_from_dict({"prelora": {"stage3_trainable": ["head"]}})
    rank_map = {f"blocks.{l}.{m}": 2 for l in range(2) for m in MODULES}
    shape_for_stage(vit, 2, rank_map, cfg)
    assert len(lora_modules(vit)) == 8 and all(p.requires_grad for p in vit.parameters())
    shape_for_stage(vit, 3, rank_map, cfg)
    assert len(lora_modules(vit)) == 8  # not injected twice
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        f"{n}.{part}.weight" for n in rank_map for part in ("lora_A", "lora_B")}
    shape_for_stage(vit, 1, {}, cfg)
    assert all(p.requires_grad for p in vit.parameters())


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A real one-process gloo group: the trainer's decision is a broadcast."""
    init = tmp_path_factory.mktemp("pg") / "init"
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_trainer_and_replay_take_the_same_decisions_over_the_same_windows(vit, one_rank_group):
    """The same windows through the trainer's path (its policy, decided on
    rank 0 and broadcast, acted on by the stage machine) and through the
    replay of their records: the same tests, passes, switch and rank map."""
    cfg = config_from_dict({"prelora": {"tau": 0.5, "zeta": 1.0, "k": 3, "r_min": 2,
                                        "r_max": 8, "warmup_windows": 1}})
    dist = type("Dist", (), {"rank": 0, "world_size": 1, "is_main": True,
                             "device": torch.device("cpu")})()
    tracker, policy, _ = train_mod.build_switch(cfg, vit, dist)
    stages = StageMachine.for_run("prelora", 1, tracker.layer_names(), 16)
    windows = _norm_windows(layers=tracker.num_layers)
    trainer_side, switch = [], None
    for i, w in enumerate(windows):
        d = train_mod.decide_on_rank0(policy, w, stages.can_switch, is_main=True)
        trainer_side.append((d.tested, d.passed))
        t = stages.after_window(d, step=10 * (i + 1))
        if t is not None and t.from_full:
            switch = (i + 1, dict(stages.rank_map))
    records = [WindowRecord(window=i + 1, step=10 * (i + 1), epoch=0, stage=1, loss=w.loss,
                            dW={}, dL=None, tau=0.5, zeta=1.0, modules=MODULES,
                            norms=np.asarray(w.norms).tolist())
               for i, w in enumerate(windows)]
    result = replay_mod.replay(records, SwitchParams.from_config(cfg))
    assert [(c.decision.tested, c.decision.passed) for c in result.checks] == trainer_side
    assert switch is not None and (result.window, result.rank_map) == switch


def _norm_windows(layers=2):
    # Norms move 10 %, 5 %, then settle (0.1 %, 0.05 %); the loss flattens.
    scales = [1.0, 1.1, 1.155, 1.156155, 1.156733]
    losses = [2.0, 1.5, 1.4, 1.39, 1.389]
    out = []
    for t, (s, loss) in enumerate(zip(scales, losses)):
        norms = np.full((len(MODULES), layers), 10.0 * s)
        norms[:, 1] *= 1.0 + 0.001 * t  # layer 1 keeps moving a little more
        out.append(WindowStats(norms=norms, loss=loss))
    return out


def test_policy_switches_at_first_passing_window_with_algorithm2_ranks():
    policy = SwitchPolicy(_params(tau=0.5, zeta=1.0), MODULES, 2)
    decisions = [policy.observe(w, can_switch=True) for w in _norm_windows()]
    assert [d.switch for d in decisions] == [False, False, False, False, True]
    assert [d.tested for d in decisions] == [False, False, True, True, True]
    d = decisions[-1]
    assert "partial convergence over the last 3 windows" in d.reason
    # Layer 1 moved more in the last window: r_max; layer 0 r_min.
    assert d.rank_map["blocks.0.attn.qkv"] == 2 and d.rank_map["blocks.1.attn.qkv"] == 8


def test_policy_records_but_never_switches_when_not_allowed():
    policy = SwitchPolicy(_params(tau=100.0, zeta=100.0), MODULES, 2)
    decisions = [policy.observe(w, can_switch=False) for w in _norm_windows()]
    assert not any(d.switch or d.tested for d in decisions)
    assert decisions[-1].dW and decisions[-1].dL is not None
    assert policy.history.windows_seen == 5


def test_policy_min_windows_delays_the_test():
    policy = SwitchPolicy(_params(tau=100.0, zeta=100.0, min_windows=4), MODULES, 2)
    decisions = [policy.observe(w, can_switch=True) for w in _norm_windows()]
    assert [d.switch for d in decisions].index(True) == 3


def test_update_criterion_needs_k_minus_1_measured_updates_below_tau_update():
    policy = SwitchPolicy(_params(criterion="update", tau_update=0.5, zeta=100.0),
                          MODULES, 2)
    ones = np.ones((len(MODULES), 2))
    seq = [None, ones * 2.0, ones * 0.4, ones * 0.3, ones * 0.2]
    decisions = [policy.observe(WindowStats(norms=ones * 10, loss=1.0, updates=u), True)
                 for u in seq]
    # Window 3 keeps k=3 windows but its update history holds a 2 % window.
    assert [d.switch for d in decisions] == [False, False, False, True, True]
    assert decisions[3].switch and decisions[3].max_update == pytest.approx(0.4)
    assert "update test" in decisions[3].reason
    # An unmeasured window (after a resume) blocks the test until refilled.
    p2 = SwitchPolicy(_params(criterion="update", tau_update=0.5, zeta=100.0), MODULES, 2)
    for u in (ones * 0.1, None, ones * 0.1):
        d = p2.observe(WindowStats(norms=ones * 10, loss=1.0, updates=u), True)
    assert not d.switch


def test_energy_rank_rule_takes_the_recorded_ranks():
    policy = SwitchPolicy(_params(tau=100.0, zeta=100.0, k=2, rank_rule="energy"), MODULES, 2)
    ranks = np.array([[2, 4], [8, 2], [4, 4], [2, 8]])
    ones = np.ones((len(MODULES), 2))
    policy.observe(WindowStats(norms=ones, loss=1.0), True)
    d = policy.observe(WindowStats(norms=ones, loss=1.0, updates=ones, energy_ranks=ranks), True)
    assert d.switch and d.rank_map["blocks.1.attn.qkv"] == 4 and d.rank_map["blocks.0.attn.proj"] == 8


def test_policy_state_round_trip_and_old_tracker_state():
    policy = SwitchPolicy(_params(tau=0.5, zeta=1.0), MODULES, 2)
    windows = _norm_windows()
    for w in windows[:4]:
        policy.observe(w, True)
    restored = SwitchPolicy(_params(tau=0.5, zeta=1.0), MODULES, 2)
    restored.load_state_dict(policy.state_dict())
    assert restored.observe(windows[4], True) == policy.observe(windows[4], True)
    old = SwitchPolicy(_params(tau=0.5, zeta=1.0), MODULES, 2)
    old.load_state_dict(restored.history.state_dict())  # a "tracker" entry of old checkpoints
    assert old.history.history() == restored.history.history()


def test_switch_params_parse_new_knobs():
    base = _params()
    p = SwitchParams.parse("criterion=update,tau_update=0.2,rank_rule=energy,energy=0.8", base)
    assert (p.criterion, p.tau_update, p.rank_rule, p.energy) == ("update", 0.2, "energy", 0.8)
    with pytest.raises(ValueError, match="criterion"):
        SwitchParams.parse("criterion=loss", base)


# ------------------------------------------------------- update statistics

def test_relative_update_and_energy_rank():
    prev = torch.ones(4, 4)
    assert relative_update(prev, prev) == 0.0
    assert relative_update(prev, prev * 1.01) == pytest.approx(1.0)
    # Energy 9, 4, 1, 0.01 (sum 14.01): rank 2 holds 92.8 %, rank 1 64 %.
    s = [3.0, 2.0, 1.0, 0.1]
    assert energy_rank(s, 0.9, 1, 8) == 2
    assert energy_rank(s, 0.6, 1, 8) == 1
    assert energy_rank(s, 0.9, 4, 8) == 4  # never below r_min
    assert energy_rank(s, 1.0, 1, 2) == 2  # capped at r_max
    assert energy_rank([0.0, 0.0], 0.9, 2, 8) == 2


def test_update_convergence_is_a_threshold_on_every_window_and_the_loss():
    assert update_convergence({"a": [0.5, 0.4]}, [1.0, 1.0, 1.0], 0.5, 0.0)
    assert not update_convergence({"a": [0.5, 0.6]}, [1.0, 1.0, 1.0], 0.5, 0.0)
    assert not update_convergence({"a": [0.1, 0.1]}, [1.0, 1.0, 1.2], 0.5, 10.0)
    with pytest.raises(ValueError, match="one fewer"):
        update_convergence({"a": [0.1]}, [1.0, 1.0, 1.0], 0.5, 0.0)


def test_effective_sumsq_equals_dense_merged_weight(vit):
    rank_map = {f"blocks.{l}.{m}": 4 for l in range(2) for m in MODULES}
    tracker = NormTracker(vit, MODULES)
    base = tracker.local_sumsq()
    assert torch.equal(tracker.local_effective_sumsq(), base)  # no adapters: the base
    inject_lora(vit, rank_map, alpha=8.0)
    for m in lora_modules(vit).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    eff = tracker.local_effective_sumsq()
    for i, mod in enumerate(MODULES):
        for l in range(2):
            dense = lora_modules(vit)[f"blocks.{l}.{mod}"].merged_weight().double()
            assert eff[i, l].item() == pytest.approx(dense.pow(2).sum().item(), rel=1e-6)
    assert torch.allclose(tracker.local_sumsq(), base)  # base norms unchanged


def test_update_tracker_splits_layers_over_ranks_and_sums_to_the_whole(vit):
    tracker = NormTracker(vit, MODULES)
    per_rank = [UpdateTracker(tracker, r, 3, energy=0.9, r_min=2, r_max=8) for r in range(3)]
    owned = sorted(x for u in per_rank for x in u.owned)
    assert owned == sorted((i, l) for i in range(4) for l in range(2))
    first = sum(u.local_stats() for u in per_rank)
    assert not first[2].any()  # nothing to compare with at the first window
    with torch.no_grad():
        for p in vit.parameters():
            p.mul_(1.02)
    second = sum(u.local_stats() for u in per_rank)
    assert (second[2] == 1).all()
    assert torch.allclose(second[0], torch.full((4, 2), 2.0, dtype=torch.float64))
    # The update is 0.02 W: its energy rank is the weight's, from an exact SVD.
    for i, mod in enumerate(MODULES):
        for l in range(2):
            w = vit.get_submodule(f"blocks.{l}.{mod}").weight.detach().double() / 1.02
            exact = torch.linalg.svdvals(0.02 * w).numpy()
            assert second[1, i, l] == energy_rank(exact, 0.9, 2, 8), (mod, l)


def test_update_tracker_state_round_trip_measures_the_same_next_window(vit):
    tracker = NormTracker(vit, MODULES)
    a = UpdateTracker(tracker, 0, 2, energy=0.9, r_min=2, r_max=8)
    a.local_stats()
    saved = a.state_dict()
    b = UpdateTracker(tracker, 0, 2, energy=0.9, r_min=2, r_max=8)
    b.load_state_dict(saved)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01)
    assert torch.equal(a.local_stats(), b.local_stats())
    other = UpdateTracker(tracker, 1, 2)
    with pytest.raises(ValueError, match="belongs to another rank"):
        other.load_state_dict(saved)


def test_randomized_top_singular_values_give_the_exact_energy_rank():
    gen = torch.Generator().manual_seed(1)
    # A rank-6 update plus small noise, 256 x 128: the top values are
    # recovered, and the energy rank matches the exact SVD's.
    u = torch.randn(256, 6, generator=gen)
    v = torch.randn(6, 128, generator=gen)
    d = u @ v + 0.01 * torch.randn(256, 128, generator=gen)
    exact = torch.linalg.svdvals(d)
    approx = top_singular_values(d, 24, torch.Generator().manual_seed(0))
    assert approx.shape == (24,)
    assert torch.allclose(approx[:6], exact[:6], rtol=1e-3)
    total = float(d.pow(2).sum())
    for share in (0.5, 0.9, 0.99):
        assert energy_rank(approx.numpy(), share, 1, 16, total) == \
            energy_rank(exact.numpy(), share, 1, 16)
    # q at the smaller dimension: the exact values.
    assert torch.allclose(top_singular_values(d, 128, gen), exact)
