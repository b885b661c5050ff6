"""prelora-train whose stop checkpoint takes SECONDS longer (a big model on a
slow file system), so a second signal surely arrives while it is written.

Usage: mpiexec -n 2 python slow_stop_checkpoint.py SECONDS prelora-train-args...
"""

import sys
import time

import prelora_hpc.train as train
from prelora_hpc import cli


class SlowStopTrainer(train.Trainer):
    delay = float(sys.argv[1])

    def save(self, tag=None):
        if self.stop is not None and self.stop.received is not None:
            print(f"[rank {self.dist.rank}] writing the stop checkpoint", flush=True)
            time.sleep(self.delay)
        return super().save(tag)


train.Trainer = SlowStopTrainer
sys.exit(cli.train_main(sys.argv[2:]))
