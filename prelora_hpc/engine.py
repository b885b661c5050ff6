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

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .config import Config, ConfigError
from .dist_init import DistInfo
from .lora import LoRALinear, lora_modules

#: Parameters that take no weight decay: biases, norms and the token/position
#: embeddings (timm's ViT recipe).
_NO_DECAY_NAMES = {"pos_embed", "cls_token", "reg_token", "dist_token"}


class BatchSizeError(ConfigError):
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
        raise ConfigError(f"deepspeed.precision={p} needs a GPU; use fp32 or auto on the CPU")
    return p


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro batches per optimizer step on ``world_size`` ranks.

    ``deepspeed.grad_accum_steps: auto`` derives it from
    ``train_batch_size / (micro_batch_size x world_size)`` (1 when no
    global batch is set), so a job keeps its global batch on any node count.
    Raises BatchSizeError, in one line, when that does not divide.
    """
    ds = cfg.deepspeed
    if ds.grad_accum_steps != "auto":
        return ds.grad_accum_steps
    if ds.train_batch_size is None:
        return 1
    per_step = ds.micro_batch_size * world_size
    if ds.train_batch_size % per_step:
        raise BatchSizeError(
            f"deepspeed.train_batch_size={ds.train_batch_size} is not a multiple of "
            f"micro_batch_size {ds.micro_batch_size} x world size {world_size} = {per_step}, "
            f"so grad_accum_steps: auto cannot keep it; choose a node count or micro batch "
            f"that divides it")
    return ds.train_batch_size // per_step


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks; checks the config's value.

    Raises BatchSizeError when ``deepspeed.train_batch_size`` is set and is not
    micro_batch_size x grad_accum_steps x world_size.
    """
    ds = cfg.deepspeed
    accum = accumulation_steps(cfg, world_size)
    product = ds.micro_batch_size * accum * world_size
    if ds.train_batch_size is not None and ds.train_batch_size != product:
        raise BatchSizeError(
            f"deepspeed.train_batch_size={ds.train_batch_size} but micro_batch_size "
            f"{ds.micro_batch_size} x grad_accum_steps {accum} x world size "
            f"{world_size} = {product}; set deepspeed.grad_accum_steps: auto to derive it")
    return product


def deepspeed_config(cfg: Config, world_size: int, precision: str,
                     device_type: str = "cpu") -> dict:
    """The DeepSpeed JSON config, derived from the run's YAML (one source of
    truth), for ranks on ``device_type`` ('cuda' or 'cpu')."""
    ds = cfg.deepspeed
    out = {
        "train_batch_size": global_batch(cfg, world_size),
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
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
        overlap = device_type == "cuda" if ds.overlap_comm == "auto" else bool(ds.overlap_comm)
        # Only parameters with requires_grad get ZeRO's gradient hooks (0.17.6
        # and 0.19.8 alike), so frozen base weights never enter its buckets,
        # overlapped or not.
        out["zero_optimization"].update(
            {"overlap_comm": overlap, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    out.update(ds.extra)
    return out


def param_groups(model: nn.Module, weight_decay: float, lora_lr_scale: float = 1.0,
                 lora_lr_ratio_b: float = 1.0) -> list[dict]:
    """AdamW groups over the trainable parameters only.

    Base parameters: 1-D ones and token/position embeddings without decay,
    the rest with it, both at the run's learning rate. Adapters: every
    ``lora_A`` in one group and every ``lora_B`` in another, at
    ``lora_lr_scale`` and ``lora_lr_scale * lora_lr_ratio_b`` times the run's
    rate. Each group carries its multiple as ``lr_scale`` and whether it
    holds adapters as ``adapter`` (``set_lr`` reads both). Adapters in groups
    of their own also give them their own step count under ZeRO, whose flat
    partitions hold one AdamW step per group: new adapters start at step 0
    while carried base parameters keep theirs.
    """
    lora_a, lora_b = set(), set()
    for m in lora_modules(model).values():
        lora_a.add(id(m.lora_A.weight))
        lora_b.add(id(m.lora_B.weight))
    decay, no_decay, a_params, b_params = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in lora_a:
            a_params.append(p)
        elif id(p) in lora_b:
            b_params.append(p)
        elif p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    for params, wd, scale in ((decay, weight_decay, 1.0), (no_decay, 0.0, 1.0),
                              (a_params, weight_decay, lora_lr_scale),
                              (b_params, weight_decay, lora_lr_scale * lora_lr_ratio_b)):
        if params:
            groups.append({"params": params, "weight_decay": wd, "lr_scale": scale,
                           "adapter": params is a_params or params is b_params})
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


def learning_rates(cfg: Config, step: int, total_steps: int,
                   adapters_since: Optional[int]) -> tuple[float, float]:
    """(base, adapter) learning rates at optimizer step ``step``: the base
    follows ``lr_at``; the adapters, created at step ``adapters_since`` (None:
    at step 0, mode 'lora'), ramp from 0 to it over ``lora.warmup_steps``."""
    lr = lr_at(cfg, step, total_steps)
    ramp = cfg.lora.warmup_steps
    if not ramp:
        return lr, lr
    done = step - (adapters_since or 0)
    return lr, lr * min(1.0, max(0, done + 1) / ramp)


@dataclass
class CarriedState:
    """Per-parameter optimizer state lifted out of an engine before teardown."""

    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    master: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    """AdamW step count of each carried parameter (its group's under ZeRO)."""


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside an engine (ZeRO and the bf16 wrapper keep it
    as ``.optimizer``); its ``param_groups`` are the ones ``param_groups`` built."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def set_lr(engine, lr: float, adapter_lr: Optional[float] = None) -> None:
    """Set the run's learning rate: each group gets ``lr`` (adapter groups
    ``adapter_lr``, default ``lr``) times its ``lr_scale``."""
    for g in base_optimizer(engine).param_groups:
        use = adapter_lr if adapter_lr is not None and g.get("adapter") else lr
        g["lr"] = use * g["lr_scale"]


def current_lr(engine) -> float:
    """The run's learning rate as last set (the first group's over its scale)."""
    g = base_optimizer(engine).param_groups[0]
    return g["lr"] / g["lr_scale"]


@contextlib.contextmanager
def update_skipped(engine):
    """Within this context, ``engine.step()`` at an accumulation boundary
    leaves the weights and the optimizer state as they are: for a step whose
    loss was not finite on some rank (its gradients, all-reduced, are not
    finite on any rank).

    The torch AdamW inside the engine (``base_optimizer``) does nothing when
    stepped; everything around it runs as usual, so DeepSpeed's counters
    advance (its accumulation boundaries stay where the trainer counts them)
    and its wrappers clear the gradients and copy the unchanged master
    weights back. This touches only our own optimizer object, no DeepSpeed
    internals, and behaves the same under ZeRO 0-3 in DeepSpeed 0.17.6 and
    0.19.8.
    """
    opt = base_optimizer(engine)
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del opt.step


def group_parameters(engine) -> list[list[nn.Parameter]]:
    """The model parameters of each optimizer group, in group order.

    ZeRO replaces each group's parameters with one flat partition and keeps
    the originals on the wrapper (``bit16_groups``; ``bf16_groups`` in the
    bf16 optimizer), in the same group order (DeepSpeed 0.17.6 and 0.19.8).
    """
    sub = _zero3_subgroups(engine)
    if sub is not None:
        groups: list[list[nn.Parameter]] = [[] for _ in base_optimizer(engine).param_groups]
        for group, params, _ in sub:
            groups[group] += params
        return groups
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups:
            return [list(g) for g in groups]
    return [list(g["params"]) for g in base_optimizer(engine).param_groups]


def _zero3_subgroups(engine) -> Optional[list[tuple[int, list[nn.Parameter], torch.Tensor]]]:
    """ZeRO-3's sub-groups as (optimizer group, model parameters, flat fp32
    partition); None for any other engine.

    ZeRO-3 keys AdamW's state by one flat fp32 partition per sub-group and
    puts it into the torch optimizer's group only while stepping it (the
    group's ``params`` is empty in between), so the state and step counts
    are reached through these (``fp32_partitioned_groups_flat``,
    ``fp16_groups``, ``sub_group_to_group_id``: DeepSpeed 0.17.6 and
    0.19.8, read in both).
    """
    opt = engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    to_group = getattr(opt, "sub_group_to_group_id", None)
    if not flat or to_group is None:
        return None
    return [(to_group[i], list(opt.fp16_groups[i]), flat[i]) for i in range(len(flat))]


def _key(name: str) -> str:
    # A parameter keeps its identity across LoRA injection, but its name
    # gains ".base_layer": carry state under the name it had before.
    return name.replace(".base_layer.", ".")


def _materialize_state(engine) -> None:
    """Create any missing AdamW state and (re)link DeepSpeed's per-parameter views.

    ZeRO and the bf16 wrapper link per-parameter views into their flat
    state once, right after the *first group's* first step, so parameters of
    later groups (e.g. the no-decay group) are never linked (DeepSpeed
    0.17.6 and 0.19.8, read in both). Relinking after every group has state fixes both reading and
    writing; creating the state first lets carried moments into a fresh
    engine before its first step.
    """
    base = base_optimizer(engine)
    sub = _zero3_subgroups(engine) or []
    for p in [p for g in base.param_groups for p in g["params"]] + [f for _, _, f in sub]:
        st = base.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _group_steps(engine) -> list[tuple[list[nn.Parameter], list[dict]]]:
    """Each group's model parameters with the optimizer state entries that
    hold its step count: one per parameter for a torch optimizer, the flat
    partition's under ZeRO."""
    base = base_optimizer(engine)
    sub = _zero3_subgroups(engine)
    if sub is not None:
        states: list[list[dict]] = [[] for _ in base.param_groups]
        for group, _, flat in sub:
            states[group].append(base.state[flat])
    else:
        states = [[base.state[q] for q in g["params"]] for g in base.param_groups]
    return list(zip(group_parameters(engine), states))


def extract_state(engine, model: nn.Module) -> CarriedState:
    """Copy AdamW moments, step counts (and fp32 masters) of every trainable
    parameter, by name.

    Works for a plain torch optimizer (ZeRO 0, fp32) and for DeepSpeed's
    partitioned ones (ZeRO 1/2, bf16) through its ``safe_get_full_*`` API.
    Every rank calls it (the gather inside is collective under ZeRO).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = CarriedState()
    _materialize_state(engine)
    base = base_optimizer(engine)
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
    names = {id(p): _key(n) for n, p in model.named_parameters()}
    for params, states in _group_steps(engine):
        step = max((int(torch.as_tensor(s["step"]).item()) for s in states if "step" in s),
                   default=0)
        for p in params:
            out.steps[names[id(p)]] = step
    return out


def restore_state(engine, model: nn.Module, carried: CarriedState) -> int:
    """Put carried moments and step counts back into a freshly built engine;
    returns how many parameters got their state back.

    Parameters new to the optimizer (adapters injected at the switch) keep
    zero moments and step 0, so AdamW's bias correction treats them as the
    fresh parameters they are; a group of carried parameters resumes its
    step count.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _materialize_state(engine)
    base = base_optimizer(engine)
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
        n += 1
    names = {id(p): _key(n) for n, p in model.named_parameters()}
    for params, states in _group_steps(engine):
        steps = [carried.steps[names[id(p)]] for p in params
                 if names[id(p)] in carried.moments and names[id(p)] in carried.steps]
        if not steps:
            continue  # a group of new parameters: step 0
        # param_groups keeps new and carried parameters in separate groups;
        # a mixed group (not built by it) resumes the carried count.
        for s in states:
            s["step"] = torch.tensor(float(max(steps)))
    return n


def local_part(weight: torch.Tensor) -> torch.Tensor:
    """The part of ``weight`` this rank holds: its ZeRO-3 partition
    (DeepSpeed's ``ds_tensor``) where ZeRO-3 partitions it, else all of it."""
    part = getattr(weight, "ds_tensor", None)
    return weight if part is None else part


def build_engine(model: nn.Module, cfg: Config, dist: DistInfo):
    """Wrap ``model`` in a DeepSpeed engine that trains its ``requires_grad``
    parameters only (AdamW; lr set each step by the trainer).

    Returns the engine. Frozen parameters get no gradient buffer, no optimizer
    state and no place in the gradient all-reduce. With ``model.compile`` the
    model's forward is compiled for this stage.
    """
    import deepspeed

    precision = resolve_precision(cfg, dist.device)
    ds_cfg = deepspeed_config(cfg, dist.world_size, precision, dist.device.type)
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, cfg.lora.lr_scale, cfg.lora.lr_ratio_b)
    # A client torch AdamW: no JIT-built fused kernel on the CPU, and the
    # same optimizer class whatever the device.
    # foreach on the CPU too: the same arithmetic, bit for bit, in a few
    # calls instead of a Python loop over every tensor.
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  foreach=True)
    if cfg.deepspeed.zero_stage == 3 and lora_modules(model):
        # lora.lora_linear reads the base and adapter weights inside the
        # LoRALinear itself, not through its child Linears' forwards, where
        # ZeRO-3 gathers (and prefetches) partitioned parameters. Unmarked,
        # DeepSpeed would still gather each on attribute access, one at a
        # time, as an "external parameter"; as a leaf module, its
        # pre-forward hook gathers all of them the normal way. A public
        # DeepSpeed API, tested on 0.17.6 and 0.19.8.
        deepspeed.utils.set_z3_leaf_modules(model, [LoRALinear])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg,
        # One visible GPU per rank on Polaris: without this DeepSpeed calls
        # set_device(LOCAL_RANK) and ranks 1-3 fail.
        args=_DeviceArgs(dist.device.index) if dist.device.type == "cuda" else None,
    )
    if cfg.model.compile:
        # In place (nn.Module.compile): parameter and state-dict names stay
        # as they are, so checkpoints, rank maps and resume are unchanged.
        # Called again on each rebuild, it replaces the previous stage's
        # compiled forward with a fresh one for the module's new shape.
        model.compile(backend=cfg.model.compile_backend)
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
    ids = {id(p) for g in group_parameters(engine) for p in g}
    return {n for n, p in model.named_parameters() if id(p) in ids}
