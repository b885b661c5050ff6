"""prelora_hpc: PreLoRA pre-training of Vision Transformers on HPC clusters.

Stage 1 trains every parameter; when a partial convergence test on the
weight norms and the loss passes, each layer gets a LoRA rank from how much
it still moves (stage 2: base + adapters), then the base freezes and only
the adapters train (stage 3). See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
