"""prelora-train with a bug: every rank's first micro batch raises a
RuntimeError, as an error in our own code would.

Usage: mpiexec -n 2 python bug_in_step.py prelora-train-args...
"""

import sys

import prelora_hpc.train as train
from prelora_hpc import cli


class BuggyTrainer(train.Trainer):
    def train_step(self, x, y):
        raise RuntimeError("a bug in the step")


train.Trainer = BuggyTrainer
sys.exit(cli.train_main(sys.argv[1:]))
