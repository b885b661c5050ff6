"""LoRA layer, injection, freezing and merging on a tiny real timm ViT."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from run_helpers import rank_map_of, trainable_parameter_names
from prelora_hpc.lora import (
    LoRALinear,
    freeze_base,
    inject_lora,
    lora_modules,
    lora_parameters,
    merge_all,
    unfreeze_all,
)

VIT_ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)
# Different ranks per layer, so a layer given the wrong rank shows.
RANKS = {"blocks.0.attn.qkv": 4, "blocks.0.mlp.fc2": 2,
         "blocks.1.attn.proj": 8, "blocks.1.mlp.fc1": 1}
ADAPTER_NAMES = {f"{n}.lora_{ab}.weight" for n in RANKS for ab in "AB"}


def make_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **VIT_ARGS).eval()


def images(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_adapters(model: nn.Module, steps: int = 3) -> None:
    """A few Adam steps on the adapters only, so that every B becomes non-zero."""
    opt = torch.optim.Adam(lora_parameters(model), lr=0.05)
    x, y = images(2, 8), torch.arange(8) % 10
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for m in lora_modules(model).values():
        assert m.lora_B.weight.abs().sum() > 0


@pytest.fixture
def lora_vit() -> nn.Module:
    model = make_vit()
    inject_lora(model, RANKS, alpha=8.0)
    return model


def test_output_unchanged_at_init():
    model = make_vit()
    x = images()
    with torch.no_grad():
        before = model(x)
        inject_lora(model, RANKS, alpha=8.0)
        after = model(x)
    assert torch.equal(before, after)


def test_inject_touches_exactly_the_named_modules():
    model = make_vit()
    types_before = {n: type(m) for n, m in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    bases = {n: model.get_submodule(n) for n in RANKS}

    assert inject_lora(model, RANKS, alpha=8.0) == list(RANKS)

    assert rank_map_of(model) == RANKS
    modules_after = dict(model.named_modules())
    for name, t in types_before.items():
        if name in RANKS:
            wrapper = modules_after[name]
            assert isinstance(wrapper, LoRALinear) and wrapper.r == RANKS[name]
            assert wrapper.base_layer is bases[name]
        else:
            assert type(modules_after[name]) is t, name

    def key_after(key: str) -> str:
        module, _, leaf = key.rpartition(".")
        return f"{module}.base_layer.{leaf}" if module in RANKS else key

    state_after = model.state_dict()
    for key, value in state_before.items():
        assert torch.equal(state_after[key_after(key)], value), key
    assert set(state_after) - {key_after(k) for k in state_before} == ADAPTER_NAMES
    for name, r in RANKS.items():
        base = bases[name]
        assert state_after[f"{name}.lora_A.weight"].shape == (r, base.in_features)
        assert state_after[f"{name}.lora_B.weight"].shape == (base.out_features, r)


@pytest.mark.parametrize("rank_map, message", [
    ({"blocks.0.attn.qkv": 4, "blocks.9.attn.qkv": 4}, "blocks.9.attn.qkv"),
    ({"blocks.0.attn.qkv": 4, "blocks.0.norm1": 4}, "blocks.0.norm1"),
    ({"blocks.0.attn.qkv": 4, "blocks.0.attn.proj": 0}, "blocks.0.attn.proj"),
    ({"blocks.0.attn.qkv": 4, "blocks.0.attn.proj": 2.0}, "blocks.0.attn.proj"),
    ({"blocks.0.attn.qkv": 4, "blocks.0.attn.proj": True}, "blocks.0.attn.proj"),
    ({"": 4}, "''"),
])
def test_inject_rejects_bad_entries_and_changes_nothing(rank_map, message):
    model = make_vit()
    with pytest.raises(ValueError, match=message):
        inject_lora(model, rank_map, alpha=8.0)
    assert lora_modules(model) == {}


def test_inject_rejects_already_wrapped(lora_vit):
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.qkv.base_layer"):
        with pytest.raises(ValueError, match="already has a LoRA adapter"):
            inject_lora(lora_vit, {name: 4}, alpha=8.0)
    assert rank_map_of(lora_vit) == RANKS


def test_inject_rejects_bad_alpha_before_changing_anything():
    model = make_vit()
    with pytest.raises(ValueError, match="alpha"):
        inject_lora(model, RANKS, alpha=0.0)
    assert lora_modules(model) == {}


def test_merge_matches_unmerged_and_unmerge_restores(lora_vit):
    x = images()
    with torch.no_grad():
        base_logits = lora_vit(x)
    train_adapters(lora_vit)
    modules = lora_modules(lora_vit)
    original = {n: m.base_layer.weight.detach().clone() for n, m in modules.items()}
    with torch.no_grad():
        unmerged = lora_vit(x)
        assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # adapters matter
        for m in modules.values():
            m.merge()
        once = {n: m.base_layer.weight.detach().clone() for n, m in modules.items()}
        merged = lora_vit(x)
        for m in modules.values():
            m.merge()  # a second merge must not add the delta again
        assert all(torch.equal(m.base_layer.weight, once[n]) for n, m in modules.items())
        assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
        assert all(not torch.allclose(once[n], original[n]) for n in modules)

        for _ in range(2):  # unmerge is idempotent
            for m in modules.values():
                m.unmerge()
            for n, m in modules.items():
                assert torch.allclose(m.base_layer.weight, original[n], atol=1e-6, rtol=0), n
        assert torch.allclose(lora_vit(x), unmerged, atol=1e-5, rtol=0)


def test_safe_merge_refuses_non_finite_delta(lora_vit):
    layer = lora_modules(lora_vit)["blocks.0.mlp.fc2"]
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="blocks.0.mlp.fc2"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, before)
    assert not layer.merged

    others = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(lora_vit).items()}
    with pytest.raises(ValueError, match="blocks.0.mlp.fc2"):
        merge_all(lora_vit)
    assert set(lora_modules(lora_vit)) == set(RANKS)
    for n, m in lora_modules(lora_vit).items():
        assert torch.equal(m.base_layer.weight, others[n]) and not m.merged, n


def test_freeze_base_keeps_only_adapters(lora_vit):
    freeze_base(lora_vit, [])
    assert set(trainable_parameter_names(lora_vit)) == ADAPTER_NAMES
    assert {id(p) for p in lora_parameters(lora_vit)} == {
        id(p) for p in lora_vit.parameters() if p.requires_grad}


def test_freeze_base_keeps_selected_categories(lora_vit):
    expected = set(ADAPTER_NAMES)
    norms = 0
    for mname, mod in lora_vit.named_modules():
        if isinstance(mod, nn.LayerNorm):
            norms += 1
            expected |= {f"{mname}.{p}" for p, _ in mod.named_parameters(recurse=False)}
    assert norms == 2 * VIT_ARGS["depth"] + 1  # norm1, norm2 per block and the final norm
    expected |= {f"head.{p}" for p, _ in lora_vit.head.named_parameters()}
    expected |= {"pos_embed", "cls_token"}

    freeze_base(lora_vit, ["norm", "head", "pos_embed", "cls_token"])
    assert set(trainable_parameter_names(lora_vit)) == expected

    freeze_base(lora_vit, ["bias", "patch_embed"])
    assert set(trainable_parameter_names(lora_vit)) == ADAPTER_NAMES | {
        f"{n}.base_layer.bias" for n in RANKS} | {
        f"patch_embed.{p}" for p, _ in lora_vit.patch_embed.named_parameters()}

    unfreeze_all(lora_vit)
    assert all(p.requires_grad for p in lora_vit.parameters())


@pytest.mark.parametrize("keep", [["norms"], ["attn.qkv"], "norm"])
def test_freeze_base_rejects_unknown_category(lora_vit, keep):
    with pytest.raises(ValueError, match="keep"):
        freeze_base(lora_vit, keep)


def test_stage3_backward_reaches_only_adapters(lora_vit):
    freeze_base(lora_vit, [])
    lora_vit.train()
    loss = F.cross_entropy(lora_vit(images(3, 4)), torch.arange(4))
    loss.backward()
    adapters = {id(p) for p in lora_parameters(lora_vit)}
    for name, p in lora_vit.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so B (not A) receives the first non-zero gradient.
    for m in lora_modules(lora_vit).values():
        assert m.lora_B.weight.grad.abs().sum() > 0


def test_merge_all_gives_a_plain_timm_model(lora_vit):
    train_adapters(lora_vit)
    x = images()
    with torch.no_grad():
        lora_logits = lora_vit(x)
        merged = merge_all(lora_vit)
        merged_logits = merged(x)
    assert merged is lora_vit
    assert lora_modules(merged) == {}
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in RANKS)
    fresh = make_vit(seed=5)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    assert torch.allclose(merged_logits, lora_logits, atol=1e-5, rtol=0)

    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), lora_logits, atol=1e-5, rtol=0)


def test_layer_follows_the_base_dtype_and_casts_back():
    base = nn.Linear(6, 5).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=4.0)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert layer.scaling == 2.0
    assert layer.delta_weight().dtype == torch.bfloat16
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert "r=2" in repr(layer) and "scaling=2" in repr(layer)

    # Adapters kept in a wider dtype than the base: the output stays in the base's.
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4.0)
    layer.lora_A.double()
    layer.lora_B.double()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    out = layer(x)
    assert out.dtype == torch.float32
    branch = x.double() @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    expected = layer.base_layer(x) + branch.float()
    assert torch.allclose(out, expected, atol=1e-6)


def test_dropout_zero_adds_no_module_and_positive_dropout_applies_in_training():
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0).lora_dropout, nn.Identity)
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
        x = torch.ones(64, 4)
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0, dropout=1.0)


def test_freeze_base_selects_by_type_and_exact_name_not_substring(lora_vit):
    # Decoys whose names contain a category's name but are not what it means.
    lora_vit.pos_embed_scale = nn.Parameter(torch.ones(1))
    lora_vit.blocks[0].cls_token_gate = nn.Parameter(torch.ones(1))
    lora_vit.blocks[0].norm_gate = nn.Linear(2, 2)
    lora_vit.heads_extra = nn.Linear(2, 2)
    lora_vit.blocks[1].head = nn.Linear(2, 2)
    freeze_base(lora_vit, ["norm", "head", "pos_embed", "cls_token", "patch_embed", "bias"])
    trainable = set(trainable_parameter_names(lora_vit))
    for decoy in ("pos_embed_scale", "blocks.0.cls_token_gate", "blocks.0.norm_gate.weight",
                  "heads_extra.weight", "blocks.1.head.weight"):
        assert decoy not in trainable
    assert {"pos_embed", "cls_token", "head.weight", "norm.weight"} <= trainable


@pytest.mark.parametrize("r,alpha", [(8, 16.0), (16, 16.0), (4, 16.0), (6, 16.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_are_the_peft_formula_to_float_rounding(r, alpha, bias):
    """The layer scales the rank-r intermediate, B (s A x), where PEFT
    writes s B (A x), accumulates the branch inside the base output's
    matmul and computes the backward's rank-r products in another
    orientation: output and gradients agree with PEFT's formula to float
    rounding, and every gradient is contiguous."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(96, 288, bias=bias), r=r, alpha=alpha)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 17, 96, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = layer.base_layer(ref_x) + layer.lora_B(layer.lora_A(ref_x)) * layer.scaling
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (out - layer.base_layer(ref_x)).abs().max() > 1e-2 * ref.abs().max()  # the branch counts
    g = torch.randn_like(out)
    params = [layer.lora_A.weight, layer.lora_B.weight] + ([layer.base_layer.bias] if bias else [])
    grads = torch.autograd.grad(out, [x, *params], g)
    ref_grads = torch.autograd.grad(ref, [ref_x, *params], g)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and a.is_contiguous()
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def _reference(layer, x):
    """PEFT's formula through the child modules, autograd's own backward."""
    return layer.base_layer(x) + layer.lora_B(layer.lora_A(layer.lora_dropout(x))) * layer.scaling


@pytest.mark.parametrize("dropout,base_trains", [(0.0, True), (0.25, False), (0.25, True)])
def test_fused_layer_trains_like_the_formula_with_dropout_and_a_training_base(dropout, base_trains):
    """Stage 2 trains the base weight beside the adapters, and dropout gives
    the branch its own input: the one-node layer's output and every gradient
    (x, W, b, A, B) match autograd through PEFT's formula, with the same
    dropout mask."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 80), r=8, alpha=16.0, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight)
    layer.base_layer.weight.requires_grad_(base_trains)
    layer.train()
    x = torch.randn(3, 5, 48, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    ref = _reference(layer, x)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *params], g),
                    torch.autograd.grad(ref, [x, *params], g)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_fused_layer_under_autocast_computes_in_the_autocast_dtype():
    """Under autocast (the DDP peer's bf16) every operand is cast as F.linear
    would be: the output is bf16, the gradients come back in each
    parameter's own dtype, and they match the formula run under the same
    autocast to bf16 precision."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 64), r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = _reference(layer, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [layer.lora_A.weight, layer.lora_B.weight], g)
    ref_grads = torch.autograd.grad(ref, [layer.lora_A.weight, layer.lora_B.weight], g)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_adapter_learning_rate_ramps_from_the_step_the_adapters_were_created():
    """lora.warmup_steps: the adapters' rate climbs linearly from the switch,
    the base's follows the schedule untouched, and set_lr gives each group
    its own rate times its multiple."""
    from types import SimpleNamespace

    from prelora_hpc.config import Config
    from prelora_hpc.engine import learning_rates, lr_at, param_groups, set_lr

    cfg = Config()
    cfg.optim.schedule, cfg.optim.warmup_steps = "constant", 0
    cfg.lora.warmup_steps = 4
    assert [learning_rates(cfg, s, 100, 10)[1] / cfg.optim.lr for s in (10, 11, 13, 14, 50)] \
        == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert learning_rates(cfg, 11, 100, 10)[0] == lr_at(cfg, 11, 100) == cfg.optim.lr
    assert learning_rates(cfg, 1, 100, None)[1] == 0.5 * cfg.optim.lr  # mode lora: from step 0
    cfg.lora.warmup_steps = 0
    assert learning_rates(cfg, 10, 100, 10) == (cfg.optim.lr, cfg.optim.lr)

    model = make_vit()
    inject_lora(model, RANKS, alpha=16.0)
    freeze_base(model, ["head"])
    groups = param_groups(model, 0.05, lora_lr_scale=2.0, lora_lr_ratio_b=4.0)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(SimpleNamespace(optimizer=opt), 0.1, adapter_lr=0.01)
    got = sorted((g["adapter"], round(g["lr"], 6)) for g in opt.param_groups)
    assert got == [(False, 0.1), (False, 0.1), (True, 0.02), (True, 0.08)]
