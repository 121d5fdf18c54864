"""Sharded inference: every rank runs its share of a split through a model."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from data import atomic
from trainer.runtime.amp import autocast
from trainer.dist import Runtime, all_reduce_, barrier, gather_object, world_size

log = logging.getLogger(__name__)


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


def embed(backbone, loader, rt: Runtime, num_rows: int, precision: str = "fp32") -> np.ndarray | None:
    """Backbone features of every row (first view), ordered by row, on rank 0; None on the other ranks,
    which only compute their share (rank 0 alone searches them).

    Meant for sets that fit in memory (labeled, val); the unlabeled set streams to files instead.
    """
    was_training = backbone.training
    backbone.eval()
    parts = [(i.numpy(), f.numpy()) for i, f in outputs(lambda v: backbone(v[0]), loader, rt, precision)]
    backbone.train(was_training)
    gathered = gather_object(parts)
    if gathered is None:
        return None
    parts = [p for rank_parts in gathered for p in rank_parts]
    index = np.concatenate([i for i, _ in parts])
    feats = np.concatenate([f for _, f in parts])
    out = np.zeros((num_rows, feats.shape[1]), np.float32)
    out[index] = feats
    covered = np.zeros(num_rows, bool)
    covered[index] = True
    fill_from_stand_ins(covered, out)
    return out


def fill_from_stand_ins(covered: np.ndarray, *arrays) -> int:
    """Give each row the loader never produced the outputs of its stand-in; returns how many rows.

    Only on_bad_image=skip leaves rows uncovered: an undecodable image's row is replaced by the next
    decodable row (wrapping) in every loader, so its outputs here are that row's, as in training.
    """
    missing = np.flatnonzero(~covered)
    if len(missing) == 0:
        return 0
    present = np.flatnonzero(covered)
    if len(present) == 0:
        raise RuntimeError(f"inference produced none of the {len(covered)} rows")
    source = present[np.searchsorted(present, missing) % len(present)]
    for array in arrays:
        array[missing] = array[source]
    log.warning("%d of %d rows had no decodable image: they carry the outputs of the next decodable row",
                len(missing), len(covered))
    return len(missing)


@torch.no_grad()
def accuracy(model, loader, rt: Runtime, precision: str = "fp32") -> dict[str, float]:
    """Top-1 and top-5 of a classifier over a labeled split, counted on every rank and summed."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=rt.device)   # top-1 hits, top-5 hits, images
    for batch in loader.epoch(0):
        if len(batch["index"]) == 0:
            continue
        with autocast(precision, rt.device):
            logits = model(batch["views"][0].to(rt.device, non_blocking=True))
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == batch["label"].to(rt.device, non_blocking=True)[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(hit), device=rt.device)])
    model.train(was_training)
    all_reduce_(counts)
    return {"top1": (counts[0] / counts[2]).item(), "top5": (counts[1] / counts[2]).item()}


MERGE_ROWS = 65536   # rows copied at a time when merging the ranks' shards: bounded memory


@torch.no_grad()
def stream_rows(fn, loader, rt: Runtime, columns, num_rows: int, precision: str = "fp32", stand_ins: bool = False):
    """Run fn over this rank's shard of a split and write its outputs to .npy files ordered by row.

    fn returns one float tensor per batch whose columns are, in order, those of `columns`:
    [(path.npy, width, dtype), ...]. Each rank streams its rows to <path>.rank-<r> files, so no rank
    holds N x D numbers; rank 0 merges them by row and returns the bool mask of rows the loader
    produced (all of them unless on_bad_image=skip met an undecodable image); other ranks get None.
    stand_ins=True gives the rows not produced their stand-in's outputs before the files appear.
    """
    index_file = f"{columns[0][0]}.rank-{rt.rank}.index"
    shards = [open(f"{path}.rank-{rt.rank}", "wb") for path, _, _ in columns]
    with open(index_file, "wb") as index_out:
        for index, out in outputs(fn, loader, rt, precision):
            index_out.write(index.numpy().astype(np.int64).tobytes())
            start = 0
            for shard, (_, width, dtype) in zip(shards, columns):
                shard.write(out[:, start:start + width].numpy().astype(dtype).tobytes())
                start += width
    for shard in shards:
        shard.close()
    barrier()
    covered = _merge(columns, world_size(), num_rows, stand_ins) if rt.is_main else None
    barrier()
    return covered


def _merge(columns, world: int, num_rows: int, stand_ins: bool) -> np.ndarray:
    with contextlib.ExitStack() as temporaries:   # every file appears once all are whole
        merged = [np.lib.format.open_memmap(temporaries.enter_context(atomic.replacing(path)), "w+", dtype,
                                            (num_rows, width)) for path, width, dtype in columns]
        covered = np.zeros(num_rows, bool)
        for rank in range(world):
            index_file = f"{columns[0][0]}.rank-{rank}.index"
            index = np.fromfile(index_file, np.int64)
            covered[index] = True
            for array, (path, width, dtype) in zip(merged, columns):
                shard = np.memmap(f"{path}.rank-{rank}", dtype, "r", shape=(len(index), width)) if len(index) else []
                for start in range(0, len(index), MERGE_ROWS):
                    array[index[start:start + MERGE_ROWS]] = shard[start:start + MERGE_ROWS]
                del shard
                os.remove(f"{path}.rank-{rank}")
            os.remove(index_file)
        if stand_ins:
            fill_from_stand_ins(covered, *merged)
        for array in merged:
            array.flush()
        del merged
    return covered


PREDICTION_FILES = ("topk_class.npy", "topk_prob.npy", "embeddings.npy")


def write_predictions(model, loader, rt: Runtime, out_dir: str, num_rows: int, top_k: int,
                      precision: str = "fp32"):
    """out_dir/{topk_class,topk_prob,embeddings}.npy: top-K classes and probabilities plus the
    backbone embedding of every row, ordered by row, streamed (nobody holds N x C probabilities)."""
    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()

    def classes_probs_features(views):
        features = model.backbone(views[0])
        probs, classes = torch.softmax(model.head(features).float(), 1).topk(top_k, dim=1)
        return torch.cat([classes.float(), probs, features.float()], 1)   # class ids < 2**24: exact in float32

    paths = [os.path.join(out_dir, name) for name in PREDICTION_FILES]
    columns = list(zip(paths, (top_k, top_k, model.backbone.out_dim), (np.int32, np.float32, np.float32)))
    stream_rows(classes_probs_features, loader, rt, columns, num_rows, precision, stand_ins=True)
    model.train(was_training)
