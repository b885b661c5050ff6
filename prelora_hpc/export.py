"""Export a trained run for use outside this project.

    prelora-export RUN_DIR [--checkpoint TAG_DIR] [--out DIR]

writes into DIR (default RUN_DIR/export):

- ``model.safetensors`` + ``model.json``: the adapters merged into the base,
  a plain timm state dict: ``timm.create_model(**model.json).load_state_dict(...)``.
- ``base_model.safetensors``: the unmerged base (norms, head and whatever
  else trained in stage 3 included), the model PEFT's adapters sit on.
- ``adapter/adapter_model.safetensors`` + ``adapter/adapter_config.json``:
  the adapters alone in PEFT's LoRA format, one exact ``rank_pattern`` and
  ``alpha_pattern`` entry per layer so PEFT reproduces each layer's scale.

Runs in one process on the CPU, no MPI needed. ZeRO 1-3 checkpoints are
consolidated with DeepSpeed's own ``zero_to_fp32`` first (gather before merge).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config
from .lora import lora_modules, merge_all
from .model import build_model
from .stages import shape_for_stage

MODEL_KWARGS = ("img_size", "num_classes", "patch_size", "embed_dim", "depth", "num_heads",
                "in_chans")


def timm_kwargs(cfg: Config) -> dict:
    """``timm.create_model`` arguments that recreate the run's architecture."""
    kw = {"model_name": cfg.model.name}
    for k in MODEL_KWARGS:
        v = getattr(cfg.model, k)
        if v is not None:
            kw[k] = v
    return kw


def load_trained(run_dir: Path, checkpoint: Optional[str] = None):
    """The run's model with its checkpointed weights (LoRA injected if the
    checkpoint is past the switch). Returns (cfg, model, resume point)."""
    cfg = load_config(Path(run_dir) / "config.yaml",
                      [f"run.output_dir={run_dir}", "checkpoint.resume=auto"])
    point = ckpt.find_resume(cfg, checkpoint)
    if point is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export")
    model = build_model(cfg.model)
    # A lora run's checkpoints say stage 3 from step 0; either way the
    # model takes the shape it was saved in.
    shape_for_stage(model, point.stage, point.rank_map, cfg)
    if cfg.deepspeed.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(point.load_dir), tag=point.tag)
    else:
        files = sorted(point.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{point.path} holds no model states file")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return cfg, model.float().eval(), point


def peft_adapter(model, cfg: Config) -> tuple[dict, dict]:
    """PEFT LoRA tensors and adapter_config for the injected adapters."""
    mods = lora_modules(model)
    tensors, ranks, alphas = {}, {}, {}
    for name, m in mods.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
        # Patterns are regexes matched at the end of module names: escaped
        # full names cannot match another layer (blocks.1 vs blocks.11).
        key = re.escape(name)
        ranks[key] = m.r
        alphas[key] = m.scaling * m.r
    default_r = max(ranks.values()) if ranks else 8
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "target_modules": sorted(mods), "r": default_r, "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout, "rank_pattern": ranks, "alpha_pattern": alphas,
        "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    return tensors, config


def export(run_dir: Path, out: Optional[Path] = None, checkpoint: Optional[str] = None) -> Path:
    """Write the merged model, the base and the PEFT adapter; returns ``out``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "export"
    cfg, model, point = load_trained(run_dir, checkpoint)
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if lora_modules(model):
        tensors, config = peft_adapter(model, cfg)
        save_file(tensors, str(out / "adapter" / "adapter_model.safetensors"), metadata=meta)
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=1))
        base = {k.replace(".base_layer.", "."): v.contiguous()
                for k, v in model.state_dict().items() if ".lora_" not in k}
        save_file(base, str(out / "base_model.safetensors"), metadata=meta)
    merged = merge_all(model)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
              str(out / "model.safetensors"), metadata=meta)
    (out / "model.json").write_text(json.dumps(
        {**timm_kwargs(cfg), "checkpoint": str(point.path), "stage": point.stage,
         "global_step": point.global_step}, indent=1))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-export``: 0 on success; 2 for a usage or config error (no such
    run directory, a config that does not load), as the other commands; 1
    with a one-line error otherwise."""
    p = argparse.ArgumentParser(prog="prelora-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", help="tag directory (default: the run's latest)")
    p.add_argument("--out", type=Path, help="output directory (default RUN_DIR/export)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"prelora-export: error: run directory {args.run_dir} does not exist",
              file=sys.stderr)
        return 2
    try:
        out = export(args.run_dir, args.out, args.checkpoint)
    except ConfigError as e:
        print(f"prelora-export: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"prelora-export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
