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

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        at_stop = self.checkpoints.at_stop

        def slow_at_stop(*args):
            print(f"[rank {self.dist.rank}] writing the stop checkpoint", flush=True)
            time.sleep(self.delay)  # the slow write itself, not a wait for anything
            return at_stop(*args)

        self.checkpoints.at_stop = slow_at_stop


train.Trainer = SlowStopTrainer
sys.exit(cli.train_main(sys.argv[2:]))
