"""An infinite, exactly resumable, rank-aware batch sampler.

The training loop counts consumed batches; on resume it builds a new sampler with `start_batch=consumed` and gets
exactly the batches an uninterrupted run would have seen next. This works because every batch is a pure function of
(seed, epoch, rank, position in the epoch): no state is carried from one batch to the next.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ldm.errors import UserError


def check_sampler_arguments(batch_size: int, rank: int, world_size: int, start_batch: int) -> None:
    """The checks every batch sampler of the training loop makes (this one and `ldm.data.buckets`')."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}: fix train.batch_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of dataset keys (key = epoch * num_items + index) forever, epoch after epoch.

    Each epoch is a permutation of range(num_items) (seeded with seed + epoch, the same on every rank). Its first
    `batches_per_epoch * batch_size * world_size` entries are dealt round-robin to the ranks, so shares are disjoint
    and every rank takes the same number of steps; the few leftover items sit out this epoch (the next epoch's
    permutation differs, so no item is left out systematically).

    Keys carry the epoch so the dataset can derive augmentation randomness from (seed, epoch, index) alone.
    Use it as `DataLoader(dataset, batch_sampler=sampler)`. It has no `len()`: it never ends.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start_batch: int = 0,
    ) -> None:
        check_sampler_arguments(batch_size, rank, world_size, start_batch)
        super().__init__()
        step_items = batch_size * world_size
        if num_items < step_items:
            raise UserError(
                f"dataset has {num_items} images but one step needs {step_items} "
                f"({batch_size} per device x {world_size} devices): lower train.batch_size or add images"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start_batch = start_batch
        # Per rank. Dropping the tail keeps all ranks in lockstep (a rank with one batch more would hang in
        # the gradient all-reduce waiting for the others).
        self.batches_per_epoch = num_items // step_items

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The full permutation of item indices for `epoch` (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_items)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, as dataset keys."""
        used = self.epoch_order(epoch)[: self.batches_per_epoch * self.batch_size * self.world_size]
        # Round-robin dealing: rank r gets positions r, r + world_size, ... so shares are disjoint.
        share = (used[self.rank :: self.world_size] + epoch * self.num_items).tolist()
        return [share[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            batches = self.rank_batches(epoch)
            yield from batches[position:]
            epoch, position = epoch + 1, 0
