"""The stage machine on its own: every mode and every path, no MPI."""

import json

import pytest

from prelora_hpc.stages import Decision, Stage, StageMachine

LAYERS = ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
RANKS = {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 2}
WAIT = Decision(switch=False)
SWITCH = Decision(switch=True, rank_map=RANKS, reason="partial convergence over the last 3 windows")


def machine(mode="prelora", warmup=2):
    return StageMachine.for_run(mode, warmup, LAYERS, lora_rank=16)


def test_prelora_goes_1_then_2_for_the_warmup_then_3():
    m = machine(warmup=2)
    assert (m.stage, m.can_switch) == (Stage.FULL, True)
    assert m.after_window(WAIT, step=10) is None
    t = m.after_window(SWITCH, step=20)
    assert (t.to, t.step, t.from_full, t.reason) == (Stage.FULL_LORA, 20, True, SWITCH.reason)
    assert (m.stage, m.rank_map, m.switch_step, m.can_switch) == (Stage.FULL_LORA, RANKS, 20, False)
    assert m.after_window(WAIT, step=30) is None          # first warm-up window
    t = m.after_window(WAIT, step=40)                      # second: warm-up done
    assert (t.to, t.step, t.from_full) == (Stage.LORA, 40, False)
    assert "2 warm-up window(s)" in t.reason
    for step in (50, 60):
        assert m.after_window(WAIT, step) is None
    assert (m.stage, m.switch_step, m.rank_map) == (Stage.LORA, 20, RANKS)


def test_prelora_without_warmup_goes_straight_to_3():
    m = machine(warmup=0)
    t = m.after_window(SWITCH, step=7)
    assert (t.to, t.from_full, m.stage, m.switch_step) == (Stage.LORA, True, Stage.LORA, 7)
    assert m.after_window(WAIT, step=8) is None


def test_lora_trains_adapters_from_step_0_at_one_rank():
    m = machine("lora")
    assert (m.stage, m.can_switch) == (Stage.LORA, False)
    assert m.rank_map == {name: 16 for name in LAYERS}
    assert m.after_window(WAIT, step=5) is None and m.stage == Stage.LORA


def test_full_never_leaves_stage_1():
    m = machine("full")
    assert not m.can_switch
    for step in range(1, 20):
        assert m.after_window(WAIT, step) is None
    assert (m.stage, m.switch_step, m.rank_map) == (Stage.FULL, None, {})


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_switch_where_none_is_allowed_is_refused(mode):
    with pytest.raises(ValueError, match=f"switch decision .* of a '{mode}' run"):
        machine(mode).after_window(SWITCH, step=3)


def test_a_second_switch_decision_is_refused():
    m = machine(warmup=1)
    m.after_window(SWITCH, step=3)
    with pytest.raises(ValueError, match="stage 2"):
        m.after_window(SWITCH, step=4)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        StageMachine("half", 1)


@pytest.mark.parametrize("windows_before_save", [0, 1, 2])
def test_state_survives_a_checkpoint_and_continues_identically(windows_before_save):
    """Saved (through JSON, as a checkpoint's client state) after any window
    and restored into a fresh machine, it takes the same transitions."""
    script = [WAIT, SWITCH, WAIT, WAIT, WAIT, WAIT]
    straight, resumed = machine(warmup=3), machine(warmup=3)
    cut = 1 + windows_before_save
    for i, d in enumerate(script[:cut]):
        straight.after_window(d, i)
        resumed.after_window(d, i)
    fresh = machine(warmup=3)
    fresh.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    for i, d in enumerate(script[cut:], start=cut):
        assert fresh.after_window(d, i) == straight.after_window(d, i)
    assert fresh.state_dict() == straight.state_dict()
    assert fresh.stage == Stage.LORA
