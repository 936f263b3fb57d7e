"""Sample quality during training (`sample.metrics`): FID, KID, CLIP score and CMMD of a fixed set of generated images,
with `ldm-eval --metrics`' own extractors and arithmetic (`ldm.quality.measure`), every `sample.every` steps.

The generated set is fixed: image k of `count` is prompt k % P at seed `seed + k`, so two evaluations differ only
where the weights do. The stage draws the images (`items`: the global list, dealt over the processes by the stage,
e.g. `ldm.unet.validation_grid.sample_images`); each process extracts its own images' features, every process gets
every row sorted by k (`gathered`), and the main process measures: the numbers are those of one process, whatever
the number of processes. The reference set's features are extracted once, when the run starts, the same way.

The main process also keeps the streaks of worse evaluations (`ldm.training.worsening`), rebuilt on a resume from
`val_loss.jsonl`'s rows; every process gets the main process's numbers and, with `stop_when_worse`, whether to stop.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from ldm.data.config import DataConfig
from ldm.errors import UserError
from ldm.parallel.collective import attempt, gather_json, raise_if_any_failed, run_on_all
from ldm.quality.measure import features_of, gathered, list_reference, measure, open_extractors, to_chw
from ldm.training.worsening import Worsening

log = logging.getLogger(__name__)
# the extractors' errors name ldm-eval's options (ldm/quality): in a training run, the config keys that set them
CONFIG_KEYS = {"--inception": "sample.inception", "--clip-model": "sample.clip_model", "--metrics": "sample.metrics",
               "--features": "sample.features"}

ImageLoader = Callable[[], torch.Tensor | None]  # -> uint8 (3, H, W), or None for an image that cannot be read


def reference_files(directory: str) -> list[ImageLoader]:
    """`sample.reference`: the images under `directory` (recursively, sorted by path), each read when called; an
    unreadable image is a one-line `UserError` naming it."""
    from ldm.image_io import open_image

    files = list_reference(directory, option="sample.reference")
    return [lambda f=f: to_chw(open_image(f, f"reference image '{f}'")) for f in files]


def held_out_images(data_cfg: DataConfig, accelerator: Accelerator, indices: Sequence[int]) -> list[ImageLoader]:
    """The held-out images at dataset `indices` (of `data.val_path` when set, else of `data.path`), as training sees
    them before any random flip: centre-cropped to `data.resolution` squares (the size the samples are drawn at),
    None for one that does not decode (skipped, as the latent cache skips it)."""
    from ldm.data.loader import resolve_source
    from ldm.data.sources import build_image_dataset
    from ldm.data.transforms import ImageTransform
    from ldm.parallel.collective import main_process_first

    with main_process_first(accelerator):
        transform = ImageTransform(data_cfg.resolution, center_crop=True, random_flip=False)
        dataset = build_image_dataset(data_cfg.val_path or resolve_source(data_cfg, accelerator), transform=transform,
                                      image_column=data_cfg.image_column, caption_column=data_cfg.caption_column,
                                      split=data_cfg.split, seed=0, max_pixels=data_cfg.max_image_pixels)

    def load(index: int) -> torch.Tensor | None:
        item = dataset[index]
        return None if "skipped" in item else (item["pixel_values"] + 1) / 2  # [-1, 1] -> [0, 1], (3, H, W)

    return [lambda i=i: load(i) for i in indices]


class SampleMetrics:
    """The metrics, their extractors, the reference set's features and the streaks of one run."""

    def __init__(self, accelerator: Accelerator, metrics: Sequence[str], features: str, inception: str | None,
                 clip_model: str | None, reference: Sequence[ImageLoader], prompts: Sequence[str], count: int,
                 seed: int, patience: int, stop_when_worse: bool, batch_size: int = 32) -> None:
        """Open the extractors and extract the reference set's features (a collective: every process, each its
        share of the images); a missing weights file or an unreadable image stops every process with one line."""
        self.accelerator = accelerator
        self.metrics = tuple(metrics)
        self.prompts = [prompts[k % len(prompts)] for k in range(count)]
        self.items = [(self.prompts[k], seed + k) for k in range(count)]  # (prompt, seed) of image k
        self.batch_size = batch_size
        self.stop_when_worse = stop_when_worse
        self.worsening = Worsening(patience)
        self.warned = False  # the sample-size warnings of `measure`: once per run, they do not change
        rank, world = accelerator.process_index, accelerator.num_processes
        self.extractors, error = attempt(lambda: open_extractors(self.metrics, features, inception or None,
                                                                 clip_model or None, accelerator.device))
        if isinstance(error, UserError):  # its message names ldm-eval's options; this run's user set sample.* keys
            error = UserError(re.sub("|".join(map(re.escape, CONFIG_KEYS)), lambda m: CONFIG_KEYS[m[0]], str(error)))
        raise_if_any_failed(accelerator, error, what="loading the sample-metric feature extractors")
        mine = list(range(len(reference)))[rank::world]
        held: dict[str, Any] = {}

        def extract() -> None:
            images = [(i, reference[i]()) for i in mine]
            images = [(i, image) for i, image in images if image is not None]
            held["order"] = [i for i, _ in images]
            held["rows"] = features_of(self.extractors, (image for _, image in images), batch_size=batch_size)

        run_on_all(accelerator, extract, what="reading the sample-metric reference images")
        self.reference = gathered(accelerator, held["rows"], held["order"])
        if len(self.reference) < 2:  # every process holds every row: all raise the same error
            raise UserError(f"sample.metrics need at least 2 reference images, got {len(self.reference)} that could be "
                            "read: add images to sample.reference, or raise data.num_val")
        log.info("sample metrics %s: %d reference images, %d generated per evaluation, features: %s",
                 ",".join(self.metrics), len(self.reference), count,
                 self.extractors.images.name if self.extractors.images else self.extractors.clip.name)

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """A resumed run's earlier evaluations (`ValidationLog.rows`, on the main process): the streaks go on."""
        self.worsening.replay(rows)

    def evaluate(self, step: int, images: Sequence[tuple[int, torch.Tensor]]) -> tuple[dict[str, Any] | None, bool]:
        """This process's generated images (k, uint8 (3, H, W)) -> (the numbers, whether the run should stop), the
        main process's on every process. A collective: call it on every process."""
        mine = features_of(self.extractors, [image for _, image in images], [self.prompts[k] for k, _ in images],
                           self.batch_size)
        generated = gathered(self.accelerator, mine, [k for k, _ in images])
        outcome = None
        if self.accelerator.is_main_process:
            numbers, warnings = measure(self.metrics, self.reference, generated)
            numbers.update(images=len(generated), reference=len(self.reference))
            for warning in warnings if not self.warned else []:
                log.warning("warning: %s", warning)
            self.warned = True
            for warning in self.worsening.update(step, numbers):
                log.warning("step %d: %s", step, warning)
            outcome = [numbers, self.stop_when_worse and self.worsening.stop]
        numbers, stop = gather_json(self.accelerator, outcome)[0]  # the main process's, on every process
        return numbers, stop
