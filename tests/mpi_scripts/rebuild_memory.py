"""Rebuild the engine repeatedly (1 -> 2 -> 3 -> 2 -> 3 ...) and record RSS.

Usage: mpiexec -n 2 python rebuild_memory.py OUT_DIR
Writes OUT_DIR/rss_rank{r}.json: resident bytes after each rebuild.
"""

import gc
import json
import sys

import torch

from prelora_hpc.config import load_config
from prelora_hpc.dist_init import init_distributed
from prelora_hpc.stages import Stage
from prelora_hpc.train import Trainer, rebuild_engine


def memory_bytes() -> int:
    """CUDA memory allocated on a GPU, resident memory on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    return rss_bytes()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main():
    out = sys.argv[1]
    cfg = load_config("configs/vit_tiny_cpu.yaml", [f"run.output_dir={out}"])
    dist = init_distributed(120)
    t = Trainer(cfg, dist)
    # Cycling between stages 2 and 3 is no run's path; rebuild_engine, which
    # every transition uses, is driven directly.
    rank_map = {name: 4 for name in t.watch.tracker.layer_names()}
    x = torch.randn(cfg.deepspeed.micro_batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    y = torch.randint(0, cfg.model.num_classes, (cfg.deepspeed.micro_batch_size,))
    series = []
    for stage in (2, 3, 2, 3, 2, 3):
        engine, t.engine = t.engine, None
        t.set_engine(rebuild_engine(engine, t.model, Stage(stage), rank_map, cfg, dist)[0])
        for _ in range(2):
            t.train_step(x, y)
        gc.collect()
        series.append(memory_bytes())
    t.close()
    with open(f"{out}/rss_rank{dist.rank}.json", "w") as f:
        json.dump(series, f)


if __name__ == "__main__":
    main()
