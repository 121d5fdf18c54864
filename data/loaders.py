"""Batches for training and inference: a resumable rank-sharded sampler and the torch Loader.

Sharding (global batch B, world W, per-rank batch B // W):
- shuffled or drop_last loaders: step s of epoch e takes perm[s*B:(s+1)*B] of the permutation
  seeded by seed+e (identity when not shuffled) and rank r takes the r-th of W equal slices, so W
  ranks together see exactly what 1 rank sees. A short final global batch (drop_last=False) is
  split as evenly as possible, so a rank may get a short or empty final batch.
- eval loaders (shuffle=False, drop_last=False): rank r owns the contiguous block
  [r*N//W, (r+1)*N//W) and walks it in order, so every row is seen exactly once and per-rank
  outputs concatenate in rank order. Every rank runs ceil(ceil(N/W) / (B//W)) steps; a rank with
  a smaller block ends with a short or empty batch (empty batches keep collectives in step).

Loaders give `epoch(epoch, start_step)`, and training loaders (drop_last) `stream(step)`: every batch
from global step `step` on, epoch after epoch, in the rows successive epoch() calls give.
"""
from __future__ import annotations

import importlib
import itertools

import torch

from data import transforms
from data.datasets import ImageDataset, Split

KINDS = ("barlow_twins", "train", "weak", "weak_strong", "eval")


class ShardedSampler:
    """Yields this rank's list of row indices per step; `set_epoch(epoch, start_step)` resumes mid-epoch."""

    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch <= 0 or global_batch % world:
            raise ValueError(f"global batch {global_batch}: expected a positive multiple of the world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world size {world}")
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
            raise ValueError(f"start step {start_step}: expected 0..{self.steps_per_epoch} (steps per epoch)")
        self.epoch, self.start_step = epoch, start_step

    def stream_start(self, step: int) -> tuple[int, int]:
        """(epoch, start step) of global step `step`, where a loader's stream(step) begins."""
        if not self.drop_last:
            # Without drop_last an epoch may end in a short or empty batch: such loaders go an epoch at a time.
            raise ValueError("stream() needs a training loader (drop_last=True): read eval loaders with epoch()")
        if step < 0:
            raise ValueError(f"stream step {step}: expected >= 0")
        return divmod(step, self.steps_per_epoch)

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def _order(self, epoch: int) -> torch.Tensor:
        if self.contiguous:
            n, world = self.num_samples, self.world
            return torch.arange(self.rank * n // world, (self.rank + 1) * n // world)
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


class Collate:
    """(views, label, index) items -> {"views": [NCHW per view], "label": int64, "index": int64}."""

    def __init__(self, view_sizes: list[int]):
        self.view_sizes = view_sizes

    def __call__(self, items):
        if not items:   # an empty final eval batch still has the right shapes
            return {"views": [torch.empty(0, 3, s, s) for s in self.view_sizes],
                    "label": torch.empty(0, dtype=torch.int64), "index": torch.empty(0, dtype=torch.int64)}
        views, labels, indices = zip(*items)
        return {"views": [torch.stack(view) for view in zip(*views)],
                "label": torch.tensor(labels, dtype=torch.int64), "index": torch.tensor(indices, dtype=torch.int64)}


class Loader:
    """A torch DataLoader over a ShardedSampler. Workers restart each epoch so they see the epoch's seed."""

    def __init__(self, dataset: ImageDataset, sampler: ShardedSampler, view_sizes: list[int], workers: int,
                 pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
        self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                   collate_fn=Collate(view_sizes), pin_memory=pin_memory)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0):
        """Iterator over this rank's batches of `epoch`, from `start_step` on."""
        self.sampler.set_epoch(epoch, start_step)
        self.dataset.set_epoch(epoch)
        return iter(self._loader)

    def stream(self, step: int):
        """Endless iterator over this rank's batches from global step `step` on, epoch after epoch."""
        first_epoch, start_step = self.sampler.stream_start(step)
        # Lazy: each epoch's iterator is made once the previous one is used up (they share the sampler).
        return itertools.chain.from_iterable(self.epoch(epoch, start_step if epoch == first_epoch else 0)
                                             for epoch in itertools.count(first_epoch))


def resolve_backend(name: str) -> str:
    """auto|dali|torch -> dali|torch; auto picks DALI when nvidia.dali imports."""
    if name == "torch":
        return "torch"
    if name not in ("auto", "dali"):
        raise ValueError(f"data backend {name!r}: expected one of auto, dali, torch")
    try:
        importlib.import_module("nvidia.dali")
    except (ImportError, OSError) as e:   # OSError: the wheel is there but its native libraries fail to load
        if name == "dali":
            raise ValueError(f"data backend 'dali': nvidia.dali does not import ({e})") from None
        return "torch"
    return "dali"


def views_for(kind: str, image_size: int, scales: list[int] | None = None) -> transforms.MultiView:
    if kind == "barlow_twins":
        return transforms.barlow_twins(image_size)
    if kind == "train":
        return transforms.MultiView(transforms.train(image_size))
    if kind == "weak":
        return transforms.MultiView(transforms.weak(image_size))
    if kind == "weak_strong":
        return transforms.MultiView(transforms.weak(image_size), transforms.strong(image_size))
    if kind == "eval":
        return transforms.MultiView(*(transforms.evaluate(s) for s in scales or [image_size]))
    raise ValueError(f"loader kind {kind!r}: expected one of {', '.join(KINDS)}")


def build_loader(split: Split, kind: str, *, image_size: int, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, workers: int = 2,
                 backend: str = "torch", on_bad_image: str = "error", scales: list[int] | None = None,
                 device: torch.device | str = "cpu", scanned: dict | None = None):
    """A Loader (torch backend) or DaliLoader (dali backend) over `split`.

    `device`: the torch device the training runs on, chosen by the caller: a CUDA device pins batches
    (torch) or runs GPU pipelines on it (DALI). `scanned`: DALI only, data.dali.scan_files(split.paths)
    computed elsewhere (e.g. on rank 0 and broadcast), so this loader does not scan the split itself.
    """
    device = torch.device(device)
    if resolve_backend(backend) == "dali":
        from data.dali import DaliLoader
        return DaliLoader(split, kind, image_size=image_size, global_batch=global_batch, rank=rank, world=world,
                          seed=seed, shuffle=shuffle, drop_last=drop_last, workers=workers,
                          on_bad_image=on_bad_image, scales=scales, device=device, scanned=scanned)
    view_transform = views_for(kind, image_size, scales)
    view_sizes = (scales or [image_size]) if kind == "eval" else [image_size] * len(view_transform.pipelines)
    sampler = ShardedSampler(len(split), global_batch, rank=rank, world=world, seed=seed, shuffle=shuffle,
                             drop_last=drop_last)
    if sampler.steps_per_epoch == 0:
        raise ValueError(f"split {split.name!r} has {len(split)} rows: not enough for one step of global batch "
                         f"{global_batch}{' with drop_last' if drop_last else ''}")
    dataset = ImageDataset(split, view_transform, seed=seed, on_bad_image=on_bad_image)
    return Loader(dataset, sampler, view_sizes, workers, pin_memory=device.type == "cuda")
