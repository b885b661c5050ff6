"""Run the trainer through the three stages and record what each rank saw.

Usage: mpiexec -n 2 python probe_stages.py OUT_DIR [overrides...]
Writes OUT_DIR/probe_rank{r}.json.
"""

import json
import sys
from pathlib import Path

import torch

from prelora_hpc.config import load_config
from prelora_hpc.engine import trainable_in_engine
from prelora_hpc.dist_init import init_distributed
from prelora_hpc.lora import lora_modules
from prelora_hpc.stages import Stage
from prelora_hpc.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run_helpers
from run_helpers import parameter_digest  # noqa: E402


class ProbeTrainer(Trainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stage3_steps = 0
        self.base0 = self.lora0 = None
        self.engine_sets = {}

    def on_optimizer_step(self, loss):
        if self.stage == Stage.LORA:
            named = dict(self.model.named_parameters())
            base = {n: p.detach().clone() for n, p in named.items() if ".base_layer." in n}
            lora = {n: p.detach().clone() for n, p in named.items() if ".lora_" in n}
            if self.base0 is None:
                self.base0, self.lora0 = base, lora
            self.base_last, self.lora_last = base, lora
            self.stage3_steps += 1
        self.engine_sets[int(self.stage)] = (
            sorted(trainable_in_engine(self.engine, self.model)),
            sorted(n for n, p in self.model.named_parameters() if p.requires_grad))
        super().on_optimizer_step(loss)


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("configs/vit_tiny_cpu.yaml", [f"run.output_dir={out}", *overrides])
    dist = init_distributed(120)
    t = ProbeTrainer(cfg, dist)
    code = t.train()
    res = {
        "code": code,
        "rank_map": t.rank_map,
        "lora_ranks": {n: m.r for n, m in lora_modules(t.model).items()},
        "param_sha256": parameter_digest(t.model),
        "stage": int(t.stage),
        "stage3_steps": t.stage3_steps,
        "base_unchanged": all(torch.equal(t.base0[n], t.base_last[n]) for n in t.base0),
        "lora_changed": any(not torch.equal(t.lora0[n], t.lora_last[n]) for n in t.lora0),
        "engine_sets": {str(k): v for k, v in t.engine_sets.items()},
        "trainable_count": t.trainable_count(),
    }
    t.close()
    with open(f"{out}/probe_rank{dist.rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
