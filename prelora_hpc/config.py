"""Typed, validated run configuration.

One YAML file describes a run. It is read into nested dataclasses; every key
is checked at load time (unknown keys, wrong types, impossible values), and
the error names the key and the file. Precedence: command-line overrides
(``section.key=value``) over the file, the file over the defaults below.

    cfg = load_config("configs/quickstart.yaml", ["run.epochs=2"])
    dump_config(cfg, "run/config.yaml")   # loads back identically
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible.

    The message always names the dotted key and the file it came from.
    """


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"
    """timm model name (any ViT in timm's registry)."""
    img_size: int = 224
    """Input resolution in pixels (square)."""
    num_classes: int = 1000
    """Classifier outputs."""
    patch_size: Optional[int] = None
    """Override the preset's patch size (None keeps timm's)."""
    embed_dim: Optional[int] = None
    """Override the preset's width (None keeps timm's)."""
    depth: Optional[int] = None
    """Override the number of transformer blocks (None keeps timm's)."""
    num_heads: Optional[int] = None
    """Override the number of attention heads (None keeps timm's)."""
    in_chans: int = 3
    """Input channels."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate."""
    drop_rate: float = 0.0
    """Dropout before the head."""
    compile: bool = False
    """``torch.compile`` the model (inductor): once per stage, since each
    engine rebuild changes the module (adapters injected, base frozen). The
    first steps of each stage pay the compilation; docs/benchmarks.md has
    what it costs and saves. ZeRO 0-2 only."""
    compile_backend: str = "inductor"
    """``torch.compile``'s backend: ``inductor`` generates kernels (Triton on
    the GPU, C++ on the CPU); ``aot_eager`` traces and runs the same graphs
    with eager kernels, for checking a model compiles without paying codegen."""

    def check(self, err):
        if self.img_size <= 0:
            err("img_size", "must be > 0")
        if self.num_classes <= 0:
            err("num_classes", "must be > 0")
        for k in ("patch_size", "embed_dim", "depth", "num_heads"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                err(k, "must be > 0 or null")
        if not 0.0 <= self.drop_path_rate < 1.0:
            err("drop_path_rate", "must be in [0, 1)")
        if not 0.0 <= self.drop_rate < 1.0:
            err("drop_rate", "must be in [0, 1)")
        if self.compile:
            # Only when compiling: every rank loads the config, and dynamo is slow to import.
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile_backend not in known:
                err("compile_backend", f"unknown backend {self.compile_backend!r} "
                    f"(torch.compile knows {', '.join(known)})")


@dataclass
class DataConfig:
    source: Literal["hdf5", "digits", "synthetic"] = "digits"
    """Where images come from: an HDF5 file written by prelora-convert, the
    embedded scikit-learn digits set (converted to HDF5 on first use), or
    random tensors that never touch disk (benchmarks)."""
    path: Optional[str] = None
    """HDF5 file (or a directory of shards) for source=hdf5; the cache
    directory for source=digits (default ~/.cache/prelora_hpc)."""
    train_split: str = "train"
    """HDF5 group holding the training images."""
    val_split: str = "val"
    """HDF5 group holding the validation images."""
    num_workers: int = 2
    """DataLoader worker processes per rank (ALCF suggests 4-8 on Polaris)."""
    auto_augment: Optional[str] = None
    """timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'; null = none."""
    hflip: float = 0.5
    """Horizontal flip probability for training."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    crop_pct: float = 0.875
    """Validation resize/center-crop ratio."""
    synthetic_train_size: int = 1024
    """Number of training samples for source=synthetic."""
    synthetic_val_size: int = 256
    """Number of validation samples for source=synthetic."""
    on_bad_sample: Literal["fail", "skip"] = "fail"
    """What a sample that fails to decode does at training time."""
    jpeg_draft: bool = False
    """Let the JPEG decoder scale down in the DCT (PIL's ``Image.draft``) to
    the smallest size the training crop still fills at img_size. Faster
    decode of large JPEGs; pixels differ slightly from a full decode, so
    it is opt-in."""

    def check(self, err):
        if self.source == "hdf5" and not self.path:
            err("path", "is required when data.source is 'hdf5'")
        if self.num_workers < 0:
            err("num_workers", "must be >= 0")
        if not 0.0 <= self.hflip <= 1.0:
            err("hflip", "must be in [0, 1]")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            err("scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
        if not 0 < self.crop_pct <= 1:
            err("crop_pct", "must be in (0, 1]")
        if self.synthetic_train_size <= 0 or self.synthetic_val_size <= 0:
            err("synthetic_train_size", "synthetic sizes must be > 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW) after warm-up, for the global batch."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up, over the whole run's optimizer steps."""
    min_lr: float = 1e-6
    """Floor of the cosine decay."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""

    def check(self, err):
        if self.lr <= 0:
            err("lr", "must be > 0")
        if self.weight_decay < 0:
            err("weight_decay", "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            err("betas", "must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            err("warmup_steps", "must be >= 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            err("min_lr", "must be in [0, lr]")
        if not 0 <= self.label_smoothing < 1:
            err("label_smoothing", "must be in [0, 1)")


@dataclass
class PreLoRAConfig:
    window_steps: Union[int, Literal["epoch"]] = 50
    """Window size m: optimizer steps per window, or 'epoch'."""
    k: int = 3
    """Windows the partial convergence test looks at (Algorithm 1)."""
    tau: float = 1.0
    """Weight-norm change threshold, percent per window."""
    zeta: float = 5.0
    """Loss change threshold, percent per window."""
    warmup_windows: int = 1
    """Stage-2 length w, in windows (base + adapters train together)."""
    r_min: int = 8
    """Smallest LoRA rank (power of two)."""
    r_max: int = 64
    """Largest LoRA rank (power of two)."""
    min_windows: int = 0
    """Never switch before this many windows have completed."""
    stage3_trainable: list[str] = field(
        default_factory=lambda: ["norm", "pos_embed", "cls_token", "head"])
    """What stays trainable beside the adapters in stage 3: 'norm' (every
    LayerNorm), 'pos_embed', 'cls_token', 'head', 'patch_embed', 'bias'
    (biases of adapted linears). Parameters are selected by module type and
    exact name, never by substring."""
    reset_optimizer: bool = False
    """False: AdamW moments of parameters that stay trainable are carried
    across engine rebuilds. True: every rebuild starts fresh moments."""
    criterion: Literal["norm", "update"] = "norm"
    """The switch test: 'norm' is Algorithm 1 (layer-averaged weight-norm
    change <= tau); 'update' asks that the weights themselves stopped
    moving: the layer-averaged relative update ||W_t - W_{t-1}|| / ||W_{t-1}||
    <= tau_update over the last k - 1 windows (the loss test as in 'norm')."""
    tau_update: float = 1.0
    """Relative-update threshold of criterion 'update', percent per window."""
    rank_rule: Literal["norm", "energy"] = "norm"
    """'norm': Algorithm 2 (ranks from the layers' norm changes, relative).
    'energy': each layer gets the smallest power of two in [r_min, r_max]
    whose top singular values hold ``energy`` of its last window's update."""
    energy: float = 0.9
    """Energy share of rank rule 'energy', in (0, 1]."""
    track_updates: bool = True
    """Measure each layer's relative update and energy rank at every window
    even when criterion and rank rule do not need them, so the log shows
    what still moves and a replay can try either criterion. Costs a copy of
    this rank's share (1 / world size) of the tracked weights."""

    def check(self, err):
        ws = self.window_steps
        if ws != "epoch" and (not isinstance(ws, int) or ws <= 0):
            err("window_steps", "must be a positive integer or 'epoch'")
        if self.k < 2:
            err("k", "must be >= 2 (the test compares consecutive windows)")
        if self.tau < 0:
            err("tau", "must be >= 0")
        if self.zeta < 0:
            err("zeta", "must be >= 0")
        if self.warmup_windows < 0:
            err("warmup_windows", "must be >= 0")
        if not _is_pow2(self.r_min):
            err("r_min", f"must be a power of two, got {self.r_min}")
        if not _is_pow2(self.r_max):
            err("r_max", f"must be a power of two, got {self.r_max}")
        if _is_pow2(self.r_min) and _is_pow2(self.r_max) and self.r_min > self.r_max:
            err("r_min", f"r_min={self.r_min} > r_max={self.r_max}")
        if self.min_windows < 0:
            err("min_windows", "must be >= 0")
        if self.tau_update < 0:
            err("tau_update", "must be >= 0")
        if not 0 < self.energy <= 1:
            err("energy", "must be in (0, 1]")
        allowed = {"norm", "pos_embed", "cls_token", "head", "patch_embed", "bias"}
        for s in self.stage3_trainable:
            if s not in allowed:
                err("stage3_trainable", f"unknown entry {s!r}; allowed: {sorted(allowed)}")


@dataclass
class LoRAConfig:
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module suffixes inside each block that are tracked and adapted."""
    alpha: float = 16.0
    """LoRA alpha; the scaling is alpha / r for each layer's rank r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input (0 adds no kernel)."""
    rank: int = 16
    """Rank of every layer in mode 'lora' (the from-scratch baseline)."""
    lr_scale: float = 1.0
    """Adapter learning rate as a multiple of the run's (both A and B)."""
    lr_ratio_b: float = 16.0
    """Extra multiple for B over A (LoRA+: B learns best at a larger rate).
    16 by measurement: on the quick start, seed 0, adapters at 1 / 1 ended
    at 94.4 % top-1 and at 1 / 16 at 96.4 % (full training: 96.1 %)."""

    warmup_steps: int = 0
    """The adapters' learning rate rises linearly from 0 to its full value
    over this many optimizer steps after the adapters are created (0: full
    rate at once). Fresh AdamW moments make the first steps full-size
    whatever the gradient, which shocks a model that was already trained."""

    def check(self, err):
        if self.warmup_steps < 0:
            err("warmup_steps", "must be >= 0")
        if not self.target_modules:
            err("target_modules", "must name at least one module")
        if self.alpha <= 0:
            err("alpha", "must be > 0")
        if not 0 <= self.dropout < 1:
            err("dropout", "must be in [0, 1)")
        if not _is_pow2(self.rank):
            err("rank", f"must be a power of two, got {self.rank}")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            err("lr_scale", "must be a finite number > 0")
        if not (math.isfinite(self.lr_ratio_b) and self.lr_ratio_b > 0):
            err("lr_ratio_b", "must be a finite number > 0")


@dataclass
class DeepSpeedConfig:
    micro_batch_size: int = 32
    """Images per rank per forward pass."""
    grad_accum_steps: Union[int, Literal["auto"]] = "auto"
    """Micro batches per optimizer step. 'auto': train_batch_size /
    (micro_batch_size x world size), so the global batch (and the learning
    rate tuned for it) holds on any allocation; 1 when train_batch_size is
    null."""
    train_batch_size: Optional[int] = None
    """Global batch; null = micro_batch_size x grad_accum_steps x world size.
    When set, it must equal that product at launch."""
    zero_stage: int = 0
    """ZeRO stage 0, 1, 2 (3 where DeepSpeed allows frozen parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 on a GPU that supports it, fp32 on the CPU."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (set explicitly: DeepSpeed's default moved)."""
    overlap_comm: Literal["auto", True, False] = "auto"
    """ZeRO 1/2: reduce gradients in buckets during the backward pass
    (DeepSpeed's overlap_comm) instead of after it. 'auto': on a GPU (NCCL
    overlaps on the network), not on the CPU, where gloo's threads take the
    cores the backward pass needs (docs/benchmarks.md has the numbers).
    ZeRO 0 always reduces after the backward pass."""
    extra: dict = field(default_factory=dict)
    """Further DeepSpeed config keys, merged last (e.g. comms_logger)."""

    def check(self, err):
        if self.micro_batch_size <= 0:
            err("micro_batch_size", "must be > 0")
        if self.grad_accum_steps != "auto" and self.grad_accum_steps <= 0:
            err("grad_accum_steps", "must be > 0 or 'auto'")
        if self.train_batch_size is not None and self.train_batch_size <= 0:
            err("train_batch_size", "must be > 0 or null")
        if self.train_batch_size is not None and self.grad_accum_steps != "auto":
            per = self.micro_batch_size * self.grad_accum_steps
            if self.train_batch_size <= 0 or self.train_batch_size % per:
                err("train_batch_size",
                    f"{self.train_batch_size} is not a multiple of micro_batch_size x "
                    f"grad_accum_steps = {per}")
        if self.zero_stage not in (0, 1, 2, 3):
            err("zero_stage", "must be 0, 1, 2 or 3")
        if self.gradient_clipping < 0:
            err("gradient_clipping", "must be >= 0")
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps", "optimizer"):
            if k in self.extra:
                err("extra", f"{k!r} is derived from the config; set it in its own section")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at stage switches and the end)."""
    keep_last: int = 2
    """Periodic checkpoints kept besides the stage-switch ones."""
    resume: str = "auto"
    """'auto' resumes from the run directory's latest checkpoint if any,
    'never' starts fresh, anything else is a checkpoint path."""

    def check(self, err):
        if self.every_steps < 0:
            err("every_steps", "must be >= 0")
        if self.keep_last < 1:
            err("keep_last", "must be >= 1")


@dataclass
class LoggingConfig:
    interval_steps: int = 10
    """Print a progress line every N optimizer steps (batch jobs)."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """'auto': a bar on a terminal, plain lines otherwise."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run directory."""

    def check(self, err):
        if self.interval_steps <= 0:
            err("interval_steps", "must be > 0")


@dataclass
class RunConfig:
    mode: Literal["full", "prelora", "lora"] = "prelora"
    """'full': stage 1 to the end; 'prelora': the three stages; 'lora':
    adapters from step 0 on a frozen random base."""
    epochs: int = 10
    """Training epochs."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (null: epochs decide)."""
    seed: int = 0
    """Seed for weights, data order and augmentation (per rank offset)."""
    output_dir: str = "runs/default"
    """Run directory: config, checkpoints, metrics, plots."""
    eval_every_epochs: int = 1
    """Evaluate on the validation split every N epochs (and at the end)."""
    eval_every_steps: int = 0
    """Also evaluate every N optimizer steps (0: only at epoch ends), for
    accuracy against wall-clock time on runs of few epochs."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run ('stop') or skips the step ('skip')."""
    collective_timeout_s: int = 600
    """Timeout of torch.distributed collectives, seconds: a dead rank makes
    the others fail within this bound instead of hanging."""

    def check(self, err):
        if self.epochs <= 0:
            err("epochs", "must be > 0")
        if self.max_steps is not None and self.max_steps <= 0:
            err("max_steps", "must be > 0 or null")
        if self.eval_every_epochs <= 0:
            err("eval_every_epochs", "must be > 0")
        if self.eval_every_steps < 0:
            err("eval_every_steps", "must be >= 0")
        if self.collective_timeout_s <= 0:
            err("collective_timeout_s", "must be > 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The ViT."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data set and its loader."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    prelora: PreLoRAConfig = field(default_factory=PreLoRAConfig)
    """Partial convergence test and rank assignment."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Batch sizes, ZeRO, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress and metrics."""
    run: RunConfig = field(default_factory=RunConfig)
    """Mode, length, seed, output directory."""


SECTIONS = [f.name for f in dataclasses.fields(Config)]


# --------------------------------------------------------------------------- #
# Conversion of raw YAML values into the declared field types.


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML follows YAML 1.1,
    which reads ``3e-4`` and ``1E-3`` (no dot) as strings, and that is how
    most people write a learning rate."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Parse YAML text as config files and overrides are parsed."""
    return yaml.load(text, Loader=YamlLoader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted.

    Only lossless conversions happen (int -> float); everything else that
    does not match raises ConfigError with ``where`` in the message.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not any of "
                          f"{[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build_section(cls, raw: dict, section: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown key '{section}.{key}' in {source} "
                              f"(known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"'{section}.{key}' in {source}")
    return cls(**kwargs)


def _check(cfg: Config, source: str) -> None:
    for section in SECTIONS:
        obj = getattr(cfg, section)

        def err(key, msg, _s=section):
            raise ConfigError(f"'{_s}.{key}' in {source}: {msg}")

        obj.check(err)
    # Cross-section checks.
    if cfg.run.mode == "lora" and cfg.lora.rank > 4096:
        raise ConfigError(f"'lora.rank' in {source}: unreasonably large")
    if cfg.deepspeed.zero_stage == 3 and (cfg.prelora.criterion == "update"
                                          or cfg.prelora.rank_rule == "energy"):
        # The update statistics need each layer's whole weight on one rank.
        raise ConfigError(f"'prelora.criterion' in {source}: criterion 'update' and rank_rule "
                          "'energy' need deepspeed.zero_stage <= 2 (ZeRO-3 partitions weights)")
    if cfg.model.compile and cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 gathers parameters in module hooks that torch.compile would
        # have to trace through; not supported here.
        raise ConfigError(f"'model.compile' in {source}: needs deepspeed.zero_stage <= 2")


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` into (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} on the command line: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r} on the command line: key must be section.key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r} on the command line: {e}") from None
    return parts[0], parts[1], value


def config_from_dict(raw: dict, source: str = "<dict>",
                     overrides: Optional[list[str]] = None) -> Config:
    """Build and validate a Config from a nested mapping plus overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    merged: dict[str, dict] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in {source} "
                              f"(known: {', '.join(SECTIONS)})")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"section '{section}' in {source} must be a mapping")
        merged[section] = dict(body)
    origin = {s: source for s in merged}
    for text in overrides or []:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in override {text!r} on the command line")
        merged.setdefault(section, {})[key] = value
        origin[section] = f"{source} + command line"
    kwargs = {}
    for f in dataclasses.fields(Config):
        if f.name in merged:
            kwargs[f.name] = _build_section(f.type if isinstance(f.type, type) else
                                            typing.get_type_hints(Config)[f.name],
                                            merged[f.name], f.name, origin[f.name])
    cfg = Config(**kwargs)
    _check(cfg, source)
    return cfg


def load_config(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML run config, apply ``section.key=value`` overrides, validate.

    ``path`` may be None (defaults plus overrides). Raises ConfigError naming
    the key and the file for anything unknown, mistyped or impossible, and
    FileNotFoundError-derived ConfigError when the file is missing.
    """
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = read_yaml(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return config_from_dict(raw, str(p), overrides)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain nested dicts (YAML/JSON-serializable)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML; ``load_config`` reads it back equal."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
