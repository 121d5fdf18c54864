"""Sharded inference: every rank runs its share of a split through a model."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from trainer.dist import Runtime, barrier, world_size
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


PREDICTION_FILES = ("topk_class.npy", "topk_prob.npy", "embeddings.npy")


@torch.no_grad()
def write_predictions(model, loader, rt: Runtime, out_dir: str, num_rows: int, top_k: int,
                      precision: str = "fp32"):
    """Top-K classes and probabilities plus the backbone embedding of every row, merged by row.

    Each rank streams its shard to rank-<r> files (embeddings straight to disk, so no rank holds
    N x D floats, and nobody holds N x C probabilities); rank 0 then merges them into
    out_dir/{topk_class,topk_prob,embeddings}.npy ordered by row, and removes the shards.
    """
    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    prefix = os.path.join(out_dir, f"rank-{rt.rank}")
    indices, classes, probs = [], [], []
    dim = model.backbone.out_dim
    with open(prefix + ".embeddings.bin", "wb") as emb_file:
        for index, out in outputs(lambda v: _features_and_logits(model, v[0]), loader, rt, precision):
            features, logits = out[:, :dim], out[:, dim:]
            p, c = torch.softmax(logits, 1).topk(top_k, dim=1)
            indices.append(index.numpy())
            classes.append(c.numpy().astype(np.int32))
            probs.append(p.numpy().astype(np.float32))
            emb_file.write(features.numpy().astype(np.float32).tobytes())
    model.train(was_training)
    np.save(prefix + ".index.npy", np.concatenate(indices) if indices else np.zeros(0, np.int64))
    np.save(prefix + ".topk_class.npy", np.concatenate(classes) if classes else np.zeros((0, top_k), np.int32))
    np.save(prefix + ".topk_prob.npy", np.concatenate(probs) if probs else np.zeros((0, top_k), np.float32))
    barrier()
    if rt.is_main:
        _merge(out_dir, world_size(), num_rows, top_k, dim)
    barrier()


def _features_and_logits(model, x):
    features = model.backbone(x)
    # one output tensor for the sharded loop: features then logits, split again by the caller
    return torch.cat([features, model.head(features)], 1)


def _merge(out_dir: str, world: int, num_rows: int, top_k: int, dim: int):
    shards = [os.path.join(out_dir, f"rank-{r}") for r in range(world)]
    merged = {name: np.lib.format.open_memmap(os.path.join(out_dir, name + ".tmp"), "w+", dtype, shape)
              for name, dtype, shape in (("topk_class.npy", np.int32, (num_rows, top_k)),
                                         ("topk_prob.npy", np.float32, (num_rows, top_k)),
                                         ("embeddings.npy", np.float32, (num_rows, dim)))}
    seen = np.zeros(num_rows, bool)
    for shard in shards:
        index = np.load(shard + ".index.npy")
        seen[index] = True
        merged["topk_class.npy"][index] = np.load(shard + ".topk_class.npy")
        merged["topk_prob.npy"][index] = np.load(shard + ".topk_prob.npy")
        embeddings = np.memmap(shard + ".embeddings.bin", np.float32, "r", shape=(len(index), dim))
        for start in range(0, len(index), 65536):   # bounded memory however large the shard
            merged["embeddings.npy"][index[start:start + 65536]] = embeddings[start:start + 65536]
        del embeddings
    if not seen.all():
        raise RuntimeError(f"predictions cover {seen.sum()} of {num_rows} rows")
    for array in merged.values():
        array.flush()
    del merged
    for name in PREDICTION_FILES:
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    for shard in shards:
        for suffix in (".index.npy", ".topk_class.npy", ".topk_prob.npy", ".embeddings.bin"):
            os.remove(shard + suffix)
