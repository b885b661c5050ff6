"""What tests read off a run or a model, beside the package's own API."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch.nn as nn

from prelora_hpc.lora import lora_modules
from prelora_hpc.records import read_records


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    """All records of ``metrics.jsonl`` (optionally one kind), in order, as
    JSON objects (``records.read_records`` gives them typed)."""
    return [rec.to_json() for rec in read_records(run_dir, kind)]


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 (hex) over every parameter's name and bytes, in name order:
    equal on two ranks exactly when their replicas agree bit for bit."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def rank_map_of(model: nn.Module) -> dict[str, int]:
    """The ranks actually injected, by dotted module name."""
    return {n: m.r for n, m in lora_modules(model).items()}


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Dotted names of the parameters with requires_grad, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
