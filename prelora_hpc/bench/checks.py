"""Structural checks of one training step (dispatcher-level facts, not timing).

That stage 3 does none of the work it should skip: no gradient on a frozen
tensor, an optimizer holding exactly the trainable parameters, no matmul
of an adapted weight's dense shape (no weight gradient, no ``B @ A``), no
adapter dropout at p = 0, and under bf16/fp16 no fp32 master copy of a
frozen weight (on the CPU, which trains in fp32 only, a bf16 engine is
built just to check that: ``bf16_probe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
# FlopCounterMode is built on this class; it sees every aten op of the
# forward and the backward pass.
from torch.utils._python_dispatch import TorchDispatchMode

from ..lora import lora_modules
from ..memory import release_free_memory
from ..step import TrainStep
from .cost import stage3_model
from .probes import fp32_master_numel, reduce, sync

if TYPE_CHECKING:
    from .runner import Ctx


class OpRecorder(TorchDispatchMode):
    """Records matmul output shapes and whether any dropout kernel ran."""

    _MATMULS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "aten.matmul.")
    _DROPOUT = ("dropout", "bernoulli")

    def __init__(self):
        super().__init__()
        self.matmul_shapes: list[tuple[int, ...]] = []
        self.dropout_ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(self._MATMULS) and isinstance(out, torch.Tensor):
            self.matmul_shapes.append(tuple(out.shape[-2:]))
        if any(k in name for k in self._DROPOUT):
            self.dropout_ops[name] = self.dropout_ops.get(name, 0) + 1
        return out


def dense_shapes(model: nn.Module, names: list[str]) -> set[tuple[int, int]]:
    """[out, in] of each named linear's base weight, and its transpose."""
    shapes = set()
    for n in names:
        layer = model.get_submodule(n)
        layer = getattr(layer, "base_layer", layer)
        shapes |= {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    return shapes


def stage_checks(ctx: "Ctx", stage: int, model: nn.Module, engine, step: TrainStep,
                 trainable: set[str], in_engine: set[str]) -> dict[str, Any]:
    """Structural facts of one more ``step`` on the fixed batch (after the timed ones).

    Returned as {name: {"ok": bool or None, "detail": str}}; ``None`` where
    the fact does not apply to this stage or precision.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ctx.cfg
    adapted = list(ctx.rank_map)
    rec = OpRecorder()
    flops = FlopCounterMode(display=False)
    with flops, rec:
        step(*ctx.batch)
    sync(ctx.dist)
    out: dict[str, Any] = {"flops_per_step": int(flops.get_total_flops())}
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with_grad = [n for n, p in frozen if p.grad is not None]
    out["frozen_without_grad"] = {
        "ok": not with_grad,
        "detail": f"{len(frozen)} frozen tensors, {len(with_grad)} with a .grad"
                  + (f" (e.g. {with_grad[0]})" if with_grad else "")}
    out["engine_trains_exactly_trainable"] = {
        "ok": in_engine == trainable,
        "detail": f"optimizer holds {len(in_engine)} tensors, model has {len(trainable)} trainable"}
    out["fp32_master_numel"] = fp32_master_numel(engine)
    # Dense products: any matmul whose output is an adapted base weight's
    # [out, in] (or transposed) shape, i.e. a weight gradient or B @ A.
    dense = dense_shapes(model, adapted)
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    rows = cfg.deepspeed.micro_batch_size * tokens
    ambiguous = any(rows in s for s in dense)
    hits = sum(1 for s in rec.matmul_shapes if s in dense)
    if stage == 3:
        out["no_dense_weight_products"] = {
            "ok": None if ambiguous else hits == 0,
            "detail": f"{hits} matmul outputs of an adapted weight's shape in a stage-3 step"
                      + (" (ambiguous: batch x tokens equals a weight dimension)" if ambiguous else "")}
        ids = [type(m.lora_dropout).__name__ for m in lora_modules(model).values()]
        identity = all(t == "Identity" for t in ids)
        out["lora_dropout_identity"] = {
            "ok": identity if cfg.lora.dropout == 0 else None,
            "detail": f"lora.dropout={cfg.lora.dropout}: branch dropout modules {sorted(set(ids))}"}
    else:
        out["dense_weight_products"] = hits
    out["dropout_kernels"] = rec.dropout_ops
    if ctx.precision in ("bf16", "fp16"):
        out["low_precision_masters"] = master_check(model, engine, trainable, ctx.precision,
                                                    cfg.deepspeed.zero_stage, ctx.dist)
    return out


def master_check(model: nn.Module, engine, trainable: set[str], precision: str, zero_stage: int,
                 dist) -> dict[str, Any]:
    """Frozen weights stay in the training dtype (``precision``: bf16 or
    fp16) and get no fp32 master copy.

    A master copy of any frozen weight matrix would add at least that
    matrix's size to the masters; ZeRO's alignment padding adds far less.
    Collective under ZeRO (the masters are summed over ranks).
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    wrong_dtype = [n for n, p in frozen if p.dtype != dtype]
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    master = fp32_master_numel(engine)
    if zero_stage > 0:
        master = int(reduce(dist, [float(master)], "sum")[0])
    smallest = min((p.numel() for n, p in frozen if p.ndim == 2), default=0)
    excess = master - n_trainable
    ok = not wrong_dtype and 0 <= excess < max(smallest, 1)
    return {"ok": ok,
            "detail": f"{precision}, ZeRO {zero_stage}: fp32 masters {master:,} scalars for "
                      f"{n_trainable:,} trainable (excess {excess:,}; smallest frozen matrix "
                      f"{smallest:,}); {len(wrong_dtype)} frozen tensors not in {precision}"}


def bf16_probe(ctx: "Ctx") -> dict[str, Any]:
    """Build a stage-3 bf16 engine on the CPU (fp32-only for training here)
    only to check its master copies and dtypes after one training step.

    ``engine.build_engine`` refuses bf16 on the CPU (it cannot train there),
    so the engine is made from the same DeepSpeed config and AdamW groups.
    """
    import deepspeed

    from ..engine import deepspeed_config, destroy_engine, param_groups

    cfg = ctx.cfg
    torch.manual_seed(cfg.run.seed)
    model = stage3_model(cfg, ctx.rank_map).to(ctx.dist.device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ds_cfg = deepspeed_config(cfg, ctx.dist.world_size, "bf16", ctx.dist.device.type)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    try:
        TrainStep(engine, ctx.dist.device, "bf16", cfg.optim.label_smoothing)(*ctx.batch)
        res = master_check(model, engine, trainable, "bf16", cfg.deepspeed.zero_stage, ctx.dist)
        res["detail"] = "CPU probe, " + res["detail"]
        return res
    finally:
        destroy_engine(engine)
        release_free_memory()
