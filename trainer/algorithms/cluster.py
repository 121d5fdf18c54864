"""Spherical k-means over embeddings (faiss) and cluster-balanced margin sampling for active learning."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trainer.algorithms.knn import as_numpy, check_gpu, cosine_search, import_faiss, unit_rows
from data.errors import InputError

_ROW_BLOCK = 65536  # rows per block when taking the top-2 probabilities: bounds the temporaries
SEED_SAMPLE_PER_CENTROID = 64  # greedy k-means++ seeds from a random sample of 64·k rows
EXACT_BLOCK = 1 << 22  # float64 products at a time when assign compares a near tie over every centroid


class KMeansResult(NamedTuple):
    centroids: np.ndarray   # (k, d) float32 unit rows
    assignment: np.ndarray  # (n,) int64 index of each point's most cosine-similar centroid
    objective: float        # mean cosine similarity of the points to their assigned centroids


def spherical_kmeans(x, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int | None = 256,
                     gpu: int | None = None) -> KMeansResult:
    """Spherical k-means (faiss.Kmeans(spherical=True)) of the rows of x, then every row's assignment.

    x is L2-normalised here (a normalised copy unless its rows are unit already): faiss's spherical
    mode only renormalises the centroids and assumes unit inputs. Trains on the rows faiss would
    subsample, k * max_points_per_centroid of them when x has more (training_rows); None trains on all
    rows. The assignment (`assign`) and objective always cover every row. Seeded by greedy_kmeanspp,
    which always runs on the CPU. The pieces (training_rows, greedy_seeds, fit_centroids, assign) let
    trainer.algorithms.active_learning fit on a sample and assign rows it never holds all at once.
    The Lloyd iterations and the assignment run on GPU `gpu` (None: the CPU;
    trainer.algorithms.knn.faiss_gpu maps a run's device to it): faiss.Kmeans(gpu=True) would quietly run on the
    CPU without one, so it is checked here. faiss.Kmeans trains on its first GPU(s) whatever `gpu` says;
    rank 0, whose GPU is normally the first, runs it.
    """
    x = unit_rows(x, "x")
    check_fit(len(x), k, niter, max_points_per_centroid)
    check_gpu(gpu)
    seeds = greedy_kmeanspp(x, k, np.random.default_rng(seed))
    rows = training_rows(len(x), k, max_points_per_centroid, seed)
    centroids = fit_centroids(x if rows is None else x[rows], seeds, niter=niter, seed=seed, gpu=gpu)
    assignment, similarity = assign(x, centroids, gpu=gpu)
    return KMeansResult(centroids, assignment, float(similarity.mean(dtype=np.float64)))


def check_fit(n: int, k: int, niter: int, max_points_per_centroid: int | None):
    if not 1 <= k <= n:
        raise InputError(f"k={k} clusters for {n} points: need 1 <= k <= {n}")
    if niter < 1:
        raise InputError(f"niter must be >= 1, got {niter}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise InputError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")


FAISS_SAMPLE_ROWS = 2**31 - 1   # faiss draws its training sample with 32-bit row numbers


def training_rows(n: int, k: int, max_points_per_centroid: int | None, seed: int) -> np.ndarray | None:
    """The rows of n that faiss.Kmeans(seed=seed) trains k centroids on, in its order: with more than
    k * max_points_per_centroid rows, the first k * max_points_per_centroid of its random permutation of
    the rows; None: every row, in order (max_points_per_centroid None, or no more rows than that)."""
    if max_points_per_centroid is None or n <= k * max_points_per_centroid:
        return None
    if n > FAISS_SAMPLE_ROWS:
        raise InputError(f"{n} points: faiss draws k-means' training sample from at most {FAISS_SAMPLE_ROWS}")
    return faiss_permutation_start(n, k * max_points_per_centroid, seed)


def faiss_permutation_start(n: int, size: int, seed: int) -> np.ndarray:
    """The first `size` (< n) entries of faiss.rand_perm(n, seed), with which faiss.Kmeans subsamples, in
    O(size) memory rather than faiss's O(n): rand_perm is a forward Fisher-Yates shuffle whose step i swaps
    entry i with entry i + mt() % (n - i), mt being std::mt19937 seeded with `seed`, whose raw outputs
    numpy's legacy RandomState gives; entry i is final after step i, so the first `size` steps, with the
    few entries they moved in a dict, give them (tests/test_active_shards.py holds it to faiss's own)."""
    draws = np.random.RandomState(seed).randint(0, 2**32, size=size, dtype=np.uint32).astype(np.int64)
    steps = np.arange(size, dtype=np.int64)
    moved: dict[int, int] = {}   # entry -> the row a swap left there (entries not in it hold their own row)
    start = []
    for entry, other in zip(steps.tolist(), (steps + draws % (n - steps)).tolist()):
        start.append(moved.get(other, other))
        moved[other] = moved.get(entry, entry)
    return np.array(start, np.int64)


def fit_centroids(train: np.ndarray, seeds: np.ndarray, *, niter: int, seed: int, gpu: int | None = None):
    """Lloyd's iterations of spherical k-means (faiss.Kmeans(spherical=True)) on every one of the unit rows
    `train`, from `seeds` (k, d): the (k, d) float32 unit centroids."""
    k, d = seeds.shape
    gpus = 1 if gpu is not None else False   # faiss.Kmeans takes a number of GPUs, False for the CPU
    kmeans = import_faiss().Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpus,
                                   max_points_per_centroid=-(-len(train) // k))   # never subsamples
    kmeans.train(train, init_centroids=seeds)
    return unit_rows(kmeans.centroids, "centroids")


def assign(x: np.ndarray, centroids: np.ndarray, *, gpu: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(each unit row's most cosine-similar centroid, int64; that similarity, float32). The centroid is
    the float64 argmax (lowest id on ties), so a row's cluster is a function of the row alone, whichever
    rows share its search (chunks, ranks, CPU or GPU): faiss's float32 search, whose rounding depends on
    the batch, finds the best two, and rows whose two lie within 4·d·2^-24 (twice the most float32
    rounding can move the gap between two dot products of unit rows, 2·d·2^-24) are compared in float64
    over every centroid."""
    sims, ids = cosine_search(centroids, x, min(2, len(centroids)), gpu=gpu, normalise=False)
    best = ids[:, 0].astype(np.int64)
    if len(centroids) > 1:
        close = np.flatnonzero(sims[:, 0] - sims[:, 1] <= 4 * x.shape[1] * 2.0**-24)
        per_block = max(1, EXACT_BLOCK // centroids.size)
        exact_centroids = centroids.astype(np.float64)
        for start in range(0, len(close), per_block):
            rows = close[start:start + per_block]
            # an elementwise product summed along d: numpy's pairwise sum, the same order for every row
            exact = (x[rows].astype(np.float64)[:, None, :] * exact_centroids[None]).sum(axis=2)
            best[rows] = exact.argmax(axis=1)
    return best, sims[:, 0]


def kmeanspp_sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """The rows (ascending) greedy_kmeanspp seeds k centroids from: a random 64·k of the n."""
    return np.sort(rng.choice(n, size=min(n, SEED_SAMPLE_PER_CENTROID * k), replace=False))


def greedy_kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (k, d) for unit rows x, drawn from a random sample of 64·k of them.

    Each step draws 2 + ln k candidates with probability proportional to their squared distance to the
    seeds so far and keeps the one that lowers the total most. Written here because faiss's k-means++
    (and AFK-MC2) draw one candidate per step: on clustered data they often put two seeds in one
    cluster, a local optimum Lloyd's iterations never leave. Greedy seeding, like scikit-learn's, gives
    a higher mean cosine on such data (docs/results.md, k-means).
    """
    return greedy_seeds(x[kmeanspp_sample(len(x), k, rng)], k, rng)


def greedy_seeds(sample: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """greedy_kmeanspp's seeds from its sample (the unit rows kmeanspp_sample drew with `rng`, in order),
    `rng` going on from that draw."""
    sample_size = len(sample)
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
    _, margin, chosen = smallest_per_cluster(quota, assignment, margin, np.arange(len(margin), dtype=np.int64))
    return chosen[np.lexsort((chosen, margin))]


def smallest_per_cluster(quota: np.ndarray, cluster, margin, row, *payload) -> tuple[np.ndarray, ...]:
    """The quota[c] rows of smallest (margin, row) in each cluster c: cluster, margin, row and every payload
    array (rows of per-row values), cut to them and ordered by (cluster, margin, row)."""
    order = np.lexsort((row, margin, cluster))
    grouped = cluster[order]
    rank_in_cluster = np.arange(len(order)) - np.searchsorted(grouped, np.arange(len(quota)))[grouped]
    kept = order[rank_in_cluster < quota[grouped]]
    return tuple(array[kept] for array in (cluster, margin, row, *payload))


class SmallestMargins:
    """margin_query's choice streamed: rows (cluster, margin, row, *payload) come in chunks, and only the
    quota[c] of smallest (margin, row) so far of each cluster c stay, so memory is O(chunk + quota.sum()).
    The rows may be one rank's, or the candidates several ranks kept (`kept()`): the smallest of a union are
    the smallest of the parts' smallest under one total order, so the result is margin_query's over every
    row, ties included, however the rows were cut."""

    def __init__(self, quota):
        self.quota = np.asarray(quota, np.int64)
        self._kept: tuple[np.ndarray, ...] | None = None   # ordered by (cluster, margin, row)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._num_pending = 0
        # the largest (margin, row) a full cluster keeps: a row past it can never enter; a cluster whose
        # quota is 0 keeps nothing
        self._last_margin = np.where(self.quota > 0, np.inf, -np.inf)
        self._last_row = np.full(len(self.quota), np.iinfo(np.int64).max)

    def add(self, cluster, margin, row, *payload) -> "SmallestMargins":
        last_margin, last_row = self._last_margin[cluster], self._last_row[cluster]
        enters = (margin < last_margin) | ((margin == last_margin) & (row < last_row))
        self._pending.append(tuple(array[enters] for array in (cluster, margin, row, *payload)))
        self._num_pending += int(enters.sum())
        if self._num_pending > max(int(self.quota.sum()), _ROW_BLOCK):
            self._compact()
        return self

    def kept(self) -> tuple[np.ndarray, ...] | None:
        """(cluster, margin, row, *payload) of the rows kept, ordered by (cluster, margin, row); None when
        no row was added."""
        self._compact()
        return self._kept

    def _compact(self):
        if not self._pending:
            return
        parts = ([self._kept] if self._kept is not None else []) + self._pending
        self._kept = smallest_per_cluster(self.quota, *(np.concatenate(column) for column in zip(*parts)))
        self._pending, self._num_pending = [], 0
        counts = np.bincount(self._kept[0], minlength=len(self.quota))
        full = (counts == self.quota) & (counts > 0)
        last = np.cumsum(counts)[full] - 1
        self._last_margin[full], self._last_row[full] = self._kept[1][last], self._kept[2][last]
