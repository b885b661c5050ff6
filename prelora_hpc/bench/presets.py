"""The bench's sizes: one YAML file per preset under ``presets/``.

A preset is config overrides plus the run's length::

    description: 2-block 32-wide ViT on 16 px images (tests only)
    steps: 3            # timed steps per configuration
    warmup: 1           # untimed steps first (>= 1)
    window_steps: 50    # steps per convergence window (the bookkeeping share)
    overrides: [model.depth=2, deepspeed.micro_batch_size=4, ...]

``--preset NAME`` picks a shipped one (``presets/NAME.yaml``), ``--preset
FILE.yaml`` any file of the same form. Every key is checked: an unknown,
missing or mistyped one raises ``ConfigError`` naming the key and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

import yaml

from ..config import ConfigError, read_yaml

#: Where the shipped presets live (package data, see setup.cfg).
PRESET_DIR = Path(__file__).parent / "presets"

#: Overrides every bench run adds after its preset: one micro batch per
#: step, synthetic data in the process, no TensorBoard.
BENCH_FIXED = ["deepspeed.grad_accum_steps=1", "data.source=synthetic", "data.num_workers=0",
               "logging.tensorboard=false"]


@dataclass(frozen=True)
class Preset:
    """A named benchmark size: config overrides plus the run's length."""

    name: str
    """The shipped name (``toy``) or the file it was read from."""
    description: str
    steps: int
    """Timed steps per configuration."""
    warmup: int
    """Untimed steps before them (at least 1: the last one is the comms-logged one)."""
    window_steps: int
    """Steps per convergence window at this size (the bookkeeping cost is
    amortized over it)."""
    overrides: tuple[str, ...]
    """``section.key=value`` config overrides."""


#: Keys a preset file holds, with the type each must have.
_KEYS = {"description": str, "steps": int, "warmup": int, "window_steps": int, "overrides": list}
assert set(_KEYS) == {f.name for f in fields(Preset)} - {"name"}


def preset_names() -> list[str]:
    """The shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: Union[str, Path]) -> Preset:
    """A shipped preset by name, or a preset YAML file by path.

    Raises ``ConfigError`` naming the file and the key for an unknown,
    missing or mistyped key, and listing the shipped names for a name that
    is neither one of them nor a file.
    """
    text = str(name_or_path)
    shipped = PRESET_DIR / f"{text}.yaml"
    if "/" not in text and shipped.is_file():
        path, name = shipped, text
    elif Path(text).is_file():
        path, name = Path(text), text
    else:
        raise ConfigError(f"--preset {text}: no such preset (shipped: "
                          f"{', '.join(preset_names())}) and no such YAML file")
    try:
        raw = read_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"preset {path}: cannot read it as YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path}: expected a mapping of {', '.join(_KEYS)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"preset {path}: unknown key {unknown[0]!r} "
                          f"(a preset has {', '.join(_KEYS)})")
    for key, kind in _KEYS.items():
        if key not in raw:
            raise ConfigError(f"preset {path}: missing key {key!r}")
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ConfigError(f"preset {path}: {key} must be a {kind.__name__}, got {v!r}")
        if kind is int and v < 1:
            raise ConfigError(f"preset {path}: {key} must be >= 1, got {v}")
    if not all(isinstance(o, str) and "=" in o for o in raw["overrides"]):
        raise ConfigError(f"preset {path}: overrides must be 'section.key=value' strings")
    return Preset(name=name, description=raw["description"], steps=raw["steps"],
                  warmup=raw["warmup"], window_steps=raw["window_steps"],
                  overrides=tuple(raw["overrides"]))
