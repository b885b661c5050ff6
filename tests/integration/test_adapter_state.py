"""Optimizer state across the switch: new adapters start as fresh AdamW
parameters (step 0, at their own learning rate); carried ones keep theirs."""

import json

import pytest

from mpi_util import run_mpi, script_cmd

pytestmark = [pytest.mark.mpi, pytest.mark.compat]


@pytest.mark.parametrize("zero", [0, 1])
def test_new_adapter_first_update_equals_fresh_adamw(tmp_path, zero):
    run_mpi(script_cmd("adapter_first_update.py", tmp_path, zero), timeout=240)
    for rank in range(2):
        r = json.loads((tmp_path / f"first_update_rank{rank}.json").read_text())
        assert r["tensors"] == 16  # 2 blocks x 4 modules x (A, B)
        assert r["max_update"] > 1e-4  # the comparison is not of two no-ops
        # Same gradient, same hyper-parameters at lr x lr_scale (x lr_ratio_b
        # for B): the engine's first adapter update is a fresh AdamW's.
        assert r["max_error"] <= 1e-5 * r["max_update"]
        # Adapters took their first step; the carried base its fourth.
        assert r["steps"] == [1, 4]
