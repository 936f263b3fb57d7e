"""Feature extractors for the sample-quality metrics (`ldm.quality.metrics`): images in, one feature row per image out.

The protocol is small on purpose, so a test or a training loop can pass its own: `ImageFeatures` is any callable
taking uint8 images (N, 3, H, W) (one size per call) and returning float32 features (N, D) on the CPU, with a
`name` (recorded in every report: numbers are comparable only under the same extractor) and `dim` = D. For the
CLIP score it must also embed captions in the same space (`TextImageFeatures.embed_texts`).

- `InceptionFeatures`: the FID network (Inception v3 converted from TensorFlow's 2015-12-05 graph, 2048-d pool3),
  as torchmetrics' `NoTrainInceptionV3` (torch-fidelity's model), from a local weights file: FID and KID.
  Resizing to 299 px is the TF1 bilinear of the original graph (torchmetrics `antialias=False`, what torch-fidelity
  does); torchmetrics' default antialiased resize gives other numbers.
- `ClipFeatures`: a transformers `CLIPModel` directory and its processor; L2-normalised image and text embeddings:
  CLIP score and CMMD (the paper's CMMD uses ViT-L/14 at 336 px).
- `DemoFeatures`: the shapes demo's own image tower (`ldm.demo.image_tower`), 64-d, for all four metrics offline.
  Its numbers measure shapes images only and compare with nothing published.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ldm.errors import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name; torch-fidelity's file has the same
FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"  # weights under the name weights-inception-...
INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                  "fc.weight": (1008, 2048)}  # a few of its 566 tensors: enough to tell another file from it
DEMO_SIZE = 32  # the demo image tower's input side


@runtime_checkable
class ImageFeatures(Protocol):
    name: str  # what the report records: numbers are comparable only under the same name
    dim: int  # D

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, D) on the CPU."""
        ...


@runtime_checkable
class TextImageFeatures(ImageFeatures, Protocol):
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """N captions -> float32 (N, D) on the CPU, in the space of the image features (CLIP score)."""
        ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 as it is; float in [0, 1] rounded to 0..255 (as the PNGs of the same images would hold)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Images given one at a time ((3, H, W) uint8, or float in [0, 1]) as uint8 batches (B, 3, H, W), in order:
    consecutive images of one size, at most `batch_size` of them. Lazy: an iterable of files is read as it goes."""
    batch: list[torch.Tensor] = []
    for image in images:
        image = to_uint8(image)
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def extract(features: ImageFeatures, images: Iterable[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Features (N, D) float32 of images given one at a time (see `batches`), in order."""
    rows = [features(batch).float().cpu() for batch in batches(images, batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, features.dim)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _tensor(output) -> torch.Tensor:
    """transformers 5's get_*_features return a model output whose pooler_output is the projection; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------------ Inception (FID)

def find_inception(path: str | None) -> Path:
    """The weights file: `path` (checked), else torch-fidelity's download in the torch hub cache, else a one-line
    `UserError` naming the option and the file (nothing is downloaded here: evaluation must not depend on a
    network)."""
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_FILE
        if cached.is_file():
            return cached
        raise UserError(f"--metrics fid/kid need the FID Inception weights offline: pass --inception PATH to "
                        f"{INCEPTION_FILE} (pytorch-fid's release; torch-fidelity's {FIDELITY_FILE} is the same "
                        "network), or --features demo for the shapes demo")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--inception '{path}' is not a file: pass the path of {INCEPTION_FILE}")
    try:  # weights only: a pickle that would run code is refused here, before torch-fidelity unpickles it fully
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--inception '{path}' cannot be read as {INCEPTION_FILE} ({reason[:200]})") from None
    shapes = {k: tuple(v.shape) for k, v in state.items() if k in INCEPTION_KEYS} if isinstance(state, dict) else {}
    if shapes != INCEPTION_KEYS:
        raise UserError(f"--inception '{path}' is not the FID Inception network's weights ({INCEPTION_FILE}): "
                        "its tensors have other names or shapes")
    return file


class InceptionFeatures:
    """The FID Inception v3's 2048-d pool3 features (torchmetrics' NoTrainInceptionV3, torch-fidelity's network)."""

    name = "Inception v3 2015-12-05, pool3 (2048-d)"
    dim = 2048

    def __init__(self, weights: Path, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.device = torch.device(device)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights), antialias=False).to(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device)).float().cpu()  # (N, 2048)


# ------------------------------------------------------------------------------------------------ CLIP

class ClipFeatures:
    """L2-normalised image and text embeddings of a transformers CLIPModel, preprocessed by its own processor
    (resize, centre crop, normalise) as torchmetrics' CLIPScore does."""

    def __init__(self, model, processor, name: str, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.dim = model.config.projection_dim
        self.max_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def from_dir(cls, path: str, device: torch.device | str = "cpu") -> ClipFeatures:
        """A local CLIPModel directory (config, weights, preprocessor and tokenizer files); nothing is downloaded."""
        from transformers import CLIPModel, CLIPProcessor

        if not Path(path).is_dir():
            raise UserError(f"--clip-model '{path}' is not a directory: pass a local transformers CLIPModel "
                            "directory (for CMMD as published: openai/clip-vit-large-patch14-336), or --features demo")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--clip-model '{path}' is not a loadable CLIPModel directory: {reason[:200]}") from None
        return cls(model, processor, f"CLIP {Path(path).resolve().name}", device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        return _unit(_tensor(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_tokens)
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return _unit(_tensor(out).float()).cpu()


# ------------------------------------------------------------------------------------------------ the shapes demo

class DemoFeatures:
    """The shapes demo's image tower and the bundled model's text encoder, one 64-d space (ldm.demo.image_tower).
    Images are resized to 32 px (bilinear, antialiased) and mapped to [-1, 1] as in its training."""

    name = "shapes-demo image tower (64-d)"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from ldm.demo.image_tower import load_demo_clip
        from ldm.text.tokenizer import offline_clip_tokenizer

        self.device = torch.device(device)
        self.model = load_demo_clip().to(self.device)
        self.dim = self.model.config.projection_dim
        self.tokenizer = offline_clip_tokenizer()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32) / 255.0 * 2.0 - 1.0  # as ldm.pixels.pil_to_tensor
        if x.shape[-2:] != (DEMO_SIZE, DEMO_SIZE):
            x = F.interpolate(x, size=(DEMO_SIZE, DEMO_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return _unit(_tensor(self.model.get_image_features(pixel_values=x)).float()).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        from ldm.text.tokenizer import CONTEXT_LENGTH, tokenize_prompts

        ids = tokenize_prompts(self.tokenizer, list(prompts), CONTEXT_LENGTH).to(self.device)
        return _unit(_tensor(self.model.get_text_features(input_ids=ids)).float()).cpu()
