"""Spherical k-means over embeddings (faiss) and cluster-balanced margin sampling for active learning."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trainer.algorithms.knn import as_numpy, check_gpu, cosine_search, import_faiss, unit_rows
from data.errors import InputError

_ROW_BLOCK = 65536  # rows per block when taking the top-2 probabilities: bounds the temporaries
SEED_SAMPLE_PER_CENTROID = 64  # greedy k-means++ seeds from a random sample of 64·k rows


class KMeansResult(NamedTuple):
    centroids: np.ndarray   # (k, d) float32 unit rows
    assignment: np.ndarray  # (n,) int64 index of each point's most cosine-similar centroid
    objective: float        # mean cosine similarity of the points to their assigned centroids


def spherical_kmeans(x, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int | None = 256,
                     gpu: int | None = None) -> KMeansResult:
    """Spherical k-means (faiss.Kmeans(spherical=True)) of the rows of x, then every row's assignment.

    x is L2-normalised here (a normalised copy unless its rows are unit already): faiss's spherical
    mode only renormalises the centroids and assumes unit inputs. faiss trains on a random subsample of
    k * max_points_per_centroid rows when x has more (silently); None trains on all rows. The
    assignment and objective always cover every row. Seeded by greedy_kmeanspp, which always runs on
    the CPU. The Lloyd iterations and the assignment run on GPU `gpu` (None: the CPU;
    trainer.algorithms.knn.faiss_gpu maps a run's device to it): faiss.Kmeans(gpu=True) would quietly run on the
    CPU without one, so it is checked here. faiss.Kmeans trains on its first GPU(s) whatever `gpu` says;
    rank 0, whose GPU is normally the first, runs it.
    """
    x = unit_rows(x, "x")
    n, d = x.shape
    if not 1 <= k <= n:
        raise InputError(f"k={k} clusters for {n} points: need 1 <= k <= {n}")
    if niter < 1:
        raise InputError(f"niter must be >= 1, got {niter}")
    if max_points_per_centroid is None:
        max_points_per_centroid = -(-n // k)
    if max_points_per_centroid < 1:
        raise InputError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
    check_gpu(gpu)
    seeds = greedy_kmeanspp(x, k, np.random.default_rng(seed))
    gpus = 1 if gpu is not None else False   # faiss.Kmeans takes a number of GPUs, False for the CPU
    kmeans = import_faiss().Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpus,
                                   max_points_per_centroid=max_points_per_centroid)
    kmeans.train(x, init_centroids=seeds)
    centroids = unit_rows(kmeans.centroids, "centroids")
    sims, ids = cosine_search(centroids, x, 1, gpu=gpu, normalise=False)
    return KMeansResult(centroids, ids[:, 0].astype(np.int64), float(sims.mean(dtype=np.float64)))


def greedy_kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (k, d) for unit rows x, drawn from a random sample of 64·k of them.

    Each step draws 2 + ln k candidates with probability proportional to their squared distance to the
    seeds so far and keeps the one that lowers the total most. Written here because faiss's k-means++
    (and AFK-MC2) draw one candidate per step: on clustered data they often put two seeds in one
    cluster, a local optimum Lloyd's iterations never leave. Greedy seeding, like scikit-learn's, gives
    a higher mean cosine on such data (docs/results.md, k-means).
    """
    sample_size = min(len(x), SEED_SAMPLE_PER_CENTROID * k)
    sample = x[np.sort(rng.choice(len(x), size=sample_size, replace=False))]
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(sample_size))]
    sq_dist = np.maximum(2 - 2 * (sample @ sample[chosen[0]]).astype(np.float64), 0)  # |a - b|^2 of unit rows
    for _ in range(1, k):
        cumulative = np.cumsum(sq_dist)
        if cumulative[-1] > 0:
            draws = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right")
            candidates = np.minimum(draws, sample_size - 1)
        else:  # every row already coincides with a seed
            candidates = rng.integers(sample_size, size=trials)
        candidate_sq = np.maximum(2 - 2 * (sample @ sample[candidates].T).astype(np.float64), 0)
        np.minimum(candidate_sq, sq_dist[:, None], out=candidate_sq)
        best = int(np.argmin(candidate_sq.sum(axis=0)))
        chosen.append(int(candidates[best]))
        sq_dist = candidate_sq[:, best]
    return sample[chosen]


def split_budget(cluster_sizes, budget: int) -> np.ndarray:
    """Samples to take from each cluster: as even as possible (water-filling), never more than it has.

    Every cluster gets min(size, L) for the largest level L that fits the budget, so small clusters
    give what they cannot fill to the others; the few samples left over (fewer than the clusters
    still having samples) go one each to the lowest-numbered clusters that have samples to spare.
    """
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    if not 0 <= budget <= sizes.sum():
        raise InputError(f"budget={budget} must be between 0 and the {sizes.sum()} samples available")
    low, high = 0, int(sizes.max(initial=0))
    while low < high:  # largest level whose capped total fits the budget
        mid = (low + high + 1) // 2
        if np.minimum(sizes, mid).sum() <= budget:
            low = mid
        else:
            high = mid - 1
    quota = np.minimum(sizes, low)
    quota[np.flatnonzero(sizes > low)[:budget - quota.sum()]] += 1
    return quota


def margins(probs) -> np.ndarray:
    """p1 - p2 per row (float64, exact for float32 inputs), from full probabilities (N, C) or top-2 (N, 2)."""
    probs = as_numpy(probs)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise InputError(f"probs must be (samples, >= 2 classes), got shape {probs.shape}")
    out = np.empty(len(probs), np.float64)
    for start in range(0, len(probs), _ROW_BLOCK):
        top2 = np.partition(probs[start:start + _ROW_BLOCK], -2, axis=1)[:, -2:].astype(np.float64)
        out[start:start + _ROW_BLOCK] = top2[:, 1] - top2[:, 0]
    if np.isnan(out).any():
        raise InputError(f"probs row {int(np.flatnonzero(np.isnan(out))[0])} contains NaN")
    return out


def margin_query(probs, assignment, budget: int, num_clusters: int) -> np.ndarray:
    """Indices of the `budget` samples to label: the smallest margins of each cluster, budget split by split_budget.

    Equal margins -> lower index first. Returned ordered by margin, then index (most uncertain first).
    """
    margin = margins(probs)
    assignment = as_numpy(assignment)
    if assignment.shape != margin.shape or not np.issubdtype(assignment.dtype, np.integer):
        raise InputError(f"assignment must be {margin.shape} integer cluster ids, got shape {assignment.shape} "
                         f"dtype {assignment.dtype}")
    bad = (assignment < 0) | (assignment >= num_clusters)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"assignment row {row} is {assignment[row]}, expected a cluster id in [0, {num_clusters})")
    quota = split_budget(np.bincount(assignment, minlength=num_clusters), budget)
    order = np.lexsort((np.arange(len(margin)), margin, assignment))
    cluster = assignment[order]
    rank_in_cluster = np.arange(len(order)) - np.searchsorted(cluster, np.arange(num_clusters))[cluster]
    chosen = order[rank_in_cluster < quota[cluster]]
    return chosen[np.lexsort((chosen, margin[chosen]))].astype(np.int64)
