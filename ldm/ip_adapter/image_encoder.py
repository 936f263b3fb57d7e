"""The CLIP vision model an IP-Adapter reads: found, checked against the adapter before any weight is read, loaded,
and an image turned into what the adapter takes, exactly as diffusers' pipelines do (`encode_image`).

Where it is (the first that exists): `--ip-image-encoder DIR`; an `image_encoder/` folder next to the adapter file
(h94/IP-Adapter's `models/image_encoder`, diffusers' `load_ip_adapter(..., image_encoder_folder="image_encoder")`);
an `image_encoder/` folder in the model's directory (a diffusers pipeline's optional part). It is a transformers
`CLIPVisionModelWithProjection` directory (config.json + model.safetensors): ViT-H/14 for SD 1.5 and the "vit-h"
SDXL adapters, ViT-bigG/14 for the others.

Preprocessing is transformers' `CLIPImageProcessor` (resize the shorter side, centre crop, normalise with CLIP's mean
and std): from a `preprocessor_config.json` in the encoder's folder or the adapter's, else CLIP's defaults at the
encoder's image size, as diffusers makes one when a pipeline has no feature extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm.errors import UserError
from ldm.weights import check_weights

PREPROCESSOR = "preprocessor_config.json"
FOLDER = "image_encoder"


@dataclass(frozen=True)
class EncoderFacts:
    """An image encoder directory's facts, from its config."""

    path: Path
    projection_dim: int  # E: width of `image_embeds` (B, E)
    hidden_size: int  # H: width of the hidden states (B, 1 + patches, H)
    image_size: int  # pixels per side it was trained on
    variant: str | None  # the safetensors weight variant ('fp16'), None for plain files

    def output_dim(self, hidden_states: bool) -> int:
        return self.hidden_size if hidden_states else self.projection_dim


def find_image_encoder(given: str | None, adapter: Path, model_root: Path | None) -> Path:
    """The image encoder directory for the adapter file `adapter` (see the module docstring for the order)."""
    if given:
        p = Path(given).expanduser()
        if not p.is_dir():
            raise UserError(f"--ip-image-encoder '{p}' is not a directory (it takes a CLIP vision model directory "
                            "with config.json and model.safetensors)")
        return p
    candidates = [adapter.parent / FOLDER] + ([model_root / FOLDER] if model_root is not None else [])
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"no image encoder for IP-Adapter '{adapter}' (looked for {' and '.join(map(str, candidates))}): "
                    "pass --ip-image-encoder DIR, a CLIP vision model directory such as h94/IP-Adapter's "
                    "models/image_encoder")


def inspect_image_encoder(path: Path) -> EncoderFacts:
    """The facts of the encoder at `path`, from its config; pickle-only, truncated or missing weights refused."""
    from transformers import CLIPVisionConfig

    if not (path / "config.json").is_file():
        raise UserError(f"image encoder '{path}' has no config.json (it should be a CLIP vision model directory)")
    try:
        config = CLIPVisionConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read the image encoder config in '{path}': {_first_line(e)}") from None
    variant = check_weights(path)
    projection = getattr(config, "projection_dim", None)
    if not projection:
        raise UserError(f"image encoder '{path}' has no projection_dim: it must be a CLIPVisionModelWithProjection")
    return EncoderFacts(path, int(projection), int(config.hidden_size), int(config.image_size), variant)


def load_vision_model(facts: EncoderFacts, device: torch.device, dtype: torch.dtype):
    """The encoder's `CLIPVisionModelWithProjection`, frozen, on `device` in `dtype`."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(facts.path, use_safetensors=True, variant=facts.variant,
                                                              dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"cannot load the image encoder '{facts.path}': {_first_line(e)}") from None
    return model.to(device).eval().requires_grad_(False)


class ImageEncoder:
    """A loaded CLIP vision model (`load_vision_model`) with the preprocessing an adapter uses; `adapter_dir` is the
    adapter's folder, where a `preprocessor_config.json` may be."""

    def __init__(self, model, facts: EncoderFacts, adapter_dir: Path) -> None:
        self.model = model
        self.processor = _processor(facts, [adapter_dir])

    @torch.inference_mode()
    def embeds(self, image: Image.Image, hidden_states: bool, uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) for one image, as diffusers' `encode_image`: the projected `image_embeds` (1, E) and zeros
        for the unconditional branch; with `hidden_states` (Plus, Full) the penultimate hidden states
        (1, 1 + patches, H), and those of an all-zero (normalised) image for the unconditional branch. `uncond`
        False: no unconditional branch (guidance off), None in its place."""
        pixels = self.processor(image, return_tensors="pt").pixel_values  # (1, 3, S, S), CLIP-normalised
        pixels = pixels.to(self.model.device, self.model.dtype)
        if not hidden_states:
            cond = self.model(pixels).image_embeds  # (1, E)
            return cond, torch.zeros_like(cond) if uncond else None
        cond = self.model(pixels, output_hidden_states=True).hidden_states[-2]  # (1, 1 + patches, H)
        if not uncond:
            return cond, None
        return cond, self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]


def _processor(facts: EncoderFacts, adapter_dirs: list[Path]):
    from transformers import CLIPImageProcessor

    for folder in [facts.path, *adapter_dirs]:
        if (folder / PREPROCESSOR).is_file():
            try:
                return CLIPImageProcessor.from_pretrained(folder)
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise UserError(f"cannot read '{folder / PREPROCESSOR}': {_first_line(e)}") from None
    return CLIPImageProcessor(size=facts.image_size, crop_size=facts.image_size)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
