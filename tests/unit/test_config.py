"""Config loading: precedence, validation messages that name key and file, round trip."""

import pytest

from prelora_hpc.config import (ConfigError, OptimConfig, config_to_dict, dump_config,
                                load_config)


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_cli_over_file_over_defaults(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.01\nrun:\n  epochs: 7\n")
    cfg = load_config(p, ["run.epochs=3"])
    assert cfg.run.epochs == 3            # command line wins over the file
    assert cfg.optim.lr == 0.01           # file wins over the default
    assert cfg.optim.weight_decay == OptimConfig().weight_decay  # neither says: the default
    assert load_config(p).run.epochs == 7


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.01\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_unknown_section_and_override_key_rejected(tmp_path):
    p = write(tmp_path, "optimizer:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(p)
    with pytest.raises(ConfigError, match="run.epoch"):
        load_config(None, ["run.epoch=3"])


@pytest.mark.parametrize("text,key", [
    ("run:\n  epochs: three\n", "run.epochs"),
    ("prelora:\n  r_min: 16\n  r_max: 8\n", "prelora.r_min"),
    ("prelora:\n  r_max: 48\n", "prelora.r_max"),
    ("prelora:\n  tau: -1\n", "prelora.tau"),
    ("prelora:\n  window_steps: 0\n", "prelora.window_steps"),
    ("deepspeed:\n  micro_batch_size: 32\n  grad_accum_steps: 2\n  train_batch_size: 100\n",
     "deepspeed.train_batch_size"),
    ("data:\n  source: hdf5\n", "data.path"),
    ("lora:\n  rank: 12\n", "lora.rank"),
    ("run:\n  mode: fast\n", "run.mode"),
    ("prelora:\n  criterion: loss\n", "prelora.criterion"),
    ("prelora:\n  tau_update: -1\n", "prelora.tau_update"),
    ("prelora:\n  rank_rule: energy\n  energy: 1.5\n", "prelora.energy"),
    ("lora:\n  lr_scale: 0\n", "lora.lr_scale"),
    ("lora:\n  lr_ratio_b: -2\n", "lora.lr_ratio_b"),
    ("prelora:\n  criterion: update\ndeepspeed:\n  zero_stage: 3\n", "prelora.criterion"),
])
def test_impossible_values_name_the_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_window_epoch_and_ints(tmp_path):
    cfg = load_config(None, ["prelora.window_steps=epoch", "optim.lr=1"])
    assert cfg.prelora.window_steps == "epoch"
    assert isinstance(cfg.optim.lr, float)  # an int where a float is expected is fine


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["run.epochs=5", "prelora.tau=0.25", "lora.target_modules=[attn.qkv]",
                             "deepspeed.extra={comms_logger: {enabled: true}}"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again == cfg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ ships YAML presets"
    for f in files:
        load_config(f)


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("5e+2", 500.0),
                                         ("2.5E-1", 0.25)])
def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path, text, value):
    p = tmp_path / "c.yaml"
    p.write_text(f"optim:\n  lr: {text}\n")
    assert load_config(p).optim.lr == value
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == value
    # A number in an integer field is still refused, naming the key.
    with pytest.raises(ConfigError, match="run.epochs"):
        load_config(None, [f"run.epochs={text}"])


def test_accumulation_auto_keeps_the_global_batch_or_says_why():
    from prelora_hpc.engine import BatchSizeError, accumulation_steps, global_batch
    cfg = load_config("configs/vit_large_imagenet1k.yaml")
    assert cfg.deepspeed.grad_accum_steps == "auto"
    assert [accumulation_steps(cfg, w) for w in (8, 128, 256)] == [32, 2, 1]
    assert global_batch(cfg, 8) == 4096
    with pytest.raises(BatchSizeError, match="train_batch_size=4096 is not a multiple of "
                                             r"micro_batch_size 16 x world size 24"):
        accumulation_steps(cfg, 24)
    fixed = load_config("configs/vit_large_imagenet1k.yaml", ["deepspeed.grad_accum_steps=1"])
    with pytest.raises(BatchSizeError, match="grad_accum_steps: auto"):
        global_batch(fixed, 8)
    assert accumulation_steps(load_config(None), 3) == 1   # no global batch: no accumulation


def test_compile_backend_is_checked_only_when_compiling(tmp_path):
    p = write(tmp_path, "model:\n  compile: true\n  compile_backend: inductr\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.compile_backend" in msg and str(p) in msg and "inductor" in msg
    assert load_config(p, ["model.compile_backend=aot_eager"]).model.compile_backend == "aot_eager"
    assert load_config(p, ["model.compile=false"]).model.compile is False
