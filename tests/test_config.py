"""Configs: YAML + dotted overrides, type checks and impossible values, each error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm.config import load_config, save_config, to_dict
from ldm.errors import UserError
from ldm.vae.config import VAEConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 7\n  batch_size: 4\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(VAEConfig, path, ["train.max_steps=9", "optim.betas=[0.9, 0.99]", "data.path=/some/dir"])
    assert cfg.train.max_steps == 9  # the override wins
    assert cfg.train.batch_size == 4  # from the file
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.path == "/some/dir"
    assert cfg.loss.kl_weight == 1e-6  # default
    assert cfg.data.caption_column is None  # the VAE's data section defaults to no captions


def test_numbers_written_without_a_dot_are_floats(tmp_path):
    cfg = load_config(VAEConfig, write(tmp_path, "optim:\n  lr: 1e-4\n"), ["loss.kl_weight=1e-5"])
    assert cfg.optim.lr == 1e-4 and cfg.loss.kl_weight == 1e-5


def test_text_fields_keep_what_was_typed():
    cfg = load_config(VAEConfig, None, ["data.path=123", "train.output_dir=runs/a b"])
    assert cfg.data.path == "123" and cfg.train.output_dir == "runs/a b"


def test_optional_fields_take_null():
    cfg = load_config(VAEConfig, None, ["optim.disc_lr=null"])
    assert cfg.optim.disc_lr is None
    assert load_config(VAEConfig, None, ["optim.disc_lr=0.01"]).optim.disc_lr == 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
        (["trainn.max_steps=3"], "unknown config key 'trainn'"),
        (["train.max_steps=abc"], "config key 'train.max_steps': expected an integer, got 'abc'"),
        (["train.max_steps=1.5"], "config key 'train.max_steps': expected an integer"),
        (["train.cpu=maybe"], "config key 'train.cpu': expected true or false"),
        (["optim.lr=fast"], "config key 'optim.lr': expected a number"),
        (["optim.betas=[0.5]"], "config key 'optim.betas': expected 2 values, got 1"),
        (["loss.gan=wasserstein"], "config key 'loss.gan': 'wasserstein' is not one of 'hinge', 'vanilla'"),
        (["train=3"], "config key 'train' is a section"),
        (["train.max_steps"], "override 'train.max_steps' is not of the form key=value"),
        (["optim.lr=-1e-4"], "config key 'optim.lr': must be > 0"),
        (["train.batch_size=0"], "config key 'train.batch_size': must be >= 1, got 0"),
        (["model.preset=small-f4", "data.resolution=30"], "config key 'data.resolution': 30 is not divisible by"),
        (["model.preset=giant"], "config key 'model.preset': 'giant' is not one of"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(VAEConfig, None, overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(VAEConfig, tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not valid YAML at line 3"):
        load_config(VAEConfig, write(tmp_path, "train:\n  max_steps: [1\n"))
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(VAEConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(UserError, match="unknown config key 'loss.klweight'"):
        load_config(VAEConfig, write(tmp_path, "loss:\n  klweight: 1\n"))


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(VAEConfig, None, ["train.max_steps=11", "optim.betas=[0.1,0.2]"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["max_steps"] == 11
    assert load_config(VAEConfig, tmp_path / "out" / "config.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.1, 0.2]


@pytest.mark.parametrize("path", sorted((CONFIGS / "vae").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_vae_configs_load(path):
    load_config(VAEConfig, path)
