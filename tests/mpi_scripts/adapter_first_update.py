"""After a switch, each new adapter tensor's first AdamW update equals the
first update of a fresh ``torch.optim.AdamW`` from the same gradient.

Usage: mpiexec -n 2 python adapter_first_update.py OUT_DIR ZERO_STAGE
Writes OUT_DIR/first_update_rank{r}.json.
"""

import json
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from prelora_hpc.config import load_config
from prelora_hpc.engine import base_optimizer, lr_at
from prelora_hpc.dist_init import init_distributed
from prelora_hpc.lora import lora_modules
from prelora_hpc.stages import Decision, Stage
from prelora_hpc.train import Trainer

STAGE1_STEPS = 3


def main():
    out, zero = sys.argv[1], int(sys.argv[2])
    cfg = load_config("configs/vit_tiny_cpu.yaml", [
        f"run.output_dir={out}", f"deepspeed.zero_stage={zero}",
        # Clipping rescales the gradient by the global norm; without it the
        # reference sees exactly the gradient the engine applies.
        "deepspeed.gradient_clipping=0.0", "optim.warmup_steps=0",
        "lora.lr_scale=2.0", "lora.lr_ratio_b=4.0"])
    dist = init_distributed(120)
    t = Trainer(cfg, dist)
    gen = torch.Generator().manual_seed(100 + dist.rank)
    x = torch.randn(cfg.deepspeed.micro_batch_size, 3, cfg.model.img_size, cfg.model.img_size,
                    generator=gen)
    y = torch.randint(0, cfg.model.num_classes, (cfg.deepspeed.micro_batch_size,), generator=gen)
    for _ in range(STAGE1_STEPS):
        t.train_step(x, y)
        t.p.global_step += 1
    # The switch as a window's decision would order it: into stage 2.
    ranks = {name: 4 for name in t.watch.tracker.layer_names()}
    t.execute(t.stages.after_window(Decision(switch=True, rank_map=ranks, reason="test"),
                                    t.p.global_step))
    assert t.stage == Stage.FULL_LORA

    # The gradient the engine will apply: this batch's, averaged over ranks,
    # computed on detached copies so the engine's state is untouched.
    params = {n: p.detach().clone().requires_grad_(p.requires_grad)
              for n, p in t.model.named_parameters()}
    logits = torch.func.functional_call(t.model, params, (x,))
    F.cross_entropy(logits.float(), y).backward()
    adapters = {}
    for name, m in lora_modules(t.model).items():
        for part, scale in (("lora_A", 2.0), ("lora_B", 8.0)):
            key = f"{name}.{part}.weight"
            g = params[key].grad.clone()
            tdist.all_reduce(g)
            adapters[key] = (getattr(m, part).weight, g / dist.world_size, scale)
    before = {k: p.detach().clone() for k, (p, _, _) in adapters.items()}

    lr = lr_at(cfg, t.p.global_step, t.plan.total_steps)
    o = cfg.optim
    t.train_step(x, y)
    errors, sizes = {}, {}
    for k, (p, g, scale) in adapters.items():
        ref = before[k].clone().requires_grad_(True)
        fresh = torch.optim.AdamW([ref], lr=lr * scale, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
        ref.grad = g
        fresh.step()
        errors[k] = float((p.detach() - ref.detach()).abs().max())
        sizes[k] = float((ref.detach() - before[k]).abs().max())
    steps = sorted({int(torch.as_tensor(s["step"]).item())
                    for s in base_optimizer(t.engine).state.values() if "step" in s})
    res = {"max_error": max(errors.values()), "max_update": max(sizes.values()),
           "tensors": len(errors), "steps": steps}
    t.close()
    with open(f"{out}/first_update_rank{dist.rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
