"""ShardedSampler: the resumable rank-sharded order of rows that both loader backends read.

Sharding (global batch B, world W, per-rank batch B // W):
- shuffled or drop_last loaders: step s of epoch e takes perm[s*B:(s+1)*B] of the permutation
  seeded by seed+e (identity when not shuffled) and rank r takes the r-th of W equal slices, so W
  ranks together see exactly what 1 rank sees. A short final global batch (drop_last=False) is
  split as evenly as possible, so a rank may get a short or empty final batch.
- eval loaders (shuffle=False, drop_last=False): rank r owns the contiguous block
  [r*N//W, (r+1)*N//W) and walks it in order, so every row is seen exactly once and per-rank
  outputs concatenate in rank order. Every rank runs ceil(ceil(N/W) / (B//W)) steps; a rank with
  a smaller block ends with a short or empty batch (empty batches keep collectives in step).
"""
from __future__ import annotations

import torch

from data.datasets import Split
from data.errors import InputError


def eval_block(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """(first, end) of the rows rank `rank` of `world` owns in an eval loader: its contiguous block."""
    return rank * num_samples // world, (rank + 1) * num_samples // world


class ShardedSampler:
    """Yields this rank's list of row indices per step; `set_epoch(epoch, start_step)` resumes mid-epoch."""

    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch <= 0 or global_batch % world:
            raise InputError(f"global batch {global_batch}: expected a positive multiple of the world size {world}")
        if not 0 <= rank < world:
            raise InputError(f"rank {rank}: expected 0 <= rank < world size {world}")
        self.num_samples, self.global_batch, self.rank, self.world = num_samples, global_batch, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.contiguous = not shuffle and not drop_last
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        if self.contiguous:
            largest_block = -(-self.num_samples // self.world)
            return -(-largest_block // (self.global_batch // self.world))
        if self.drop_last:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0):
        if not 0 <= start_step <= self.steps_per_epoch:
            raise InputError(f"start step {start_step}: expected 0..{self.steps_per_epoch} (steps per epoch)")
        self.epoch, self.start_step = epoch, start_step

    def stream_start(self, step: int) -> tuple[int, int]:
        """(epoch, start step) of global step `step`, where a loader's stream(step) begins."""
        if not self.drop_last:
            # Without drop_last an epoch may end in a short or empty batch: such loaders go an epoch at a time.
            raise InputError("stream() needs a training loader (drop_last=True): read eval loaders with epoch()")
        if step < 0:
            raise InputError(f"stream step {step}: expected >= 0")
        return divmod(step, self.steps_per_epoch)

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def _order(self, epoch: int) -> torch.Tensor:
        if self.contiguous:
            return torch.arange(*eval_block(self.num_samples, self.rank, self.world))
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        return torch.arange(self.num_samples)

    def __iter__(self):
        # Capture epoch and start step now: a generator body would read them only at its first next().
        return self._batches(self._order(self.epoch), self.start_step)

    def _batches(self, order: torch.Tensor, start_step: int):
        for step in range(start_step, self.steps_per_epoch):
            if self.contiguous:
                local = self.global_batch // self.world
                yield order[step * local:(step + 1) * local].tolist()
            else:
                batch = order[step * self.global_batch:(step + 1) * self.global_batch]
                n = len(batch)
                yield batch[self.rank * n // self.world:(self.rank + 1) * n // self.world].tolist()


def split_sampler(split: Split, global_batch: int, **sharding) -> ShardedSampler:
    """A ShardedSampler over the rows of `split` (`sharding`: its keyword arguments); raises when the
    split is too small for one step, which a loader could only report as an epoch of nothing."""
    sampler = ShardedSampler(len(split), global_batch, **sharding)
    if sampler.steps_per_epoch == 0:
        raise InputError(f"split {split.name!r} has {len(split)} rows: not enough for one step of global batch "
                         f"{global_batch}{' with drop_last' if sampler.drop_last else ''}")
    return sampler
