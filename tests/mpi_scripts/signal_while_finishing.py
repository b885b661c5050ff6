"""prelora-train that sends itself SIGINT (on rank 1) as the run finishes.

Usage: mpiexec -n 2 python signal_whilefinishing.py prelora-train-args...
The signal arrives after the training loop ended, while the final
evaluation and checkpoint are written: the run completes, and says so.
"""

import os
import signal
import sys

import prelora_hpc.train as train
from prelora_hpc import cli


class LateSignalTrainer(train.Trainer):
    def finish(self, wall_s):
        if self.dist.rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return super().finish(wall_s)


train.Trainer = LateSignalTrainer
sys.exit(cli.train_main(sys.argv[1:]))
