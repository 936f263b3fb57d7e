"""The text encoder section of a YAML config (values only)."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ldm.config import check

HUB_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's model name prefixes that carry their own weights


@dataclass
class TextEncoderConfig:
    # "clip": a transformers CLIPTextModel + CLIPTokenizer (SD 1.x). "open_clip": an open_clip model (SD 2.x).
    # "sdxl": SDXL's two towers (CLIP-L and bigG with its projection) taken from an SDXL model (ldm/text/sdxl.py).
    kind: Literal["clip", "open_clip", "sdxl"] = "clip"
    # clip: a hub id, a local directory, or a diffusers model directory (its text_encoder/ and tokenizer/ are used).
    # open_clip: a model name (e.g. ViT-H-14), or 'local-dir:/path' / 'hf-hub:org/name'.
    # sdxl: an SDXL base model (a diffusers directory: text_encoder/, text_encoder_2/, tokenizer/ and its
    # force_zeros_for_empty_prompt); empty: model.pretrained's own towers.
    path: str = "openai/clip-vit-large-patch14"
    # open_clip only: a pretrained tag (e.g. laion2b_s32b_b79k) or a local weights file; empty = random weights (tests)
    pretrained: str | None = None
    # "penultimate": the second-to-last layer's hidden states + the final layer norm (SD 2.x; diffusers clip_skip=1)
    # (clip and open_clip only: SDXL's towers always give their penultimate states)
    layer: Literal["last", "penultimate"] = "last"

    def validate(self) -> None:
        check(self.kind in ("clip", "open_clip", "sdxl"), "text_encoder.kind",
              f"'{self.kind}' is not 'clip', 'open_clip' or 'sdxl'")
        check(
            self.layer in ("last", "penultimate"),
            "text_encoder.layer",
            f"'{self.layer}' is not 'last' or 'penultimate'",
        )
        if self.kind == "sdxl":
            check(self.layer == "last", "text_encoder.layer", "is not used with text_encoder.kind=sdxl (SDXL's "
                  "towers always give their penultimate states): remove it")
            check(not self.pretrained, "text_encoder.pretrained", "is not used with text_encoder.kind=sdxl: remove "
                  "it (the towers come from text_encoder.path, or model.pretrained when it is empty)")
            return
        check(bool(self.path), "text_encoder.path", "is empty: name a hub id, a local directory or an open_clip model")
        if self.kind == "clip":
            check(
                not self.pretrained,
                "text_encoder.pretrained",
                "is only used with text_encoder.kind=open_clip: remove it (the weights come from text_encoder.path)",
            )
        elif self.path.startswith(HUB_SCHEMAS):
            check(
                not self.pretrained,
                "text_encoder.pretrained",
                f"is ignored for '{self.path}' (the weights come from there): remove it",
            )
        else:
            names = open_clip_model_names()
            name = self.path.replace("/", "-")  # open_clip's own normalisation of model names
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            check(
                not names or name in names,
                "text_encoder.path",
                f"'{self.path}' is not an open_clip model name{hint}: use one such as ViT-H-14, or 'local-dir:/path'",
            )


def open_clip_model_names() -> list[str]:
    """open_clip's built-in model names, read from its config folder without importing it (that takes seconds)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return []  # not installed: loading says so
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return sorted(p.stem for p in folder.glob("*.json"))
