"""Checkpoints that survive many PBS/Slurm jobs and the stage switch.

Layout under the run directory::

    checkpoints/
      latest                      tag of the newest complete checkpoint
      step00000120/               DeepSpeed's files (collective save) +
        prelora.json              sidecar: stage, step, rank map, config keys
        rng_rank00000.pt ...      per-rank RNG states
      step00000200-stage3/        a stage-switch checkpoint (kept forever)

The sidecar is read before the engine is built, so a resume in stage 2 or 3
first injects LoRA with the saved ranks and freezes what was frozen, then
loads DeepSpeed's state into an engine of the same shape. ``latest`` moves
only after every rank has finished writing (a barrier, then an atomic
rename by rank 0): a job killed mid-save leaves the previous checkpoint as
latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from .config import Config, ConfigError, config_to_dict

SIDECAR = "prelora.json"
LATEST = "latest"

#: Config keys whose change makes a checkpoint unusable: they decide the
#: shapes and names of what was saved.
COMPAT_KEYS = [
    "model.name", "model.img_size", "model.num_classes", "model.patch_size",
    "model.embed_dim", "model.depth", "model.num_heads", "model.in_chans",
    "lora.target_modules", "run.mode", "deepspeed.zero_stage",
]


def compat_fingerprint(cfg: Config) -> dict:
    """The values of COMPAT_KEYS in ``cfg``."""
    d = config_to_dict(cfg)
    out = {}
    for key in COMPAT_KEYS:
        section, name = key.split(".")
        out[key] = d[section][name]
    return out


@dataclass
class ResumePoint:
    """A checkpoint to resume from, as its sidecar describes it."""

    path: Path          # the tag directory
    tag: str
    stage: int
    global_step: int
    rank_map: dict[str, int]
    fingerprint: dict

    @property
    def load_dir(self) -> Path:
        return self.path.parent


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_resume_point(path: Path) -> ResumePoint:
    """Read a tag directory's sidecar; raises FileNotFoundError naming it."""
    path = Path(path)
    side = path / SIDECAR
    if not side.is_file():
        raise FileNotFoundError(f"{path} is not a complete prelora checkpoint (no {SIDECAR})")
    meta = json.loads(side.read_text())
    return ResumePoint(path, path.name, int(meta["stage"]), int(meta["global_step"]),
                       {k: int(v) for k, v in meta["rank_map"].items()}, meta["fingerprint"])


def find_resume(cfg: Config, explicit: Optional[str] = None) -> Optional[ResumePoint]:
    """The checkpoint this run resumes from, or None for a fresh start.

    ``explicit`` (``--resume PATH``) wins; else ``checkpoint.resume``:
    'auto' takes the run directory's ``latest``, 'never' none, anything
    else is a tag directory. Refuses (ConfigError naming the differing
    keys) a checkpoint whose model or module set differs from ``cfg``.
    """
    choice = explicit or cfg.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        latest = checkpoint_root(cfg.run.output_dir) / LATEST
        if not latest.is_file():
            return None
        point = read_resume_point(latest.parent / latest.read_text().strip())
    else:
        p = Path(choice)
        if (p / LATEST).is_file():
            p = p / (p / LATEST).read_text().strip()
        elif (p / "checkpoints" / LATEST).is_file():
            p = p / "checkpoints" / (p / "checkpoints" / LATEST).read_text().strip()
        point = read_resume_point(p)
    now = compat_fingerprint(cfg)
    diff = [k for k in COMPAT_KEYS if point.fingerprint.get(k) != now[k]]
    if diff:
        details = ", ".join(f"{k}: checkpoint {point.fingerprint.get(k)!r} vs config {now[k]!r}"
                            for k in diff)
        raise ConfigError(f"checkpoint {point.path} does not fit this config ({details})")
    return point


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: Config, rank: int, tag: str, client_state: dict,
         stage: int, global_step: int, rank_map: dict[str, int]) -> Path:
    """Collective: every rank writes its part, then rank 0 seals the checkpoint.

    Returns the tag directory. ``latest`` points at it only once all ranks
    are done; older periodic checkpoints beyond ``checkpoint.keep_last`` are
    removed then (stage-switch checkpoints are kept).
    """
    root = checkpoint_root(cfg.run.output_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
    tdist.barrier()
    if rank == 0:
        meta = {"stage": stage, "global_step": global_step, "rank_map": rank_map,
                "fingerprint": compat_fingerprint(cfg)}
        _atomic_write(root / tag / SIDECAR, json.dumps(meta, indent=1))
        _atomic_write(root / LATEST, tag)
        _prune(root, cfg.checkpoint.keep_last, keep=tag)
    tdist.barrier()
    return root / tag


def load(engine, point: ResumePoint, rank: int) -> dict:
    """Collective: load DeepSpeed's state and this rank's RNG; returns the
    trainer's client state."""
    path, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {point.path}")
    rng = point.path / f"rng_rank{rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return client


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    periodic = sorted(p for p in root.iterdir()
                      if p.is_dir() and p.name.startswith("step") and "-stage" not in p.name
                      and (p / SIDECAR).is_file())
    for p in periodic[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
