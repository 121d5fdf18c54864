"""Spherical k-means + assignment: faiss (subsampled training, and on all points) vs scikit-learn KMeans.

Data: unit vectors scattered around random centres. scikit-learn runs Euclidean k-means (k-means++
seeding, Lloyd) on the same unit vectors; both are scored by the mean cosine similarity of the points
to their (normalised) assigned centroid.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from trainer.algorithms.cluster import spherical_kmeans

FULL = dict(n=512_000, d=2048, k=200)
QUICK = dict(n=20_000, d=128, k=50)
NITER = 20
ROW_BLOCK = 16384  # rows generated / scored at a time: the data itself is the only big allocation


def clustered_unit_vectors(n: int, d: int, num_centres: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit rows around random centres (cosine to their centre about 0.8), built in place."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, ROW_BLOCK):
        block = x[start:start + ROW_BLOCK]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= 0.75 / np.sqrt(d)
        block += centres[rng.integers(0, num_centres, size=len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def mean_cosine_to_centroid(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    total = 0.0
    for start in range(0, len(x), ROW_BLOCK):
        block = x[start:start + ROW_BLOCK]
        total += float(np.einsum("ij,ij->i", block, unit[labels[start:start + ROW_BLOCK]]).sum(dtype=np.float64))
    return total / len(x)


def run(args) -> dict:
    size = QUICK if args.quick else FULL
    n, d, k = size["n"], size["d"], size["k"]
    x = clustered_unit_vectors(n, d, k)
    figures = {"points": float(n), "dim": float(d), "clusters": float(k), "niter": float(NITER)}

    runs = {"faiss": 256, "faiss_all_points": None}
    for name, max_points in runs.items():
        start = time.perf_counter()
        result = spherical_kmeans(x, k, niter=NITER, max_points_per_centroid=max_points)
        figures[f"{name}_s"] = time.perf_counter() - start
        figures[f"{name}_objective"] = result.objective
        del result
        print(f"kmeans bench: {name} {figures[f'{name}_s']:.1f} s, objective {figures[f'{name}_objective']:.4f}",
              file=sys.stderr, flush=True)  # the scikit-learn run that follows can take long
    figures["target_faiss_30s_met"] = float(figures["faiss_s"] <= 30)

    try:
        from sklearn.cluster import KMeans
    except ImportError as error:
        figures["sklearn"] = f"skipped: scikit-learn does not import ({error}); it comes with the [dev] extra"
        return figures
    start = time.perf_counter()
    # copy_x=False: centre the data in place (and restore it) instead of copying it
    kmeans = KMeans(n_clusters=k, n_init=1, max_iter=NITER, random_state=0, copy_x=False).fit(x)
    figures["sklearn_s"] = time.perf_counter() - start
    figures["sklearn_objective"] = mean_cosine_to_centroid(x, kmeans.cluster_centers_, kmeans.labels_)
    for name in runs:
        speedup = figures["sklearn_s"] / figures[f"{name}_s"]
        gap = (figures["sklearn_objective"] - figures[f"{name}_objective"]) / figures["sklearn_objective"]
        figures[f"{name}_speedup"] = speedup
        figures[f"{name}_objective_rel_gap"] = gap
        figures[f"target_{name}_10x_met"] = float(speedup >= 10)
        figures[f"target_{name}_objective_1pct_met"] = float(gap <= 0.01)
    return figures
