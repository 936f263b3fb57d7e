"""Every shipped config loads, and every command, script or config a config or the README names exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from ldm.config import load_config
from ldm.text.contrastive import PretrainConfig
from ldm.unet.config import LDMConfig
from ldm.vae.config import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
LOADERS = {"vae": VAEConfig, "ldm": LDMConfig, "text": PretrainConfig}  # configs/<folder>/ -> its dataclass
COMMANDS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
DOCUMENTS = [*CONFIGS, ROOT / "README.md", ROOT / "RELIABILITY.md"]


def test_configs_are_found():
    assert len(CONFIGS) >= 14 and {p.parent.name for p in CONFIGS} == {*LOADERS, "accelerate"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_loads_and_validates(path):
    folder = path.parent.name
    if folder == "accelerate":
        config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are a TypeError
        assert config.distributed_type is not None
        return
    assert folder in LOADERS, f"no dataclass for configs/{folder}/: add it to LOADERS"
    config = load_config(LOADERS[folder], path)  # unknown keys, wrong types and impossible values raise
    assert type(config) is LOADERS[folder]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_scripts_and_configs_named_in_docs_exist(path):
    text = path.read_text()
    commands = set(re.findall(r"(?<![\w/.-])(ldm-[a-z][a-z0-9-]*)(?![\w.-]*/)", text))
    files = set(re.findall(r"(?<![\w/.-])((?:ldm|train|configs|bench|tools|inference|tests)/[\w./-]+\.(?:py|yaml|sh))", text))
    assert not commands - COMMANDS, f"{path.name} names commands that pyproject.toml does not install"
    assert not [f for f in files if not (ROOT / f).exists()], f"{path.name} names files that do not exist"


def test_the_docs_check_catches_a_missing_command(tmp_path):
    fake = tmp_path / "bad.yaml"
    fake.write_text("# written by `ldm-text-encoder runs/x`\n")
    with pytest.raises(AssertionError, match="names commands"):
        test_commands_scripts_and_configs_named_in_docs_exist(fake)
