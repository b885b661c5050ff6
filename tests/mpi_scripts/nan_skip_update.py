"""An optimizer step whose loss is NaN on rank 1 only, under ZeRO STAGE with
ACCUM micro batches per step (the NaN in the first of them).

Every rank must learn of it at the step's boundary, and the weights and the
AdamW state after the step must be exactly those before it; the next step
must update again, to finite weights.

Usage: mpiexec -n 2 python nan_skip_update.py OUT_DIR ZERO_STAGE ACCUM
Writes OUT_DIR/nan_skip_rank{r}.json.
"""

import json
import sys

import torch

from prelora_hpc.config import load_config
from prelora_hpc.engine import base_optimizer
from prelora_hpc.dist_init import init_distributed
from prelora_hpc.train import Trainer


def snapshot(t):
    # What the optimizer updates (the fp32 partitions under ZeRO) and, where
    # the model holds whole weights (not ZeRO-3's partitioned placeholders),
    # the model's own parameters.
    opt = base_optimizer(t.engine)
    weights = {f"optimizer.{i}.{j}": p.detach().clone()
               for i, g in enumerate(opt.param_groups) for j, p in enumerate(g["params"])}
    if t.cfg.deepspeed.zero_stage < 3:
        weights.update({n: p.detach().clone() for n, p in t.model.named_parameters()})
    state = [v.detach().clone() for s in base_optimizer(t.engine).state.values()
             for v in s.values() if torch.is_tensor(v)]
    return weights, state


def same(a, b):
    return all(torch.equal(a[0][n], b[0][n]) for n in a[0]) and len(a[1]) == len(b[1]) \
        and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def main():
    out, zero, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config("configs/vit_tiny_cpu.yaml", [
        f"run.output_dir={out}", f"deepspeed.zero_stage={zero}",
        f"deepspeed.grad_accum_steps={accum}", "deepspeed.micro_batch_size=4",
        "run.on_nonfinite_loss=skip", "optim.warmup_steps=0"])
    dist = init_distributed(120)
    t = Trainer(cfg, dist)
    gen = torch.Generator().manual_seed(100 + dist.rank)
    x = torch.randn(4, 3, cfg.model.img_size, cfg.model.img_size, generator=gen)
    y = torch.randint(0, cfg.model.num_classes, (4,), generator=gen)

    def optimizer_step(poison: bool):
        results = []
        for i in range(accum):
            bad = poison and i == 0 and dist.rank == 1
            results.append(t.train_step(x * float("nan") if bad else x, y))
            t.p.samples_in_epoch += 4
        t.p.global_step += 1
        return results

    optimizer_step(False)
    optimizer_step(False)
    before = snapshot(t)
    poisoned = optimizer_step(True)
    after_skip = snapshot(t)
    optimizer_step(False)
    after_next = snapshot(t)
    t.close()
    rec = {
        "boundary_flags": [(r.boundary, r.nonfinite) for r in poisoned],
        "unchanged": same(before, after_skip),
        "updated_after": not same(after_skip, after_next),
        "finite_after": all(bool(torch.isfinite(v).all()) for v in after_next[0].values()),
        "skipped_steps": t.p.skipped_steps,
        "state_tensors": len(before[1]),
    }
    with open(f"{out}/nan_skip_rank{dist.rank}.json", "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
