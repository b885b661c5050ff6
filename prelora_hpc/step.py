"""The training step: one micro batch through a DeepSpeed engine.

Written once. The trainer runs it on every micro batch, the bench times it
(``prelora-bench``) and the loader bench measures what it demands
(``prelora-loader-bench``), so every figure they report is of the code path
that trains.

Per micro batch: the input moves to the device in the run's precision, the
engine runs forward, the loss is cross-entropy in fp32, backward, and
``engine.step()``. The loss stays on the device: nothing here waits for the
device on a micro batch that is not an accumulation boundary.

Once per optimizer step every rank agrees on two flags in one 2-element
all-reduce: did some rank's loss in this step come out non-finite, and does
some rank hold a stop request (walltime warning, Ctrl-C). The all-reduce
starts right after the boundary micro batch's forward and is waited on only
after its backward has been queued, before the optimizer step; a step with a
non-finite loss anywhere is then discarded on every rank
(``engine.update_skipped``), the whole optimizer step, not one micro batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .engine import set_lr, update_skipped


#: The flag agreement's all-reduce, once per optimizer step: 2 fp32 values.
AGREEMENT_BYTES = 2 * 4


@dataclass
class StepResult:
    """What one micro batch did. ``nonfinite`` and ``stop`` are agreed over
    ranks at accumulation boundaries and False in between."""

    loss: torch.Tensor
    """This rank's loss (fp32 scalar on the device, detached; may be NaN)."""
    nonfinite: bool
    """Some rank's loss in this optimizer step was NaN or inf: every rank
    skipped the update (the weights and optimizer state are unchanged)."""
    stop: bool
    """Some rank has a stop request."""
    boundary: bool
    """This micro batch ended an optimizer step."""


def input_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype images enter the model in: None for fp32 (left as loaded)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class TrainStep:
    """Forward, loss, backward and ``engine.step()`` on one micro batch, with
    the flags agreed once per optimizer step.

    ``engine``: a DeepSpeed engine (one per stage; build a new ``TrainStep``
    after a rebuild). ``stop_requested``: read at each boundary, True while
    this rank holds a stop request. ``on_nonfinite``: called on every rank
    with no argument when a step's loss was not finite, before anything is
    updated; it may raise to end the run with the weights of the last good
    step. ``agree``: run the flag all-reduce (False only where one process
    times the step without a process group).
    """

    def __init__(self, engine, device: torch.device, precision: str,
                 label_smoothing: float = 0.0,
                 stop_requested: Optional[Callable[[], bool]] = None,
                 on_nonfinite: Optional[Callable[[], None]] = None, agree: bool = True):
        self.engine = engine
        self.device = device
        self.dtype = input_dtype(precision)
        self.label_smoothing = label_smoothing
        self.stop_requested = stop_requested or (lambda: False)
        self.on_nonfinite = on_nonfinite or (lambda: None)
        self.agree = agree
        # Any non-finite loss of this optimizer step so far, on the device.
        self._bad = torch.zeros((), dtype=torch.bool, device=device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 lr: Optional[float] = None, adapter_lr: Optional[float] = None) -> StepResult:
        """One micro batch: ``x`` images [b, C, H, W], ``y`` labels [b]. ``lr``
        (and the adapters' ``adapter_lr``), if given, are set before the
        optimizer step."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.dtype is not None:
            x = x.to(self.dtype)
        boundary = self.engine.is_gradient_accumulation_boundary()
        logits = self.engine(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self._bad |= ~torch.isfinite(loss.detach())
        if not boundary:
            self.engine.backward(loss)
            self.engine.step()
            return StepResult(loss.detach(), False, False, False)
        flags = torch.stack([self._bad.to(torch.float32),
                             torch.tensor(float(self.stop_requested()), device=self.device)])
        work = (tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, async_op=True)
                if self.agree else None)
        self.engine.backward(loss)
        if work is not None:
            work.wait()  # the one host sync of an optimizer step
        self._bad.zero_()
        nonfinite, stop = (bool(v > 0) for v in flags.tolist())
        if nonfinite:
            self.on_nonfinite()
        if lr is not None:
            set_lr(self.engine, lr, adapter_lr)
        with update_skipped(self.engine) if nonfinite else contextlib.nullcontext():
            self.engine.step()
        return StepResult(loss.detach(), nonfinite, stop, True)
