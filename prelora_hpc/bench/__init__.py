"""``prelora-bench``: what stage 3 (LoRA only) saves over stage 1 (full training).

In one process (or one per MPI rank), on the same model, the same fixed
batch and the same DeepSpeed settings, it times stage-3 steps and stage-1
steps, measures each stage's peak memory, counts trainable parameters,
optimizer-state bytes and the gradient bytes all-reduced per step, checks
that stage 3 does none of the work it should skip, and projects both stages
from 1 to 512 nodes. Beside them: the floor (stage 3's frozen base with no
adapters, what no adapter can beat) and, with ``--peer ddp``, each stage
under plain torch DDP with torch AdamW (what a user would run instead).

    prelora-bench --preset cpu-small --json bench.json            # 1 process, CPU
    mpiexec -n 2 prelora-bench --preset cpu-small --json bench2.json  # 2 ranks; prints measured vs projected
    prelora-bench --preset vit-large --count-only                 # ViT-L/16 trainable count, no run
    mpiexec -n 8 --ppn 4 prelora-bench --preset vit-large --json vitl.json   # on GPUs
    prelora-bench --preset toy --stages 3 --scaling-row weak --json-row-dir rows/  # scripts/scaling.sh
    mpiexec -n 2 prelora-bench --preset cpu-small --peer ddp --json peer.json    # ours / DDP

A step is the trainer's own (``step.TrainStep``): forward, fp32
cross-entropy, the flag agreement (one 2-flag all-reduce), ``engine.backward``
(which all-reduces the gradients) and ``engine.step``, on one fixed micro
batch already on the device (no accumulation).
Warm-up steps are not timed; each timed step starts after a barrier and
ends after a device synchronize; a step's time is the slowest rank's, and
the figure reported is the median. The peer is timed the same way. The
smallest configuration runs first (floor, stage 3, stage 1, each followed
by its peer): peak memory is measured from a reset high-water mark
(docs/benchmarks.md says why the order matters on the CPU).

The package, one responsibility a module:

- ``presets``: the sizes (``presets/*.yaml``), loaded and checked;
- ``cost``: rank maps, parameter counts, the ring all-reduce model and the
  projection (pure);
- ``probes``: the timer, optimizer-state, gradient and master sizes, the
  comms-logged step, the network's bandwidth and latency;
- ``checks``: the structural checks of a step;
- ``runner``: each configuration built, timed and measured; the DDP peer;
  the convergence bookkeeping; ``run``, the whole benchmark;
- ``output``: the table, the Markdown, the count, the scaling rows;
- ``cli``: the options and ``main``.
"""

from .cli import main

__all__ = ["main"]
