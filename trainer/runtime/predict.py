"""Sharded inference: every rank runs its share of a split through a model."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data import atomic
from data.sampler import eval_block
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


class Column(NamedTuple):
    """One .npy file that stream_rows writes: `width` columns of fn's outputs, stored as `dtype`.
    Merged (per_rank=False): rank 0 joins every rank's rows into `path`, ordered by row. per_rank: never
    merged; each rank's rows stay in rank_file(path, rank), those of its contiguous block of an eval loader
    (data.sampler) in order, one a slot, so a row the loader could not read carries its stand-in's outputs
    there as a merge would give it."""
    path: str
    width: int
    dtype: type
    per_rank: bool = False


def write_npy_header(file, shape: tuple[int, ...], dtype) -> None:
    """Start a .npy in an open binary `file` whose length is known before any row: its rows follow as raw
    bytes, in order, so a file larger than memory is written without a memory map's resident pages."""
    np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": shape})


def rank_file(path: str, rank: int) -> str:
    """topk_class.npy -> topk_class.rank-3.npy: rank 3's own rows of a per-rank Column."""
    stem, extension = os.path.splitext(path)
    return f"{stem}.rank-{rank}{extension}"


@torch.no_grad()
def stream_rows(fn, loader, rt: Runtime, columns, num_rows: int, precision: str = "fp32", stand_ins: bool = False):
    """Run fn over this rank's shard of a split and write its outputs to .npy files.

    fn returns one float tensor per batch whose columns are, in order, those of `columns`: Columns, or
    (path.npy, width, dtype) tuples, merged. Each rank streams its rows to its own files, so no rank holds
    N x D numbers; rank 0 merges the merged columns' rows by row and returns the bool mask of rows the loader
    produced (all of them unless on_bad_image=skip met an undecodable image); the other ranks get None. A
    call without merged columns returns, on every rank, the rows of its own files (ascending) that the loader
    did not produce, which carry their stand-in's outputs. stand_ins=True gives the rows not produced their
    stand-in's outputs before the merged files appear.
    """
    columns = [Column(*column) for column in columns]
    merged = [column for column in columns if not column.per_rank]
    first, end = eval_block(num_rows, rt.rank, rt.world)
    rows = 0
    not_produced = []   # file rows of this rank's block whose slot the loader filled with a stand-in
    with contextlib.ExitStack() as files:
        shards = []
        for column in columns:
            if column.per_rank:
                shards.append(files.enter_context(open(rank_file(column.path, rt.rank), "wb")))
                write_npy_header(shards[-1], (end - first, column.width), column.dtype)
            else:
                shards.append(files.enter_context(open(f"{column.path}.rank-{rt.rank}", "wb")))
        index_out = files.enter_context(open(f"{merged[0].path}.rank-{rt.rank}.index", "wb")) if merged else None
        for index, out in outputs(fn, loader, rt, precision):
            if index_out:
                index_out.write(index.numpy().astype(np.int64).tobytes())
            not_produced.extend((rows + np.flatnonzero(index.numpy() != np.arange(first + rows, first + rows +
                                                                                 len(index)))).tolist())
            rows += len(index)
            start = 0
            for shard, column in zip(shards, columns):
                shard.write(out[:, start:start + column.width].numpy().astype(column.dtype).tobytes())
                start += column.width
    if len(merged) < len(columns) and rows != end - first:
        raise RuntimeError(f"rank {rt.rank}: the eval loader gave {rows} rows of its block {first}..{end}: expected "
                           "contiguous blocks, one row a slot (data.sampler)")
    barrier()
    if not merged:
        return np.array(not_produced, np.int64)
    covered = _merge(merged, world_size(), num_rows, stand_ins) if rt.is_main else None
    barrier()
    return covered


def _merge(columns, world: int, num_rows: int, stand_ins: bool) -> np.ndarray:
    with contextlib.ExitStack() as temporaries:   # every file appears once all are whole
        merged = [np.lib.format.open_memmap(temporaries.enter_context(atomic.replacing(column.path)), "w+",
                                            column.dtype, (num_rows, column.width)) for column in columns]
        covered = np.zeros(num_rows, bool)
        for rank in range(world):
            index_file = f"{columns[0].path}.rank-{rank}.index"
            index = np.fromfile(index_file, np.int64)
            covered[index] = True
            for array, (path, width, dtype, _) in zip(merged, columns):
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


TOP_K_FILES = ("topk_class.npy", "topk_prob.npy")
EMBEDDINGS = "embeddings.npy"
SHARDS = "shards.json"   # written last: the folder's per-rank top-K files are complete


def write_predictions(model, loader, rt: Runtime, out_dir: str, num_rows: int, top_k: int,
                      precision: str = "fp32", embeddings: bool = False):
    """out_dir: the top-K classes and probabilities of every row, each rank's block in its own files,
    never merged (topk_class.rank-<r>.npy, topk_prob.rank-<r>.npy; top_k_share and whole_top_k read them),
    and with `embeddings` the backbone embedding of every row in embeddings.npy, merged by rank 0, as
    L2-normalised float16 rows: their one reader, label propagation, compares them by cosine alone
    (docs/results.md measures what float16 changes). shards.json, written last, lists the ranks' blocks.
    Streamed: nobody holds N x C probabilities."""
    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()

    def classes_probs_features(views):
        features = model.backbone(views[0])
        probs, classes = torch.softmax(model.head(features).float(), 1).topk(top_k, dim=1)
        kept = [classes.float(), probs]   # class ids < 2**24: exact in float32
        if embeddings:   # unit rows fit float16's range whatever the features' scale; a zero row stays zero
            kept.append(F.normalize(features.float(), dim=1))
        return torch.cat(kept, 1)

    class_path, prob_path = (os.path.join(out_dir, name) for name in TOP_K_FILES)
    columns = [Column(class_path, top_k, np.int32, per_rank=True), Column(prob_path, top_k, np.float32, per_rank=True)]
    if embeddings:
        columns.append(Column(os.path.join(out_dir, EMBEDDINGS), model.backbone.out_dim, np.float16))
    stream_rows(classes_probs_features, loader, rt, columns, num_rows, precision, stand_ins=True)
    if rt.is_main:
        record_shards(out_dir, num_rows, top_k, [eval_block(num_rows, r, rt.world) for r in range(rt.world)])
    barrier()
    model.train(was_training)


def record_shards(out_dir: str, num_rows: int, top_k: int, blocks) -> None:
    """shards.json: the (first, end) rows of each rank's top-K files, rank by rank; written once they are whole."""
    atomic.write_json(os.path.join(out_dir, SHARDS), {"rows": num_rows, "top_k": top_k, "blocks": list(blocks)})


class TopKRows(NamedTuple):
    """Rows start..stop of a pair of top-K .npy files (class ids, scores), file row r holding image first_image + r."""
    class_path: str
    prob_path: str
    first_image: int
    start: int
    stop: int


def top_k_share(folder: str, rank: int = 0, world: int = 1) -> list[TopKRows]:
    """Rank `rank`'s share of a folder's top-K rows, for work that every rank does on its own rows: of
    write_predictions' per-rank files, those of ranks rank, rank + world, ... (a resumed run may have
    another world than the run that wrote them); of one whole pair of files (a scorer's,
    trainer.algorithms.label_propagation), the rank's contiguous block. rank 0 of 1: every row."""
    class_path, prob_path = (os.path.join(folder, name) for name in TOP_K_FILES)
    if os.path.exists(os.path.join(folder, SHARDS)):
        with open(os.path.join(folder, SHARDS)) as f:
            blocks = json.load(f)["blocks"]
        return [TopKRows(rank_file(class_path, r), rank_file(prob_path, r), first, 0, end - first)
                for r, (first, end) in enumerate(blocks)][rank::world]
    first, end = eval_block(len(np.load(class_path, mmap_mode="r")), rank, world)
    return [TopKRows(class_path, prob_path, 0, first, end)]


def whole_top_k(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(classes, probabilities), (N, K) each, of every row of a folder in row order, for a reader that holds
    them all anyway (label propagation's mean scorer, the report's figure)."""
    parts = top_k_share(folder)
    return (np.concatenate([np.load(part.class_path)[part.start:part.stop] for part in parts]),
            np.concatenate([np.load(part.prob_path)[part.start:part.stop] for part in parts]))
