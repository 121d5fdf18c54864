"""Sharded inference: every rank runs its share of a split through a model."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trainer.dist import Runtime, world_size
from trainer.engine import autocast


@torch.no_grad()
def outputs(fn, loader, rt: Runtime, precision: str = "fp32"):
    """Yield (row indices, fn(views)) for this rank's batches, fn's outputs as float32 CPU tensors."""
    for batch in loader.epoch(0):
        if len(batch["index"]) == 0:
            continue
        views = [v.to(rt.device, non_blocking=True) for v in batch["views"]]
        with autocast(precision, rt.device):
            out = fn(views)
        yield batch["index"], out.float().cpu()


def embed(backbone, loader, rt: Runtime, num_rows: int, precision: str = "fp32") -> np.ndarray:
    """Backbone features of every row (first view), gathered on every rank, ordered by row.

    Meant for sets that fit in memory (labeled, val); the unlabeled set streams to files instead.
    """
    was_training = backbone.training
    backbone.eval()
    parts = [(i.numpy(), f.numpy()) for i, f in outputs(lambda v: backbone(v[0]), loader, rt, precision)]
    backbone.train(was_training)
    if world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    index = np.concatenate([i for i, _ in parts])
    feats = np.concatenate([f for _, f in parts])
    out = np.zeros((num_rows, feats.shape[1]), np.float32)
    out[index] = feats
    if len(np.unique(index)) != num_rows:
        raise RuntimeError(f"inference covered {len(np.unique(index))} of {num_rows} rows")
    return out


@torch.no_grad()
def accuracy(model, loader, rt: Runtime, precision: str = "fp32") -> dict[str, float]:
    """Top-1 and top-5 of a classifier over a labeled split, counted on every rank and summed."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)   # top-1 hits, top-5 hits, images
    for batch in loader.epoch(0):
        if len(batch["index"]) == 0:
            continue
        with autocast(precision, rt.device):
            logits = model(batch["views"][0].to(rt.device, non_blocking=True))
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hit = top == batch["label"][:, None]
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(hit)], dtype=torch.float64)
    model.train(was_training)
    if world_size() > 1:
        dist.all_reduce(counts)
    return {"top1": (counts[0] / counts[2]).item(), "top5": (counts[1] / counts[2]).item()}
