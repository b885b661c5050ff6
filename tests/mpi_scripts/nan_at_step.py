"""prelora-train whose input turns NaN on rank 1 at one optimizer step.

Usage: mpiexec -n 2 python nan_at_step.py STEP prelora-train-args...
Exercises the CLI's handling of a non-finite loss seen by one rank only.
"""

import sys

import prelora_hpc.train as train
from prelora_hpc import cli


class NaNTrainer(train.Trainer):
    nan_step = int(sys.argv[1])

    def train_step(self, x, y):
        if self.p.global_step == self.nan_step and self.dist.rank == 1:
            x = x * float("nan")
        return super().train_step(x, y)


train.Trainer = NaNTrainer
sys.exit(cli.train_main(sys.argv[2:]))
