"""The bench's arithmetic: rank maps, parameter counts, the ring all-reduce
model and the scaling projection.

Pure: no engine, no process group. Models are built only to be counted
(on the meta device in ``count_only``, so ViT-L fits a laptop).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..convergence import assign_ranks
from ..model import build_model, count_parameters
from ..stages import shape_for_stage

#: The reference machine's nodes: 4 A100 per Polaris node.
GPUS_PER_NODE = 4
#: Node counts of the scaling projection.
PROJECTION_NODES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
#: Assumed inter-node bandwidth when nothing is measured or given: one
#: Slingshot 11 NIC, 200 Gb/s (Polaris).
DEFAULT_BANDWIDTH_GBPS = 200.0


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or None where either is unknown or ``b`` is 0."""
    return None if a is None or b is None or b == 0 else a / b


# --------------------------------------------------------------------------- #
# Rank maps.


def representative_rank_map(num_layers: int, modules: list[str], r_min: int, r_max: int,
                            seed: int = 0, block_prefix: str = "blocks") -> dict[str, int]:
    """A rank map as Algorithm 2 would give it, from seeded random changes.

    Each layer's weight-norm change is drawn uniformly from [0, 1) percent,
    so after min-max normalization every rank in [r_min, r_max] is about
    equally likely; real runs, where most layers have settled, give lower
    ranks, so this errs towards more trainable parameters.
    """
    rng = np.random.default_rng(seed)
    changes = {a: rng.uniform(0.0, 1.0, size=num_layers).tolist() for a in modules}
    ranks = assign_ranks(changes, r_min, r_max)
    return {f"{block_prefix}.{l}.{a}": int(ranks[a][l]) for a in modules for l in range(num_layers)}


def load_rank_map(path: Path) -> dict[str, int]:
    """A ``{"blocks.0.attn.qkv": 16, ...}`` JSON file, e.g. a run's rank_map.json,
    or an earlier ``--json`` result of this bench (its ``rank_map.ranks``), so a
    recorded comparison can be rerun on exactly its ranks. ``ValueError``
    naming the file for anything else."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--rank-map {path}: cannot read it as JSON: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("rank_map"), dict) \
            and isinstance(raw["rank_map"].get("ranks"), dict):
        raw = raw["rank_map"]["ranks"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--rank-map {path}: expected a non-empty object of module name -> rank")
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--rank-map {path}: rank of {k!r} must be a positive int, got {v!r}")
    return {str(k): int(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- #
# The models compared, and their parameters.


def stage3_model(cfg: Config, rank_map: dict[str, int]) -> nn.Module:
    """``cfg``'s model with adapters of ``rank_map`` injected and the base frozen."""
    return shape_for_stage(build_model(cfg.model), 3, rank_map, cfg)


def floor_model(cfg: Config) -> nn.Module:
    """The floor under stage 3: ``cfg``'s model shaped for stage 3 with no
    adapters at all, so only ``prelora.stage3_trainable`` (norms, pos_embed,
    cls_token, head by default) trains. No adapter can make a step cheaper."""
    return shape_for_stage(build_model(cfg.model), 3, {}, cfg)


def adapter_parameter_count(model: nn.Module, rank_map: dict[str, int]) -> int:
    """Sum over adapted layers of r x (in + out): the adapters' scalars."""
    total = 0
    for name, r in rank_map.items():
        layer = model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        total += r * (layer.in_features + layer.out_features)
    return total


def grad_element_bytes(precision: str) -> int:
    """Bytes per gradient element on the wire: DeepSpeed's default
    ``communication_data_type`` is the training dtype (2 under bf16/fp16)."""
    return 2 if precision in ("bf16", "fp16") else 4


def count_only(cfg: Config, rank_map: dict[str, int], bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
               gpus: int = PROJECTION_NODES[-1] * GPUS_PER_NODE) -> dict[str, Any]:
    """Trainable parameters of stage 1 and stage 3 without running anything,
    and the gradient bytes each all-reduces per step.

    The models are built on the meta device (no memory, no init), so this
    works for ViT-L on a laptop. Also gives the bounds with every layer at
    r_min and at r_max. ``allreduce_s`` is the gradients' ring all-reduce
    over ``gpus`` ranks at ``bandwidth_gbps`` (bandwidth term only).
    """
    elem = grad_element_bytes(cfg.deepspeed.precision)
    with torch.device("meta"):
        base = build_model(cfg.model)
        total = count_parameters(base)
        out: dict[str, Any] = {"model": cfg.model.name, "stage1_trainable": total,
                               "layers_adapted": len(rank_map), "grad_element_bytes": elem,
                               "allreduce_gpus": gpus, "bandwidth_gbps": bandwidth_gbps,
                               "stage1_grad_bytes": total * elem,
                               "stage1_allreduce_s": allreduce_time(total * elem, gpus,
                                                                    bandwidth_gbps, 0.0)}
        for label, rm in (("rank_map", rank_map),
                          ("all_r_min", {k: cfg.prelora.r_min for k in rank_map}),
                          ("all_r_max", {k: cfg.prelora.r_max for k in rank_map})):
            m = stage3_model(cfg, rm)
            trainable = count_parameters(m, trainable_only=True)
            adapters = adapter_parameter_count(m, rm)
            out[label] = {"stage3_trainable": trainable, "adapter_params": adapters,
                          "kept_params": trainable - adapters,
                          "trainable_fraction": trainable / total,
                          "grad_bytes": trainable * elem,
                          "allreduce_s": allreduce_time(trainable * elem, gpus, bandwidth_gbps, 0.0)}
            del m
    return out


# --------------------------------------------------------------------------- #
# The ring all-reduce model and the projection.


def allreduce_hops(ranks: int) -> int:
    """Latency hops of one all-reduce over ``ranks``: a tree-shaped
    2 ceil(log2 N), as NCCL's tree/ring hybrids give at scale (a flat ring
    would be 2 (N - 1))."""
    return 2 * math.ceil(math.log2(ranks)) if ranks > 1 else 0


def ring_allreduce_traffic(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``:
    2 (N - 1) / N x nbytes (reduce-scatter then all-gather)."""
    return 0.0 if ranks <= 1 else 2.0 * (ranks - 1) / ranks * nbytes


def allreduce_time(nbytes: float, ranks: int, bandwidth_gbps: float, latency_s: float,
                   calls: int = 1) -> float:
    """Seconds for ``calls`` all-reduces moving ``nbytes`` in all over ``ranks``.

    Bandwidth term: ring traffic over ``bandwidth_gbps`` (Gb/s the slowest
    link sustains, the network per node across nodes). Latency term:
    ``allreduce_hops`` of ``latency_s`` per call.
    """
    if ranks <= 1:
        return 0.0
    return (ring_allreduce_traffic(nbytes, ranks) * 8 / (bandwidth_gbps * 1e9)
            + calls * allreduce_hops(ranks) * latency_s)


def project(stage: dict[str, Any], micro_batch: int, bandwidth_gbps: float, latency_s: float,
            gpus_per_node: int = GPUS_PER_NODE, nodes: list[int] = PROJECTION_NODES,
            overlap: float = 0.0) -> list[dict]:
    """Projected weak scaling of one stage (fixed micro batch per GPU).

    ``stage`` holds ``compute_time_s`` (s), ``allreduce_bytes_per_step`` and
    ``allreduce_calls_per_step``. step(N) = compute + (1 - overlap) x
    all-reduce(N): ``overlap`` is the fraction of the all-reduce hidden
    behind the backward pass. DeepSpeed ZeRO 0 (and ZeRO 1/2 without
    ``overlap_comm``) reduces after the backward pass: 0. DDP's bucketed
    reduction hides part of it: ``hidden_fraction`` measures how much, on
    the ranks at hand. Efficiency is images/s per GPU relative to one node.
    """
    compute = stage["compute_time_s"]
    rows = []
    base = None
    for n in nodes:
        g = n * gpus_per_node
        comm = allreduce_time(stage["allreduce_bytes_per_step"], g, bandwidth_gbps, latency_s,
                              stage["allreduce_calls_per_step"])
        step = compute + (1.0 - overlap) * comm
        ips = g * micro_batch / step
        if base is None:
            base = ips / g
        rows.append({"nodes": n, "gpus": g, "step_time_s": step, "comm_time_s": comm,
                     "hidden_comm_s": overlap * comm, "images_per_s": ips,
                     "efficiency": ips / g / base})
    return rows


def hidden_fraction(step_s: float, compute_s: float, comm_s: float) -> float:
    """The share of an all-reduce of modelled ``comm_s`` seconds that a
    measured step of ``step_s`` hid behind its ``compute_s`` of compute:
    (compute + comm - step) / comm, within [0, 1]."""
    if comm_s <= 0:
        return 0.0
    return min(1.0, max(0.0, (compute_s + comm_s - step_s) / comm_s))
