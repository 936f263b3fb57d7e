"""From a `DataConfig` to training and validation data whose order survives a resume exactly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from ldm.data.batch_order import ResumableBatchSampler
from ldm.data.buckets import BucketBatchSampler
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, collate_images, split_train_val
from ldm.data.remote import RemoteOptions
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.parallel.collective import main_process_first

log = logging.getLogger(__name__)


class KeyedSubset(Dataset):
    """A subset addressed by sampler keys `epoch * len(self) + i`, re-keyed for the full dataset.

    The full dataset derives each image's augmentation from (epoch, index) via its own key, so a subset must pass
    the epoch through instead of collapsing keys to indices as `torch.utils.data.Subset` would.
    """

    def __init__(self, dataset: ImageCaptionDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int):
        epoch, i = divmod(key, len(self.indices))
        return self.dataset[epoch * len(self.dataset) + self.indices[i]]


def resolve_source(cfg: DataConfig, accelerator: Accelerator) -> str:
    """The dataset path to load; for `path: shapes`, the synthetic set is generated once (by the main process)."""
    if cfg.path != "shapes":
        return cfg.path
    from ldm.demo.shapes import write_dataset

    target = Path(cfg.shapes_dir) / f"shapes-{cfg.shapes_count}-{cfg.resolution}px-seed0"
    with main_process_first(accelerator):
        if accelerator.is_main_process and not (target / "metadata.jsonl").is_file():
            log.info("generating %d synthetic shapes images into %s", cfg.shapes_count, target)
            write_dataset(target, num_images=cfg.shapes_count, seed=0, size=cfg.resolution, overwrite=True)
    return str(target)


def build_datasets(
    cfg: DataConfig, accelerator: Accelerator, seed: int, caption_column: str | None
) -> tuple[KeyedSubset, KeyedSubset]:
    """Train and held-out validation subsets of one dataset, split by a fixed seed (validation is never augmented); with
    `data.val_path`, all of `data.path` and all of that second dataset."""
    source = resolve_source(cfg, accelerator)
    kwargs = dict(
        image_column=cfg.image_column, caption_column=caption_column, split=cfg.split, seed=seed,
        max_pixels=cfg.max_image_pixels, remote=RemoteOptions.from_data_config(cfg),
        masks=cfg.masks,  # the same images as stage 2 (NAME_mask files are not images); the VAE ignores the masks
    )
    with main_process_first(accelerator):  # the main process builds the `datasets` cache, the others reuse it
        train_full = build_image_dataset(
            source, transform=ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip), **kwargs
        )
        val_full = build_image_dataset(cfg.val_path or source, transform=ImageTransform(cfg.resolution, True, False),
                                       **kwargs)
    if cfg.val_path:
        return KeyedSubset(train_full, list(range(len(train_full)))), KeyedSubset(val_full, list(range(len(val_full))))
    train_idx, val_idx = split_train_val(len(train_full), cfg.num_val, seed=0)
    return KeyedSubset(train_full, train_idx), KeyedSubset(val_full, val_idx)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    accelerator: Accelerator,
    start_batch: int,
    collate: Callable[[list], dict] = collate_images,
    bucket_ids: list[int] | None = None,
) -> DataLoader:
    """An endless loader of this process's share of the data, starting at its `start_batch`-th batch; with
    `bucket_ids` (each item's aspect-ratio bucket), every batch is from one bucket."""
    kwargs = dict(seed=seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
                  start_batch=start_batch)
    if bucket_ids is not None:
        sampler: torch.utils.data.Sampler = BucketBatchSampler(bucket_ids, batch_size, **kwargs)
    else:
        sampler = ResumableBatchSampler(len(dataset), batch_size, **kwargs)
    # A private generator: creating the iterator draws a worker base seed from it, and drawing from the global RNG
    # instead would shift every later random number of a resumed run (its iterator is made after the RNG restore).
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, generator=generator
    )
