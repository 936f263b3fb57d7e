"""ldm.model_info, the one home of `ldm_model.json`: written durably, read and validated with one message, and the
same rules where a single file carries the entry."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.model_info import LDM_INFO, read_text_encoder_info, write_text_encoder_info
from ldm.singlefile.detect import FORMAT, META_KEY, detect

OPEN_CLIP = {"kind": "open_clip", "path": "ViT-H-14", "pretrained": "laion2b_s32b_b79k", "layer": "penultimate"}
RULE = "has no valid 'text_encoder' entry (kind clip|open_clip, layer last|penultimate)"


def test_written_then_read_back(tmp_path):
    path = write_text_encoder_info(tmp_path, OPEN_CLIP)
    assert path == tmp_path / LDM_INFO == tmp_path / "ldm_model.json"
    assert json.loads(path.read_text()) == {"text_encoder": OPEN_CLIP}
    assert read_text_encoder_info(tmp_path) == OPEN_CLIP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ldm_model.json"]  # no temporary left behind


def test_a_plain_diffusers_model_has_none(tmp_path):
    assert read_text_encoder_info(tmp_path) is None


@pytest.mark.parametrize("content", [
    {"text_encoder": {"kind": "t5"}},
    {"text_encoder": {"kind": "clip", "layer": "middle"}},
    {"text_encoder": "clip"},
    {"unet": {}},
    ["text_encoder"],
])
def test_an_invalid_entry_is_named(tmp_path, content):
    (tmp_path / LDM_INFO).write_text(json.dumps(content))
    with pytest.raises(UserError) as e:
        read_text_encoder_info(tmp_path)
    assert str(e.value) == f"'{tmp_path / LDM_INFO}' {RULE}"


def test_unreadable_json_is_named(tmp_path):
    (tmp_path / LDM_INFO).write_text("{not json")
    with pytest.raises(UserError, match=rf"^cannot read '{tmp_path / LDM_INFO}': Expecting property name"):
        read_text_encoder_info(tmp_path)


def test_defaults_are_clip_and_the_last_layer(tmp_path):
    (tmp_path / LDM_INFO).write_text(json.dumps({"text_encoder": {}}))
    assert read_text_encoder_info(tmp_path) == {}


def test_an_invalid_entry_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="not a valid 'text_encoder' entry"):
        write_text_encoder_info(tmp_path, {"kind": "clip", "layer": 11})
    assert list(tmp_path.iterdir()) == []


def test_opening_a_model_reads_it_here(tmp_path):
    """The model opener has no reader of its own: a bad entry stops `inspect_model` with this module's message."""
    import shutil

    from ldm.demo import MODEL_DIR
    from ldm.models.spec import inspect_model

    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    write_text_encoder_info(model, {"kind": "clip", "layer": "penultimate"})
    assert inspect_model(str(model)).text_info == {"kind": "clip", "layer": "penultimate"}
    (model / LDM_INFO).write_text(json.dumps({"text_encoder": {"layer": "first"}}))
    with pytest.raises(UserError) as e:
        inspect_model(str(model))
    with pytest.raises(UserError) as direct:
        read_text_encoder_info(model)
    assert str(e.value) == str(direct.value)


def test_a_single_files_entry_follows_the_same_rule(tmp_path):
    """ldm-convert carries the entry in the file's `ldm` metadata; an invalid one is refused when the file is read."""
    path = tmp_path / "m.safetensors"
    meta = {"format": FORMAT, "ldm_model": {"kind": "clip", "layer": "first"}}
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(path), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(UserError, match="its 'ldm_model' entry is not a valid 'text_encoder' entry of ldm_model.json"):
        detect(path)
