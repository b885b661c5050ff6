"""The DeepSpeed engine of one training stage.

Each stage (full, full + LoRA, LoRA only) trains a different set of
parameters, so each gets its own engine: DeepSpeed sizes its optimizer
state, gradient buffers and all-reduce buckets from the parameters it is
handed, and only those with ``requires_grad`` are handed over. A rebuild
tears the old engine down explicitly and carries the AdamW moments (and
fp32 master weights under bf16/ZeRO) of every parameter that stays
trainable, unless ``prelora.reset_optimizer`` asks for fresh moments.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .config import Config
from .launch import DistInfo

#: Parameters that take no weight decay: biases, norms and the token/position
#: embeddings (timm's ViT recipe).
_NO_DECAY_NAMES = {"pos_embed", "cls_token", "reg_token", "dist_token"}


class BatchSizeError(ValueError):
    """The global batch does not equal micro batch x grad accumulation x world."""


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """'fp32', 'bf16' or 'fp16' for this device ('auto': bf16 on GPUs that have it)."""
    p = cfg.deepspeed.precision
    if p == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if device.type == "cpu" and p != "fp32":
        # DeepSpeed's CPU accelerator trains in fp32 only; saying so beats a
        # cryptic failure inside the optimizer wrapper.
        raise ValueError(f"deepspeed.precision={p} needs a GPU; use fp32 or auto on the CPU")
    return p


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks; checks the config's value.

    Raises BatchSizeError when ``deepspeed.train_batch_size`` is set and is not
    micro_batch_size x grad_accum_steps x world_size.
    """
    ds = cfg.deepspeed
    product = ds.micro_batch_size * ds.grad_accum_steps * world_size
    if ds.train_batch_size is not None and ds.train_batch_size != product:
        raise BatchSizeError(
            f"deepspeed.train_batch_size={ds.train_batch_size} but micro_batch_size "
            f"{ds.micro_batch_size} x grad_accum_steps {ds.grad_accum_steps} x world size "
            f"{world_size} = {product}")
    return product


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON config, derived from the run's YAML (one source of truth)."""
    ds = cfg.deepspeed
    out = {
        "train_batch_size": global_batch(cfg, world_size),
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if ds.zero_stage > 0:
        # Frozen base weights must not enter ZeRO's flat buffers.
        out["zero_optimization"].update(
            {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    out.update(ds.extra)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters only: 1-D parameters and
    token/position embeddings without decay, the rest with it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters: nothing for the optimizer to train")
    return groups


def lr_at(cfg: Config, step: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up, then cosine (or constant) decay to ``optim.min_lr``. A
    pure function of the global step, so it continues across engine
    rebuilds and resumes without a scheduler state.
    """
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, total_steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


@dataclass
class CarriedState:
    """Per-parameter optimizer state lifted out of an engine before teardown."""

    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    master: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    # ZeRO and the bf16 wrapper keep the torch optimizer as `.optimizer`.
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _key(name: str) -> str:
    # A parameter keeps its identity across LoRA injection, but its name
    # gains ".base_layer": carry state under the name it had before.
    return name.replace(".base_layer.", ".")


def _materialize_state(engine) -> None:
    """Create any missing AdamW state and (re)link DeepSpeed's per-parameter views.

    ZeRO and the bf16 wrapper link per-parameter views into their flat
    state once, right after the *first group's* first step, so parameters of
    later groups (e.g. the no-decay group) are never linked (DeepSpeed
    0.19.8). Relinking after every group has state fixes both reading and
    writing; creating the state first lets carried moments into a fresh
    engine before its first step.
    """
    base = _base_optimizer(engine)
    for g in base.param_groups:
        for p in g["params"]:
            st = base.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def extract_state(engine, model: nn.Module) -> CarriedState:
    """Copy AdamW moments (and fp32 masters) of every trainable parameter, by name.

    Works for a plain torch optimizer (ZeRO 0, fp32) and for DeepSpeed's
    partitioned ones (ZeRO 1/2, bf16) through its ``safe_get_full_*`` API.
    Every rank calls it (the gather inside is collective under ZeRO).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = CarriedState()
    _materialize_state(engine)
    base = _base_optimizer(engine)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
            st = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            master = safe_get_full_fp32_param(p)
            if master is not None:
                out.master[_key(name)] = master.detach().clone()
        else:
            st = {k: v for k, v in base.state.get(p, {}).items() if k in ("exp_avg", "exp_avg_sq")}
        st = {k: v.detach().clone() for k, v in st.items() if v is not None}
        if st:
            out.moments[_key(name)] = st
    for s in base.state.values():
        if "step" in s:
            out.step = max(out.step, int(torch.as_tensor(s["step"]).item()))
    return out


def restore_state(engine, model: nn.Module, carried: CarriedState) -> int:
    """Put carried moments back into a freshly built engine; returns how many
    parameters got their state back (new parameters start from zero)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _materialize_state(engine)
    base = _base_optimizer(engine)
    n = 0
    for name, p in model.named_parameters():
        st = carried.moments.get(_key(name))
        if not p.requires_grad or st is None:
            continue
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
            for k, v in st.items():
                safe_set_full_optimizer_state(p, v.to(p.device), k)
            if _key(name) in carried.master:
                safe_set_full_fp32_param(p, carried.master[_key(name)].to(p.device))
        else:
            state = base.state[p]
            for k, v in st.items():
                state[k] = v.to(p.device)
            state["step"] = torch.tensor(float(carried.step))
        n += 1
    if carried.step:
        # New adapters share flat groups with carried parameters under ZeRO;
        # one step count per group, the run's, keeps bias correction sane.
        for s in base.state.values():
            if "exp_avg" in s:
                s["step"] = torch.tensor(float(carried.step))
    return n


def build_engine(model: nn.Module, cfg: Config, dist: DistInfo):
    """Wrap ``model`` in a DeepSpeed engine that trains its ``requires_grad``
    parameters only (AdamW; lr set each step by the trainer).

    Returns the engine. Frozen parameters get no gradient buffer, no optimizer
    state and no place in the gradient all-reduce.
    """
    import deepspeed

    precision = resolve_precision(cfg, dist.device)
    ds_cfg = deepspeed_config(cfg, dist.world_size, precision)
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    # A client torch AdamW: no JIT-built fused kernel on the CPU, and the
    # same optimizer class whatever the device.
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  foreach=dist.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg,
        # One visible GPU per rank on Polaris: without this DeepSpeed calls
        # set_device(LOCAL_RANK) and ranks 1-3 fail.
        args=_DeviceArgs(dist.device.index) if dist.device.type == "cuda" else None,
    )
    return engine


class _DeviceArgs:
    """The one attribute of DeepSpeed's ``args`` that picks the GPU."""

    def __init__(self, device_rank: int):
        self.device_rank = device_rank


def destroy_engine(engine) -> None:
    """Tear an engine down so a rebuild does not accumulate memory
    (DeepSpeed #5674, #7204): destroy, drop gradients, collect, free cache."""
    module = engine.module
    engine.destroy()
    for p in module.parameters():
        p.grad = None
    engine.optimizer = None
    engine.lr_scheduler = None
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainable_in_engine(engine, model: nn.Module) -> set[str]:
    """Names of the model parameters the engine's optimizer updates."""
    base = _base_optimizer(engine)
    ids = set()
    # ZeRO replaces param groups with flat partitions; the original groups
    # are kept on the wrapper as `bit16_groups` / `round_robin_bit16_groups`.
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups:
            for g in groups:
                ids.update(id(p) for p in g)
            break
    else:
        for g in base.param_groups:
            ids.update(id(p) for p in g["params"])
    return {n for n, p in model.named_parameters() if id(p) in ids}
