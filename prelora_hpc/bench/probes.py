"""What the bench reads off the ranks and an engine: timings, optimizer
state, gradient and fp32-master sizes, what a step sends over the wire, and
the network's bandwidth and latency.

Every timing goes through ``timed`` (each call from a barrier to a device
synchronize, the slowest rank's seconds); ``dist`` is the
``launch.DistInfo`` of this process.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

from ..engine import base_optimizer
from ..step import AGREEMENT_BYTES
from .cost import DEFAULT_BANDWIDTH_GBPS, allreduce_hops, ring_allreduce_traffic

#: ``step.TrainStep``'s flag agreement (non-finite loss, stop request): one
#: all-reduce of 2 fp32 flags per optimizer step (every bench step is one
#: micro batch). It goes through torch.distributed directly, so DeepSpeed's
#: comms logger does not see it.
STEP_FLAG_ALLREDUCE = {"bytes": AGREEMENT_BYTES, "calls": 1}


# --------------------------------------------------------------------------- #
# Collectives over the ranks, and the one timer.


def sync(dist) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)


def barrier(dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist
        tdist.barrier()


def reduce(dist, values: list[float], op: str = "max") -> list[float]:
    """Element-wise max (or sum, ``op="sum"``) over ranks, as Python floats."""
    import torch.distributed as tdist
    if dist.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.cpu().tolist()


def timed(dist, step: Callable[[], Any], n: int) -> list[float]:
    """``n`` calls of ``step()``, each from a barrier to a device sync; the
    slowest rank's seconds per call. Every configuration is timed through
    this one function."""
    times = []
    for _ in range(n):
        barrier(dist)
        sync(dist)
        t0 = time.perf_counter()
        step()
        sync(dist)
        times.append(time.perf_counter() - t0)
    return reduce(dist, times, "max")


# --------------------------------------------------------------------------- #
# What an engine holds and moves.


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def grad_allreduce_bytes(engine) -> int:
    """Gradient bytes one rank all-reduces per optimizer step.

    DeepSpeed (ZeRO 0, 1 and 2) reduces the gradient of every parameter it
    trains, in ``communication_data_type`` (ZeRO 2 bucket by bucket during
    the backward pass). Frozen parameters are not in the engine's trainable
    set and move nothing.
    """
    numel = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return numel * _element_size(engine.communication_data_type)


def _unique_tensors(obj, seen: set[int]):
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() and obj.data_ptr() not in seen:
            seen.add(obj.data_ptr())
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _unique_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _unique_tensors(v, seen)


#: Attributes of DeepSpeed's optimizer wrappers that hold fp32 master weights
#: (FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO 1/2).
_MASTER_ATTRS = ("fp32_groups", "fp32_groups_flat_partition", "single_partition_of_fp32_groups")


def fp32_master_numel(engine) -> int:
    """Scalars in the fp32 master copies this rank holds (0 for plain fp32)."""
    seen: set[int] = set()
    n = 0
    for attr in _MASTER_ATTRS:
        n += sum(t.numel() for t in _unique_tensors(getattr(engine.optimizer, attr, None), seen))
    return n


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state on this rank: AdamW moments (and step
    counters) plus fp32 master weights where the wrapper keeps them."""
    seen: set[int] = set()
    base = base_optimizer(engine)
    n = sum(t.numel() * t.element_size() for t in _unique_tensors(list(base.state.values()), seen))
    for attr in _MASTER_ATTRS:
        masters = getattr(engine.optimizer, attr, None)
        # Under plain fp32 the "master" is the parameter itself: not state.
        if masters is not None:
            n += sum(t.numel() * t.element_size() for t in _unique_tensors(masters, seen))
    return n


def logged_comm_step(dist, step: Callable[[], Any]) -> tuple[dict[str, dict[str, int]], Any]:
    """One ``step()`` under DeepSpeed's comms logger: ({op: {"bytes", "calls"}}
    on this rank, what ``step`` returned). ``all_reduce`` includes the
    training step's flag agreement (``STEP_FLAG_ALLREDUCE``)."""
    import deepspeed.comm as dcomm
    dcomm.comms_logger.reset_data()
    dcomm.configure(enabled=True, prof_all=True)
    try:
        out = step()
        sync(dist)
    finally:
        dcomm.configure(enabled=False, prof_all=False)
    comm = {}
    for op, sizes in dcomm.comms_logger.get_raw_data().items():
        comm[op] = {"bytes": int(sum(size * rec[0] for size, rec in sizes.items())),
                    "calls": int(sum(rec[0] for rec in sizes.values()))}
    dcomm.comms_logger.reset_data()
    ar = comm.setdefault("all_reduce", {"bytes": 0, "calls": 0})
    for k, v in STEP_FLAG_ALLREDUCE.items():
        ar[k] += v
    return comm, out


# --------------------------------------------------------------------------- #
# Bandwidth: an all-reduce micro-benchmark on the ranks at hand.


def measure_allreduce(dist, nbytes: int, reps: int = 10) -> float:
    """Median seconds of one all-reduce of ``nbytes`` (fp32) through
    DeepSpeed's comm layer, as the engine calls it."""
    import deepspeed.comm as dcomm
    t = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=dist.device)
    dcomm.all_reduce(t)
    return statistics.median(timed(dist, lambda: dcomm.all_reduce(t), reps))


def network_model(dist, big_bytes: int, bandwidth_gbps: Optional[float],
                  latency_us: Optional[float]) -> dict[str, Any]:
    """Bandwidth (Gb/s) and per-hop latency (s) for the projection: given,
    or measured here on more than one rank, or assumed (200 Gb/s, 0 s)."""
    n = dist.world_size
    out: dict[str, Any] = {}
    if n > 1:
        t_small = measure_allreduce(dist, 4, reps=20)
        t_big = measure_allreduce(dist, big_bytes)
        bw = ring_allreduce_traffic(big_bytes, n) * 8 / max(t_big - t_small, 1e-9) / 1e9
        out["measured"] = {"ranks": n, "small_allreduce_s": t_small, "big_allreduce_s": t_big,
                           "big_bytes": big_bytes, "bandwidth_gbps": bw,
                           "latency_s": t_small / allreduce_hops(n)}
    if bandwidth_gbps is not None:
        out["bandwidth_gbps"], out["bandwidth_source"] = bandwidth_gbps, "given"
    elif "measured" in out:
        out["bandwidth_gbps"], out["bandwidth_source"] = out["measured"]["bandwidth_gbps"], "measured"
    else:
        out["bandwidth_gbps"], out["bandwidth_source"] = DEFAULT_BANDWIDTH_GBPS, "assumed"
    if latency_us is not None:
        out["latency_s"], out["latency_source"] = latency_us * 1e-6, "given"
    elif "measured" in out:
        out["latency_s"], out["latency_source"] = out["measured"]["latency_s"], "measured"
    else:
        out["latency_s"], out["latency_source"] = 0.0, "not modelled"
    return out
