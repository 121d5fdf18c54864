"""Loader kinds: the views each kind's batches hold, each made by a named augmentation at a size.

KINDS is the one table both loader backends build from: the torch Loader (data.loaders) turns each
view into its torchvision pipeline, data.transforms.AUGMENTATIONS[name], and the DaliLoader
(data.dali) into its DALI graph, the twin of that name. A kind made of existing augmentations is one
row here; a new augmentation also needs its torchvision and its DALI implementation.

Batches, from either backend: {"views": [one float32 (N, 3, size, size) tensor per view, in the order
views_of gives], "label": int64 (N,), -1 where unknown, "index": int64 (N,) rows of the split}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from data.errors import InputError


class View(NamedTuple):
    augmentation: str   # a key of data.transforms.AUGMENTATIONS and of its DALI twin in data.dali
    size: int           # px: the view is size x size


@dataclass(frozen=True)
class Kind:
    augmentations: tuple[str, ...]   # one view of each, at the loader's image size ...
    per_scale: bool = False          # ... or one of each per size in the loader's `scales` (multi-scale eval)


KINDS: dict[str, Kind] = {
    "barlow_twins": Kind(("barlow_twins_blurred", "barlow_twins_solarized")),
    "train": Kind(("train",)),
    "weak": Kind(("weak",)),
    "weak_strong": Kind(("weak", "strong")),
    "eval": Kind(("evaluate",), per_scale=True),
}


def views_of(kind: str, image_size: int, scales: list[int] | None = None) -> list[View]:
    """The views of `kind`'s batches, in order; `scales` (default [image_size]) sizes per-scale kinds only."""
    if kind not in KINDS:
        raise InputError(f"loader kind {kind!r}: expected one of {', '.join(KINDS)}")
    spec = KINDS[kind]
    sizes = (scales or [image_size]) if spec.per_scale else [image_size]
    return [View(augmentation, size) for size in sizes for augmentation in spec.augmentations]


def empty_batch(views: list[View], device: torch.device | str = "cpu") -> dict:
    """A batch of no rows shaped like a full one: what a rank whose eval shard has run out yields, so
    collectives stay in step and consumers need no special case."""
    index = torch.empty(0, dtype=torch.int64)
    return {"views": [torch.empty(0, 3, view.size, view.size, device=device) for view in views],
            "label": index.clone(), "index": index}
