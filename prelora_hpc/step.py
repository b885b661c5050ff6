"""The training step: one micro batch through a DeepSpeed engine.

Written once. The trainer runs it on every micro batch, the bench times it
(``prelora-bench``) and the loader bench measures what it demands
(``prelora-loader-bench``), so every figure they report is of the code path
that trains.

Per micro batch: the input moves to the device in the run's precision, the
engine runs forward, the loss is cross-entropy in fp32, and one 2-element
all-reduce makes every rank agree on two flags before any rank's backward:
did some rank's loss come out non-finite, and did some rank receive a stop
signal. A non-finite loss on any rank therefore skips the micro batch on all
of them (no backward, no optimizer step), and a stop lands on the same step
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .engine import set_lr


@dataclass
class StepResult:
    """What one micro batch did, identical on every rank except ``loss``."""

    loss: Optional[torch.Tensor]
    """This rank's loss (fp32 scalar on the device, detached); None if skipped."""
    nonfinite: bool
    """Some rank's loss was NaN or inf: every rank skipped backward and step."""
    stop: bool
    """Some rank has a stop request (walltime warning, Ctrl-C)."""


def input_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype images enter the model in: None for fp32 (left as loaded)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class TrainStep:
    """Forward, loss, flag agreement, backward and ``engine.step()`` on one micro batch.

    ``engine``: a DeepSpeed engine (one per stage; build a new ``TrainStep``
    after a rebuild). ``stop_requested``: called once per micro batch, True
    while this rank holds a stop request. ``agree``: run the flag all-reduce
    (False only where one process times the step without a process group).
    """

    def __init__(self, engine, device: torch.device, precision: str,
                 label_smoothing: float = 0.0,
                 stop_requested: Optional[Callable[[], bool]] = None, agree: bool = True):
        self.engine = engine
        self.device = device
        self.dtype = input_dtype(precision)
        self.label_smoothing = label_smoothing
        self.stop_requested = stop_requested or (lambda: False)
        self.agree = agree

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 lr: Optional[float] = None) -> StepResult:
        """One micro batch: ``x`` images [b, C, H, W], ``y`` labels [b]. ``lr``,
        if given, is set at an accumulation boundary before the optimizer step."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.dtype is not None:
            x = x.to(self.dtype)
        logits = self.engine(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32),
                             torch.tensor(float(self.stop_requested()), device=loss.device)])
        if self.agree:
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        nonfinite, stop = (bool(v > 0) for v in flags.tolist())
        if nonfinite:
            return StepResult(None, True, stop)
        if lr is not None and self.engine.is_gradient_accumulation_boundary():
            set_lr(self.engine, lr)
        self.engine.backward(loss)
        self.engine.step()
        return StepResult(loss.detach(), False, stop)
