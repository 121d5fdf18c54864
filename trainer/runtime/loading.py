"""A stage's loaders from its config: the one place that turns `data.*` and the runtime into a loader.

With DALI, rank 0 alone scans the split for files DALI cannot read (a PIL decode of every image on the
first run, an os.stat of every file after) and hands the result to the other ranks: on a shared
filesystem eight ranks per node scanning 512k files would cost minutes at every loader.
"""
from __future__ import annotations

import dataclasses
import os

from data.datasets import Split
from data.loaders import build_loader, resolve_backend
from data.transforms import Augment
from trainer import dist
from trainer.dist import Runtime


def scan_for_dali(split: Split, workers: int) -> dict:
    from data.dali import scan_files   # DALI is optional: imported only when it is the backend
    found = dist.rank0_decides(lambda: scan_files(split.paths, workers))
    # converted copies live in rank 0's cache folder: a node that does not share it converts its own
    if any("converted" in entry and not os.path.exists(entry["converted"]) for entry in found.values()):
        found = scan_files(split.paths, workers)
    return found


def data_backend(cfg) -> str:
    """data.backend resolved on rank 0, on every rank: with `auto`, a rank whose DALI does not import would
    otherwise take the torch path alone and skip the scan's broadcast the others wait in; with rank 0's
    choice, such a rank stops with the one line that says DALI does not import."""
    return resolve_backend(dist.rank0_decides(lambda: resolve_backend(cfg.data.backend)))


def augment_of(cfg) -> Augment:
    """data.augment (trainer.runtime.config.AugmentConfig) as the loaders take it."""
    return Augment(**dataclasses.asdict(cfg.data.augment))


def loader(split: Split, kind: str, cfg, rt: Runtime, *, global_batch: int, seed: int | None = None,
           shuffle: bool = True, drop_last: bool = True, scales: list[int] | None = None):
    """This rank's loader of `split` for augmentation `kind`; eval loaders pass shuffle/drop_last False."""
    backend = data_backend(cfg)
    scanned = scan_for_dali(split, cfg.data.workers) if backend == "dali" else None
    return build_loader(split, kind, image_size=cfg.data.image_size, global_batch=global_batch, rank=rt.rank,
                        world=rt.world, seed=cfg.run.seed if seed is None else seed, shuffle=shuffle,
                        drop_last=drop_last, workers=cfg.data.workers, backend=backend,
                        on_bad_image=cfg.data.on_bad_image, scales=scales, device=rt.device, scanned=scanned,
                        augment=augment_of(cfg))


def eval_loader(split: Split, cfg, rt: Runtime, global_batch: int, scales: list[int] | None = None):
    """Every row once, in order, sharded in contiguous blocks over the ranks."""
    return loader(split, "eval", cfg, rt, global_batch=global_batch, shuffle=False, drop_last=False, scales=scales)
