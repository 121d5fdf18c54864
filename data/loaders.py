"""Batch loaders: the BatchLoader protocol, the torch Loader, and build_loader, which picks a backend.

Both backends, this module's Loader and data.dali's DaliLoader, read the rows data.sampler's
ShardedSampler deals this rank and yield the views data.views lists for the loader's kind. They give
`epoch(epoch, start_step)`, and training loaders (drop_last) `stream(step)`: every batch from global
step `step` on, epoch after epoch, in the rows successive epoch() calls give.
"""
from __future__ import annotations

import importlib
import itertools
from typing import Iterator, Protocol, runtime_checkable

import torch

from data import transforms
from data.datasets import ImageDataset, Split
from data.sampler import ShardedSampler, split_sampler
from data.transforms import Augment
from data.views import View, empty_batch, views_of
from data.errors import InputError


@runtime_checkable
class BatchLoader(Protocol):
    """What build_loader returns, whichever the backend: batches as data.views describes them."""

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Iterator over this rank's batches of `epoch`, from `start_step` on."""

    def stream(self, step: int) -> Iterator[dict]:
        """Endless iterator over this rank's batches from global step `step` on, epoch after epoch."""


class Collate:
    """(views, label, index) items -> {"views": [NCHW per view], "label": int64, "index": int64}."""

    def __init__(self, views: list[View]):
        self.views = views

    def __call__(self, items):
        if not items:   # an empty final eval batch still has the right shapes
            return empty_batch(self.views)
        views, labels, indices = zip(*items)
        return {"views": [torch.stack(view) for view in zip(*views)],
                "label": torch.tensor(labels, dtype=torch.int64), "index": torch.tensor(indices, dtype=torch.int64)}


class Loader:
    """A torch DataLoader over a ShardedSampler. Workers restart each epoch so they see the epoch's seed."""

    def __init__(self, dataset: ImageDataset, sampler: ShardedSampler, views: list[View], workers: int,
                 pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
        self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                   collate_fn=Collate(views), pin_memory=pin_memory)

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
        raise InputError(f"data backend {name!r}: expected one of auto, dali, torch")
    try:
        importlib.import_module("nvidia.dali")
    except (ImportError, OSError) as e:   # OSError: the wheel is there but its native libraries fail to load
        if name == "dali":
            raise InputError(f"data backend 'dali': nvidia.dali does not import ({e})") from None
        return "torch"
    return "dali"


def build_loader(split: Split, kind: str, *, image_size: int, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, workers: int = 2,
                 backend: str = "torch", on_bad_image: str = "error", scales: list[int] | None = None,
                 device: torch.device | str = "cpu", scanned: dict | None = None,
                 augment: Augment = Augment()) -> BatchLoader:
    """A Loader (torch backend) or DaliLoader (dali backend) over `split`.

    `kind`: a key of data.views.KINDS; `scales`: the sizes of its per-scale views (eval), default
    [image_size]. `device`: the torch device the training runs on, chosen by the caller: a CUDA device
    pins batches (torch) or runs GPU pipelines on it (DALI). `scanned`: DALI only,
    data.dali.scan_files(split.paths) computed elsewhere (e.g. on rank 0 and broadcast), so this loader
    does not scan the split itself. `augment`: what the training views' augmentations do (data.augment),
    the same on either backend.
    """
    device = torch.device(device)
    if resolve_backend(backend) == "dali":
        from data.dali import DaliLoader   # DALI is optional: imported only when it is the backend
        return DaliLoader(split, kind, image_size=image_size, global_batch=global_batch, rank=rank, world=world,
                          seed=seed, shuffle=shuffle, drop_last=drop_last, workers=workers,
                          on_bad_image=on_bad_image, scales=scales, device=device, scanned=scanned, augment=augment)
    views = views_of(kind, image_size, scales)
    sampler = split_sampler(split, global_batch, rank=rank, world=world, seed=seed, shuffle=shuffle,
                            drop_last=drop_last)
    dataset = ImageDataset(split, transforms.multi_view(views, augment), seed=seed, on_bad_image=on_bad_image)
    return Loader(dataset, sampler, views, workers, pin_memory=device.type == "cuda")
