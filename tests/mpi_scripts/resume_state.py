"""Resume checkpoints with the trainer and record what each resume loaded.

Usage: mpiexec -n N python resume_state.py OUT_DIR CHECKPOINT [CHECKPOINT ...] [-- overrides...]
Each checkpoint (a tag directory; one may repeat) is resumed by a fresh
Trainer of configs/vit_tiny_cpu.yaml on N ranks, as prelora-train does, and
nothing is trained. Rank 0 writes OUT_DIR/resumed.pt: one entry per
checkpoint, in order, with the trainer's stage, progress and rank map, every
model parameter, and the full AdamW exp_avg, exp_avg_sq and step count of
every trainable parameter as the engine holds them.
"""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_optimizer_state

from prelora_hpc.config import load_config
from prelora_hpc.engine import base_optimizer, group_parameters
from prelora_hpc.dist_init import finish, init_distributed
from prelora_hpc.train import Trainer


def loaded_state(t: Trainer) -> dict:
    """Collective: what the resumed trainer and its engine hold."""
    opt = base_optimizer(t.engine)
    group_step = {}
    for group, params in zip(opt.param_groups, group_parameters(t.engine)):
        # ZeRO 1/2: one flat fp32 partition per group carries the group's step.
        step = opt.state[group["params"][0]].get("step")
        for p in params:
            group_step[id(p)] = None if step is None else int(torch.as_tensor(step).item())
    moments = {}
    for name, p in t.model.named_parameters():
        if p.requires_grad:
            moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().clone()
                             for k in ("exp_avg", "exp_avg_sq")}
            moments[name]["step"] = group_step[id(p)]
    return {"stage": int(t.stage), "rank_map": dict(t.rank_map), "world_size": t.dist.world_size,
            "progress": {k: getattr(t.p, k) for k in ("global_step", "epoch", "windows_done")},
            "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
            "optimizer": moments}


def main():
    args = sys.argv[1:]
    overrides = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    out, checkpoints = Path(args[0]), args[1:]
    dist = init_distributed(120)
    results = []
    for i, checkpoint in enumerate(checkpoints):
        cfg = load_config("configs/vit_tiny_cpu.yaml",
                          [*overrides, f"run.output_dir={out / f'resume{i}'}"])
        t = Trainer(cfg, dist, resume=checkpoint)
        results.append(loaded_state(t))
        t.close()
    if dist.is_main:
        torch.save(results, out / "resumed.pt")
    finish()


if __name__ == "__main__":
    main()
