"""Export: the merged model is a plain timm model with the trained logits, and
PEFT reads the adapters onto the exported base."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from prelora_hpc.export import export, load_trained

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def trained(uninterrupted_run):
    return uninterrupted_run    # in stage 3 from step 6 of 16


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export(trained, tmp_path_factory.mktemp("export"))


def test_merged_model_loads_into_fresh_timm_and_matches_lora_logits(trained, exported):
    _, lora_model, point = load_trained(trained)
    assert point.stage == 3
    kw = json.loads((exported / "model.json").read_text())
    fresh = timm.create_model(kw.pop("model_name"), pretrained=False,
                              **{k: v for k, v in kw.items()
                                 if k not in ("checkpoint", "stage", "global_step")})
    fresh.load_state_dict(load_file(exported / "model.safetensors"), strict=True)
    fresh.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fresh(x), lora_model(x), atol=1e-4)


def test_peft_reads_the_adapters_onto_the_exported_base(trained, exported):
    peft = pytest.importorskip("peft")
    _, lora_model, _ = load_trained(trained)
    kw = json.loads((exported / "model.json").read_text())
    base = timm.create_model(kw["model_name"], pretrained=False, img_size=kw["img_size"],
                             num_classes=kw["num_classes"], patch_size=kw["patch_size"],
                             embed_dim=kw["embed_dim"], depth=kw["depth"],
                             num_heads=kw["num_heads"])
    base.load_state_dict(load_file(exported / "base_model.safetensors"), strict=True)
    model = peft.PeftModel.from_pretrained(base, str(exported / "adapter")).eval()
    cfg = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert len(cfg["rank_pattern"]) == len(cfg["target_modules"]) == 8
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), lora_model(x), atol=1e-4)
    ranks = {n: m.r["default"] for n, m in model.base_model.model.named_modules()
             if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict)}
    assert sorted(ranks.values()) == sorted(cfg["rank_pattern"].values())


def test_export_usage_and_config_errors_exit_2(tmp_path, capsys):
    from prelora_hpc import export as export_mod

    assert export_mod.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("optim:\n  lrr: 1\n")
    assert export_mod.main([str(tmp_path)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
