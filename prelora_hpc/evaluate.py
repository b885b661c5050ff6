"""Validation: top-1, top-5 and loss over every rank's shard of the split."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F


def correct_in_top_k(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    """How many of ``y`` [b] are among the ``k`` largest of ``logits`` [b, classes]."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Collective: ``{"val_loss", "top1", "top5"}`` (loss in nats per sample,
    accuracies in percent) over the samples of every rank's ``loader``, in
    one all-reduce. The model is left in training mode."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    dtype = next(model.parameters()).dtype
    for x, y in loader:
        x = x.to(device, dtype=dtype)
        y = y.to(device)
        logits = model(x).float()
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                              correct_in_top_k(logits, y, 1), correct_in_top_k(logits, y, 5),
                              len(y)], dtype=torch.float64)
    model.train()
    sums = sums.to(device)
    tdist.all_reduce(sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"val_loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n}
