"""LoRA adapters for the linear layers of a timm ViT: inject, freeze, merge.

The layer follows PEFT's LoRA ``Linear`` so an exported adapter reads back
into PEFT unchanged: the wrapped layer stays as ``base_layer`` and the state
dict holds ``<name>.lora_A.weight`` [r, in] and ``<name>.lora_B.weight``
[out, r] beside ``<name>.base_layer.weight``.

    names = inject_lora(model, {"blocks.0.attn.qkv": 16, ...}, alpha=16.0)  # stage 2
    freeze_base(model, cfg.prelora.stage3_trainable)                      # stage 3
    merge_all(model)                                  # a plain timm model again

Module rewrites happen before an optimizer or engine is built over the
model; rebuild both afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.layers import norm as timm_norm

# timm's RMS/simple norms do not derive from torch's norm classes; looked up
# leniently because the older timm releases we allow lack some of them.
_TIMM_NORM_NAMES = ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32",
                    "SimpleNorm", "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32")
NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    *(getattr(timm_norm, n) for n in _TIMM_NORM_NAMES if hasattr(timm_norm, n)))
"""Module types whose parameters the 'norm' category keeps trainable."""

KEEP_CATEGORIES = ("norm", "pos_embed", "cls_token", "head", "patch_embed", "bias")
"""What ``freeze_base`` may keep trainable beside the adapters."""


def _check_hparams(where: str, r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: rank must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """``base_layer(x) + B(A(dropout(x))) * alpha / r`` around an ``nn.Linear``.

    Args:
        base_layer: the wrapped layer, weight [out, in]; kept, not copied.
        r: adapter rank, a positive int.
        alpha: LoRA alpha (> 0); the branch is scaled by ``alpha / r``.
        dropout: dropout probability on the branch input, in [0, 1).
        name: the layer's dotted name in its model, used in error messages.

    A is Kaiming-uniform and B zero (PEFT's default), so at creation the
    output equals the base layer's exactly.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float,
                 dropout: float = 0.0, name: str = "") -> None:
        super().__init__()
        where = f"LoRA layer {name!r}" if name else "LoRA layer"
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"{where}: base layer must be nn.Linear, "
                             f"got {type(base_layer).__name__}")
        _check_hparams(where, r, alpha, dropout)
        self.base_layer = base_layer
        self.name = name
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        # Identity, not Dropout(p=0): no dropout kernel runs at all.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    # Delegated to the base layer: timm code sometimes reads .weight/.bias of
    # what it built as a Linear. ``weight`` excludes the adapter's delta.
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], in the base layer's output dtype."""
        if self.merged:
            return self.base_layer(x)
        # Dropout() is a module, not an op inside lora_linear, so that with
        # dropout the branch reads its own input; without it the branch
        # shares x and the two input gradients fuse into one buffer.
        branch = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias,
                           self.lora_A.weight, self.lora_B.weight, self.scaling, branch)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``, [out, in], computed in float32, in the base dtype."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float()
        return ((b @ a) * self.scaling).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor: the base weight with the delta added, [out, in]."""
        return self.base_layer.weight + self.delta_weight()

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Add the delta into the base weight; a no-op if already merged.

        With ``safe`` the sum is formed in a copy first and a non-finite
        result raises ValueError, leaving the base weight untouched.
        """
        if self.merged:
            return
        if safe:
            new = self.merged_weight()
            if not torch.isfinite(new).all():
                raise ValueError(f"LoRA layer {self.name!r}: merging gives non-finite "
                                 "weights; the adapter is broken, base weight left unchanged")
            self.base_layer.weight.copy_(new)
        else:
            self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta from the base weight; a no-op if not merged."""
        if not self.merged:
            return
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                x_branch: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b + B (s A x_branch)`` as one autograd node; ``B @ A`` is never formed.

    Shapes: x and x_branch [..., in], weight [out, in], bias [out] or None,
    lora_a [r, in], lora_b [out, r]; returns [..., out]. ``x_branch``
    (dropout's output) defaults to x itself. Under autocast every operand
    is cast to the autocast dtype first, as ``F.linear`` would be; otherwise
    the result has the base weight's dtype.

    The same arithmetic as ``base(x) + lora_B(lora_A(x) * s)`` (to float
    rounding) for less work per call, which at rank 4-16 on 96-1024-wide
    layers is what stage 3 costs above its floor: the branch and the
    input's second gradient each accumulate inside one matmul (``addmm_``)
    instead of through a full-size sum, one autograd node replaces nine, and
    the rank-r products run in the orientation the CPU BLAS does fastest
    (``gy @ B`` with 4 columns is 4x slower there than ``(B^T gy^T)^T``).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    # Casts outside the node: autograd carries their gradients back to each
    # operand's own dtype; all are no-ops when the dtypes already agree.
    args = [t if t is None else t.to(dtype) for t in (x, x_branch, weight, bias, lora_a, lora_b)]
    with torch.autocast(device_type, enabled=False):
        return _LoRALinearFn.apply(*args, scaling)


class _LoRALinearFn(torch.autograd.Function):
    """The forward and backward of ``lora_linear``; tensors as documented there."""

    @staticmethod
    def forward(ctx, x, x_branch, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xb = x2 if x_branch is None else x_branch.reshape(-1, shape[-1])
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        h = (xb @ lora_a.t()).mul_(scaling)
        # Into y in place: no [T, out] temporary for the branch, which at
        # rank 4-16 costs more than the rank-r product itself.
        y.addmm_(h, lora_b.t())
        ctx.save_for_backward(x2, None if x_branch is None else xb, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.has_bias = bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, xb, weight, lora_a, lora_b, h = ctx.saved_tensors
        fused = xb is None
        xb = x2 if fused else xb
        need_x, need_xb, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        gy = gy.reshape(-1, gy.shape[-1])
        # [r, T] products transposed back: see the docstring of lora_linear.
        gh = (lora_b.t() @ gy.t()).t().mul_(ctx.scaling)                 # [T, r]
        g_lb = (h.t() @ gy).t().contiguous() if need_lb else None       # [out, r]
        g_a = gh.t() @ xb if need_a else None                           # [r, in]
        g_w = gy.t() @ x2 if need_w else None                           # [out, in]
        g_b = gy.sum(0) if ctx.has_bias and need_b else None            # [out]
        g_x = g_xb = None
        if need_x:
            g_x = gy @ weight
            if fused:
                g_x.addmm_(gh, lora_a)
            g_x = g_x.view(ctx.shape)
        if not fused and need_xb:
            g_xb = (gh @ lora_a).view(ctx.shape)
        return g_x, g_xb, g_w, g_b, g_a, g_lb, None


def _lookup(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def inject_lora(model: nn.Module, rank_map: dict[str, int], alpha: float,
                dropout: float = 0.0) -> list[str]:
    """Wrap each named ``nn.Linear`` in a LoRALinear of exactly its rank, in place.

    ``rank_map`` maps full dotted module names (``blocks.3.attn.qkv``) to
    ranks. Every entry is checked before anything changes, and ValueError
    names the module that does not exist, is not an ``nn.Linear``, is
    already wrapped (or inside a wrapper), or has a rank that is not a
    positive int. Returns the names replaced, in ``rank_map`` order.
    """
    for name, r in rank_map.items():
        module = _lookup(model, name)
        if module is None:
            raise ValueError(f"inject_lora: model has no module {name!r}")
        parent_name = name.rpartition(".")[0]
        if isinstance(module, LoRALinear) or isinstance(_lookup(model, parent_name), LoRALinear):
            raise ValueError(f"inject_lora: module {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"inject_lora: module {name!r} is a {type(module).__name__}, "
                             "not an nn.Linear")
        _check_hparams(f"inject_lora: module {name!r}", r, alpha, dropout)
    for name, r in rank_map.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        wrapper = LoRALinear(base, r, alpha, dropout, name=name)
        wrapper.train(base.training)
        setattr(parent, child, wrapper)
    return list(rank_map)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of ``model`` by dotted name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter weights (each layer's A then B) and nothing else."""
    return [p for m in lora_modules(model).values()
            for p in (m.lora_A.weight, m.lora_B.weight)]


def _kept_parameters(model: nn.Module, keep: Iterable[str]) -> list[nn.Parameter]:
    """Parameters that ``keep`` selects, by module type and exact name."""
    if isinstance(keep, str):
        raise ValueError(f"freeze_base: keep must be a list of categories, got the string {keep!r}")
    top_params = dict(model.named_parameters(recurse=False))
    top_modules = dict(model.named_children())
    out: list[nn.Parameter] = []
    for cat in keep:
        if cat not in KEEP_CATEGORIES:
            raise ValueError(f"freeze_base: unknown keep category {cat!r}; "
                             f"allowed: {list(KEEP_CATEGORIES)}")
        # A category the model does not have (a ViT without cls token)
        # selects nothing: the config default must fit every timm ViT.
        if cat == "norm":
            out += [p for m in model.modules() if isinstance(m, NORM_TYPES)
                    for p in m.parameters(recurse=False)]
        elif cat in ("pos_embed", "cls_token"):
            names = ("cls_token", "reg_token") if cat == "cls_token" else ("pos_embed",)
            out += [top_params[n] for n in names if n in top_params]
        elif cat in ("head", "patch_embed"):
            if cat in top_modules:
                out += list(top_modules[cat].parameters())
        else:  # bias
            out += [m.base_layer.bias for m in lora_modules(model).values()
                    if m.base_layer.bias is not None]
    return out


def freeze_base(model: nn.Module, keep: Iterable[str] = ()) -> None:
    """Stage 3: only the adapters and what ``keep`` selects stay trainable.

    ``keep`` holds categories (``prelora.stage3_trainable``): 'norm' (every
    module in NORM_TYPES), 'pos_embed' and 'cls_token' (the top-level
    parameters of exactly those names; 'cls_token' includes 'reg_token'),
    'head' and 'patch_embed' (everything under the top-level module of that
    name), 'bias' (the bias of every adapted linear). ValueError for an
    unknown category. Adapters and kept parameters get requires_grad True,
    everything else False.
    """
    trainable = {id(p) for p in _kept_parameters(model, keep)}
    trainable |= {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def unfreeze_all(model: nn.Module) -> None:
    """Stage 2: every parameter, base and adapter, trains."""
    for p in model.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def merge_all(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain ``nn.Linear`` back, in place.

    The result has the state-dict keys of a fresh timm model of the same
    config. Every merge is checked to be finite before any weight changes;
    ValueError names the first broken layer. Under ZeRO-3, call this with
    the parameters gathered. requires_grad flags are left as they are.
    Returns ``model``.
    """
    modules = lora_modules(model)
    for name, m in modules.items():
        if not m.merged and not torch.isfinite(m.merged_weight()).all():
            raise ValueError(f"merge_all: merging LoRA layer {name!r} gives non-finite "
                             "weights; no layer was changed")
    for name, m in modules.items():
        m.merge(safe=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base_layer)
    return model
