"""prelora-train for the emulated-cluster tests, recording what each rank saw.

Takes prelora-train's arguments (--config, --output-dir, section.key=value),
runs the real bootstrap and the real trainer, then writes
OUTPUT_DIR/probe/rank{R}.json: where the rank ran (host, local rank and
size), the rendezvous and link settings dist_init.py chose, the rank map it
trained with, the LoRA ranks its own model carries and a digest of its
weights. Exit status as prelora-train's on success (0).
"""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from prelora_hpc import dist_init  # mpi4py before torch
from prelora_hpc.config import load_config
from prelora_hpc.lora import lora_modules
from prelora_hpc.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: run_helpers
from run_helpers import parameter_digest  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"run.output_dir={args.output_dir}"])
    dist = dist_init.init_distributed(cfg.run.collective_timeout_s)
    trainer = Trainer(cfg, dist)
    try:
        code = trainer.train()
    finally:
        trainer.close()
    import torch.distributed as tdist

    record = {
        "code": code,
        "rank": dist.rank, "world_size": dist.world_size,
        "local_rank": dist.local_rank, "local_size": dist.local_size,
        "hostname": socket.gethostname(), "dist_hostname": dist.hostname,
        "backend": tdist.get_backend(),
        "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "GLOO_SOCKET_IFNAME", "LOCAL_SIZE",
                                               "LOCAL_RANK", "TMPDIR")},
        "stage": int(trainer.stage),
        "rank_map": trainer.rank_map,
        "lora_ranks": {n: m.r for n, m in lora_modules(trainer.model).items()},
        "param_sha256": parameter_digest(trainer.model),
    }
    out = Path(args.output_dir) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(record, indent=1))
    dist_init.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
