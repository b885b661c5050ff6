"""prelora-train that sends itself SIGTERM on one rank during one optimizer step.

Usage: mpiexec -n 2 python sigterm_at_step.py STEP RANK prelora-train-args...
The signal arrives while step STEP + 1 runs (STEP steps done), on rank RANK
only, through the real handler: the run stops after that step, as at a
walltime warning.
"""

import os
import signal
import sys

import prelora_hpc.train as train
from prelora_hpc import cli


class SignalledTrainer(train.Trainer):
    at_step, on_rank = int(sys.argv[1]), int(sys.argv[2])
    fired = False

    def train_step(self, x, y):
        if not self.fired and self.p.global_step == self.at_step and self.dist.rank == self.on_rank:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(x, y)


train.Trainer = SignalledTrainer
sys.exit(cli.train_main(sys.argv[3:]))
