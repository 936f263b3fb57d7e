"""Sample quality from images: the feature rows of an image set (`Features`, by the extractors each metric needs,
`Extractors`) and the numbers of two sets (`measure`). The one home of that arithmetic for `ldm-eval --metrics`
(`ldm.eval.quality`) and for the metrics measured during training (`ldm.training.sample_metrics`):

    extractors = open_extractors(("fid", "clip"), "demo", None, None)
    reference = features_of(extractors, reference_images)  # once
    generated = features_of(extractors, images, prompts)  # every evaluation: the same prompts and seeds
    numbers, warnings = measure(("fid", "clip"), reference, generated)

With several processes, each extracts its own images' rows and `gathered` puts every row on every process, sorted by
the images' global index, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.errors import UserError
from ldm.quality import metrics as m
from ldm.quality.features import ImageFeatures, TextImageFeatures, batches

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = ("standard", "demo")
KID_SEED = 0  # the subsets KID draws: fixed, so the same features give the same KID


@dataclass
class Extractors:
    """What each metric runs on: `images` for FID and KID, `clip` (images and captions) for CLIP score and CMMD."""

    images: ImageFeatures | None = None
    clip: TextImageFeatures | None = None


@dataclass
class Features:
    """One image set's feature rows, in a fixed order (file order, or prompt then seed): `images` (N, D) for FID/KID,
    `clip` (N, E) L2-normalised image embeddings, `texts` (N, E) their captions' embeddings (generated sets only)."""

    images: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    texts: torch.Tensor | None = None

    def __len__(self) -> int:
        return next((len(t) for t in (self.images, self.clip, self.texts) if t is not None), 0)

    @staticmethod
    def cat(parts: list[Features], extractors: Extractors, with_texts: bool) -> Features:
        """The rows of `parts` one after the other (empty tensors of the right width for no parts)."""
        def rows(name: str, extractor) -> torch.Tensor | None:
            if extractor is None or (name == "texts" and not with_texts):
                return None
            return torch.cat([getattr(p, name) for p in parts]) if parts else torch.zeros(0, extractor.dim)

        return Features(rows("images", extractors.images), rows("clip", extractors.clip),
                        rows("texts", extractors.clip))


def open_extractors(metrics: tuple[str, ...], features: str, inception: str | None, clip_model: str | None,
                    device: torch.device | str = "cpu") -> Extractors:
    """The extractors `metrics` need, loaded; a missing or wrong weights file is a one-line `UserError`."""
    from ldm.quality.features import ClipFeatures, DemoFeatures, InceptionFeatures, find_inception

    need_images = bool({"fid", "kid"} & set(metrics))
    need_clip = bool({"clip", "cmmd"} & set(metrics))
    if features == "demo":
        demo = DemoFeatures(device)
        return Extractors(demo if need_images else None, demo if need_clip else None)
    if need_clip and clip_model is None:
        names = "/".join(n for n in metrics if n in ("clip", "cmmd"))
        raise UserError(f"--metrics {names} need a CLIP model: pass --clip-model DIR (a local transformers CLIPModel "
                        "directory; CMMD as published uses openai/clip-vit-large-patch14-336), or --features demo")
    images = InceptionFeatures(find_inception(inception), device) if need_images else None
    return Extractors(images, ClipFeatures.from_dir(clip_model, device) if need_clip else None)


def list_reference(directory: str | Path, option: str = "--reference") -> list[Path]:
    """The image files under `directory` (recursively), sorted by path: the reference set, in a fixed order. `option`:
    what the user set, named in the one-line refusals."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{option} '{directory}' is not a directory: pass a directory of reference images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{option} '{directory}' holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a directory "
                        "of reference images")
    return files


def to_chw(image) -> torch.Tensor:
    """A PIL RGB image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def features_of(extractors: Extractors, images: Iterable[torch.Tensor], prompts: list[str] | None = None,
                batch_size: int = 32) -> Features:
    """Every extractor's rows for `images` ((3, H, W) uint8 each, read lazily: one batch in memory at a time), and
    the caption embeddings of `prompts` (one per image) when there is a CLIP extractor."""
    parts = []
    for batch in batches(images, batch_size):
        parts.append(Features(None if extractors.images is None else extractors.images(batch).float().cpu(),
                              None if extractors.clip is None else extractors.clip(batch).float().cpu()))
    out = Features.cat(parts, extractors, with_texts=False)
    if extractors.clip is not None and prompts is not None:
        texts = [extractors.clip.embed_texts(prompts[i: i + batch_size]) for i in range(0, len(prompts), batch_size)]
        out.texts = torch.cat(texts) if texts else torch.zeros(0, extractors.clip.dim)
    return out


def measure(metrics: tuple[str, ...], reference: Features, generated: Features, *, kid_subsets: int = m.KID_SUBSETS,
            kid_subset_size: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The numbers of `metrics` and the warnings a reader needs beside them. KID's subset size defaults to
    min(1000, both set sizes), said in the numbers; one given and too large is refused."""
    numbers: dict[str, Any] = {}
    warnings: list[str] = []
    n_ref, n_gen = len(reference), len(generated)
    if "fid" in metrics:
        numbers["fid"] = m.fid(reference.images, generated.images)
        warning = m.fid_warning(n_ref, n_gen, reference.images.shape[1])
        warnings += [warning] if warning else []
    if "kid" in metrics:
        size = kid_subset_size or min(m.KID_SUBSET_SIZE, n_ref, n_gen)
        mean, std = m.kid(reference.images, generated.images, subsets=kid_subsets, subset_size=size, seed=KID_SEED)
        numbers["kid"] = {"mean": mean, "std": std, "subsets": kid_subsets, "subset_size": size, "seed": KID_SEED}
    if "clip" in metrics:
        numbers["clip_score"] = m.clip_score(generated.clip, generated.texts)
    if "cmmd" in metrics:
        numbers["cmmd"] = m.cmmd(reference.clip, generated.clip)
        numbers["cmmd_unbiased"] = m.cmmd(reference.clip, generated.clip, unbiased=True)
    return numbers, warnings


def gathered(accelerator, mine: Features, order: list[int]) -> Features:
    """Every process's rows on every process, sorted by their global index `order` (this process's indices)."""
    from ldm.parallel.collective import gather_rows

    index = gather_rows(accelerator, torch.tensor(order, dtype=torch.long)[:, None])[:, 0]  # (N,)
    sort = torch.argsort(index)
    rows = {k: None if t is None else gather_rows(accelerator, t)[sort] for k, t in vars(mine).items()}
    return Features(**rows)
