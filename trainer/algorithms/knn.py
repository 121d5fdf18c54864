"""Exact cosine nearest neighbours with faiss, and the weighted kNN classifier built on them.

`gpu` is the GPU faiss searches on, None for the CPU; `faiss_gpu(device)` maps a run's torch device to
it. Both give the same neighbours up to float rounding. Only the CPU path runs on CPU-only machines
(and in the tests). faiss is imported on first use: a run that never searches does not need it.
"""
from __future__ import annotations

import functools

import numpy as np
from data.errors import InputError

_NORM_TOLERANCE = 1e-5  # rows this close to unit length are used as they are (no copy)
_ROW_BLOCK = 65536      # rows per block when normalising: bounds the temporaries


def as_numpy(x) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (any device; gradients detached)."""
    if hasattr(x, "detach"):  # duck-typed so this module does not need torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def unit_rows(x, name: str = "x", first_row: int = 0) -> np.ndarray:
    """Rows of x as float32, C-contiguous and L2-normalised (faiss's inner product is cosine only then).

    x is returned without a copy when it already qualifies; otherwise a normalised copy, built block
    by block. A zero or non-finite row raises ValueError naming it, numbered from first_row (x a block of
    a larger array).
    """
    x = np.ascontiguousarray(as_numpy(x), dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise InputError(f"{name} must be 2-D (rows, dim), got shape {x.shape}")
    norms = np.empty(len(x), np.float32)
    for start in range(0, len(x), _ROW_BLOCK):
        block = x[start:start + _ROW_BLOCK]
        norms[start:start + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", block, block))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name} row {first_row + row} has norm {norms[row]}: cosine similarity needs finite "
                         "non-zero rows")
    if np.all(np.abs(norms - 1) <= _NORM_TOLERANCE):
        return x
    out = np.empty_like(x)
    for start in range(0, len(x), _ROW_BLOCK):
        np.divide(x[start:start + _ROW_BLOCK], norms[start:start + _ROW_BLOCK, None],
                  out=out[start:start + _ROW_BLOCK])
    return out


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise InputError(f"faiss does not import ({e}): pip install faiss-cpu, or faiss-gpu on GPU nodes") from None
    return faiss


def faiss_gpu(device) -> int | None:
    """The GPU faiss should use for a run on torch `device`: its index on a CUDA run when the faiss
    build sees GPUs (faiss-gpu imports fine without one), else None (the CPU)."""
    if getattr(device, "type", "cpu") != "cuda" or import_faiss().get_num_gpus() == 0:
        return None
    return device.index or 0


def check_gpu(gpu: int | None):
    if gpu is not None and import_faiss().get_num_gpus() <= gpu:
        raise InputError(f"faiss GPU {gpu} requested but faiss sees {import_faiss().get_num_gpus()} GPU(s)")


@functools.lru_cache(maxsize=None)
def _gpu_resources(gpu: int):
    return import_faiss().StandardGpuResources()  # one per process and GPU: it reserves GPU scratch memory


def inner_product_index(d: int, gpu: int | None = None):
    """An exact inner-product index: GpuIndexFlatIP on GPU `gpu`, IndexFlatIP on the CPU (None)."""
    faiss = import_faiss()
    if gpu is None:
        return faiss.IndexFlatIP(d)
    check_gpu(gpu)
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu   # the default, GPU 0, would put every rank's index on the first GPU
    return faiss.GpuIndexFlatIP(_gpu_resources(gpu), d, config)


def cosine_search(base, queries, k: int, *, gpu: int | None = None,
                  normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For every query, the k most cosine-similar base rows: (similarities (M, k) float32, ids (M, k) int64).

    With normalise=False, base and queries must already be unit rows (skips the check).
    """
    if normalise:
        base, queries = unit_rows(base, "base"), unit_rows(queries, "queries")
    if base.shape[1] != queries.shape[1]:
        raise InputError(f"queries have dimension {queries.shape[1]}, base has {base.shape[1]}")
    if not 1 <= k <= len(base):
        raise InputError(f"k={k} neighbours requested from {len(base)} base rows: need 1 <= k <= {len(base)}")
    index = inner_product_index(base.shape[1], gpu)
    index.add(base)
    return index.search(queries, k)


def knn_classify(train_emb, train_labels, query_emb, num_classes: int, k: int = 20, temperature: float = 0.07,
                 *, gpu: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted kNN vote: each of a query's k nearest training rows (cosine) votes exp(sim / T) for its label.

    Returns (pred (M,) int64, probs (M, C) float32): the votes normalised to sum to 1 per query, and
    their argmax (ties -> the lower class id).
    """
    labels = as_numpy(train_labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"train_labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(labels) != len(as_numpy(train_emb)):
        raise InputError(f"{len(labels)} train_labels for {len(as_numpy(train_emb))} train_emb rows")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"train_labels row {row} is {labels[row]}, expected a class id in [0, {num_classes})")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    sims, ids = cosine_search(train_emb, query_emb, k, gpu=gpu)
    # exp(sim/T) scaled by exp(-best sim/T) per query (cancels when normalised): no overflow, best weight 1
    weights = np.exp((sims - sims[:, :1]) / temperature)
    votes = np.zeros((len(sims), num_classes), np.float32)
    np.add.at(votes, (np.arange(len(sims))[:, None], labels[ids]), weights)
    probs = votes / votes.sum(axis=1, keepdims=True)
    return probs.argmax(axis=1).astype(np.int64), probs


def knn_accuracy(train_emb, train_labels, query_emb, query_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, *, gpu: int | None = None) -> float:
    """Top-1 accuracy of knn_classify on labelled queries."""
    pred, _ = knn_classify(train_emb, train_labels, query_emb, num_classes, k, temperature, gpu=gpu)
    query_labels = as_numpy(query_labels)
    if query_labels.shape != pred.shape:
        raise InputError(f"query_labels has shape {query_labels.shape}, expected {pred.shape}")
    return float((pred == query_labels).mean())
