"""The demo's image tower: a small CLIP ViT trained against the bundled model's frozen text encoder, so that images
and shapes captions share one 64-d embedding space. It is the feature extractor of `ldm-eval --features demo`
(FID/KID/CMMD-style numbers and a CLIP-score-style number that work offline), and nothing else.

On disk (`image-tower/`, 0.5 MB): `config.json`, a transformers `CLIPConfig`, and `model.safetensors`, every
`CLIPModel` weight except the text transformer's (`text_model.*`): the vision transformer, `visual_projection`,
`text_projection` and `logit_scale`. The text transformer is the bundled model's own `text_encoder/`, so the
pair is loaded as one `CLIPModel` by `load_demo_clip`. Made by `train/train_text_encoder.py` with
`configs/text/shapes-demo-image-tower.yaml` (docs/demo.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from ldm.demo import MODEL_DIR
from ldm.errors import UserError
from ldm.weights import read_safetensors

IMAGE_TOWER_DIR = Path(__file__).parent / "image-tower"
WEIGHTS = "model.safetensors"


def image_tower_state(clip: CLIPModel) -> dict[str, torch.Tensor]:
    """Every weight but the text transformer's (see the module docstring)."""
    return {k: v.detach().contiguous() for k, v in clip.state_dict().items() if not k.startswith("text_model.")}


def save_image_tower(clip: CLIPModel, directory: Path) -> None:
    """Write `config.json` and `model.safetensors` into `directory` (created)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    clip.config.to_json_file(directory / "config.json")
    save_file(image_tower_state(clip), str(directory / WEIGHTS))


def load_demo_clip(tower_dir: Path = IMAGE_TOWER_DIR, text_encoder_dir: Path = MODEL_DIR / "text_encoder") -> CLIPModel:
    """The image tower of `tower_dir` and the text encoder of `text_encoder_dir` as one CLIPModel (fp32, eval mode,
    no gradients). Raises `UserError` when a file is missing or the two do not fit together."""
    config_file = tower_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"the demo image tower '{tower_dir}' has no config.json: reinstall ldm, or make it with "
                        "train/train_text_encoder.py --config configs/text/shapes-demo-image-tower.yaml")
    clip = CLIPModel(CLIPConfig.from_json_file(config_file))
    state, _ = read_safetensors(tower_dir / WEIGHTS)
    expected = set(image_tower_state(clip))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"'{tower_dir / WEIGHTS}' does not fit its config.json (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}): make it again with train/train_text_encoder.py")
    clip.load_state_dict(state, strict=False)
    text = CLIPTextModel.from_pretrained(text_encoder_dir)
    try:
        clip.text_model.load_state_dict(text.state_dict())
    except RuntimeError:
        raise UserError(f"the text encoder '{text_encoder_dir}' is not the one the image tower '{tower_dir}' was "
                        "trained with (its shapes differ)") from None
    return clip.eval().requires_grad_(False)
