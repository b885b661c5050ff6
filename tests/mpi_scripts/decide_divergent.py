"""Feed each rank different window statistics and check rank 0's decision wins.

Usage: mpiexec -n 2 python decide_divergent.py OUT_DIR CASE
CASE 'rank0_converged': rank 0 sees flat norms and losses, rank 1 wild ones.
CASE 'rank1_converged': the reverse.
Writes OUT_DIR/decide_rank{r}.json with the decision of every window.
"""

import json
import sys

import torch

from prelora_hpc.config import load_config
from prelora_hpc.dist_init import init_distributed
from prelora_hpc.stages import WindowStats
from prelora_hpc.train import Trainer, decide_on_rank0


def main():
    out, case = sys.argv[1], sys.argv[2]
    cfg = load_config("configs/vit_tiny_cpu.yaml",
                      [f"run.output_dir={out}", "prelora.tau=1.0", "prelora.zeta=1.0",
                       "prelora.k=3"])
    dist = init_distributed(120)
    t = Trainer(cfg, dist)
    tracker = t.watch.tracker
    shape = (len(tracker.module_names), tracker.num_layers)
    converged_here = (case == "rank0_converged") == (dist.rank == 0)
    decisions = []
    for w in range(4):
        if converged_here:
            norms = torch.full(shape, 10.0, dtype=torch.float64)
            norms[:, 0] += 0.01 * w  # layer 0 still moves a little: it gets r_max
            loss = 2.0
        else:
            norms = torch.full(shape, 10.0 * (1.5 ** w), dtype=torch.float64)
            loss = 2.0 / (1.5 ** w)
        d = decide_on_rank0(t.watch.policy, WindowStats(norms, loss), t.stages.can_switch,
                            dist.is_main)
        decisions.append({"switch": d.switch, "rank_map": d.rank_map})
    t.close()
    with open(f"{out}/decide_rank{dist.rank}.json", "w") as f:
        json.dump(decisions, f)


if __name__ == "__main__":
    main()
