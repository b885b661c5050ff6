"""prelora-train that records, at each stage switch, every trainable
parameter's AdamW moments in the engine torn down and in the engine built
for the next stage, both read through DeepSpeed's own accessor.

Usage: mpiexec -n 2 python carried_moments.py OUT_DIR prelora-train-args...
Writes OUT_DIR/moments_rank{r}.pt: {"before": [...], "after": [...]}, one
{parameter name: {"exp_avg", "exp_avg_sq"}} per engine, in order.
"""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_optimizer_state
from mpi4py import MPI

import prelora_hpc
import prelora_hpc.train  # noqa: F401 - imported before the patch below, so it sees it
from prelora_hpc import cli
from prelora_hpc import engine as engine_mod
from prelora_hpc.checkpoint_policy import CheckpointManager

OUT = Path(sys.argv[1])
before, after = [], []


def moments(engine) -> dict:
    """Collective under ZeRO 3 (the accessor gathers the partitions)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            state = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            out[name] = {k: None if v is None else v.detach().float().clone()
                         for k, v in state.items()}
    return out


original_destroy = engine_mod.destroy_engine


def recording_destroy(engine):
    before.append(moments(engine))
    return original_destroy(engine)


# Wherever the trainer imported it from: it tears the old engine down
# before the model is reshaped for the next stage.
for name, module in list(sys.modules.items()):
    if name.startswith(prelora_hpc.__name__) and \
            getattr(module, "destroy_engine", None) is original_destroy:
        module.destroy_engine = recording_destroy

original_at_switch = CheckpointManager.at_switch


def recording_at_switch(self, engine, *args, **kw):
    # Called right after the rebuild, before any step of the new stage.
    after.append(moments(engine))
    return original_at_switch(self, engine, *args, **kw)


CheckpointManager.at_switch = recording_at_switch

code = cli.train_main(sys.argv[2:])
torch.save({"before": before, "after": after},
           OUT / f"moments_rank{MPI.COMM_WORLD.Get_rank()}.pt")
sys.exit(code)
