"""The DeepSpeed config the engine is built from (no engine, no process group)."""

from __future__ import annotations

import pytest

from prelora_hpc.config import load_config
from prelora_hpc.engine import deepspeed_config


@pytest.mark.parametrize("zero,setting,device,expected", [
    (1, "auto", "cuda", True), (1, "auto", "cpu", False), (2, "auto", "cuda", True),
    (2, "true", "cpu", True), (2, "false", "cuda", False)])
def test_zero_1_2_overlap_the_reduction_on_gpus_unless_told(zero, setting, device, expected):
    cfg = load_config("configs/quickstart.yaml", [f"deepspeed.zero_stage={zero}",
                                                  f"deepspeed.overlap_comm={setting}"])
    z = deepspeed_config(cfg, 2, "fp32", device)["zero_optimization"]
    assert z["stage"] == zero and z["overlap_comm"] is expected
    assert z["contiguous_gradients"] is True


def test_zero_0_has_no_overlap_switch():
    cfg = load_config("configs/quickstart.yaml", ["deepspeed.overlap_comm=true"])
    assert deepspeed_config(cfg, 2, "fp32", "cuda")["zero_optimization"] == {"stage": 0}
