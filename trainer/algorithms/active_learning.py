"""Active-learning query selection: the candidate pool (unlabeled images not labeled yet), the number of
queries a budget buys, the candidates' unit SSL embeddings and the model's top-2 (streamed to files),
and the queries: spherical k-means clusters of the embeddings, the smallest margins p1 - p2 of each.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import Split, read_split, without
from trainer.algorithms import cluster
from trainer.runtime.config import ConfigError
from trainer.dist import Runtime
from trainer.runtime.predict import stream_rows


def candidates(root: str, labeled_split: str) -> tuple[Split, Split, int]:
    """(unlabeled images not in `labeled_split`, that labeled split, the size of the pool the budget counts)."""
    unlabeled = read_split(root, "unlabeled")
    labeled = read_split(root, labeled_split)
    if labeled.labels is None:
        raise ConfigError(f"active.labeled={labeled_split!r}: expected a split with a label column")
    pool = dataclasses.replace(without(unlabeled, labeled.paths), name="candidates")
    return pool, labeled, len(set(labeled.paths) | set(unlabeled.paths))


def budget(active) -> tuple[str, int | float]:
    """(the key that gives the budget, its value) from a config's active section: a number of queries
    (active.budget) or a fraction of the labeled + unlabeled images (active.budget_fraction)."""
    return ("active.budget_fraction", active.budget_fraction) if active.budget_fraction else \
        ("active.budget", active.budget)


def query_count(active, pool: int) -> int:
    """The queries the budget buys: active.budget as given; active.budget_fraction of the `pool` labeled +
    unlabeled images, rounded, so that one config suits datasets of any size."""
    key, given = budget(active)
    count = round(given * pool) if key == "active.budget_fraction" else int(given)
    if count < 1:
        raise ConfigError(f"{key}={given}: asks for {count} queries out of a pool of {pool} images")
    return count


def check_counts(clusters: int, queries: int, images: int, budget_key: str = "active.budget"):
    """Each cluster gives at least one query, and each query is an image of its own."""
    if not 1 <= clusters <= queries <= images:
        raise ConfigError(f"active.clusters={clusters}, {budget_key} -> {queries} queries: expected "
                          f"1 <= clusters <= queries <= the {images} candidate images")


@torch.no_grad()
def embed_and_classify(ssl, model, loader, rt: Runtime, out_dir: str, num_rows: int, precision: str):
    """out_dir/{embeddings,top2,guess}.npy: unit SSL embeddings, the model's top-2 probabilities and
    their classes (its guess, then the runner-up, which the annotation page offers first) per row, streamed;
    rank 0 gets the mask of rows covered (an undecodable image's is not)."""
    ssl.eval()
    model.eval()

    def embedding_top2_guess(views):
        probs, classes = torch.softmax(model(views[0]).float(), 1).topk(2, dim=1)
        return torch.cat([F.normalize(ssl(views[0]).float(), dim=1), probs, classes.float()], 1)

    columns = [(os.path.join(out_dir, "embeddings.npy"), ssl.out_dim, np.float32),
               (os.path.join(out_dir, "top2.npy"), 2, np.float32), (os.path.join(out_dir, "guess.npy"), 2, np.int64)]
    return stream_rows(embedding_top2_guess, loader, rt, columns, num_rows, precision)


def read_embedded(out_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What embed_and_classify streamed to out_dir: (embeddings, memory-mapped; top-2 probabilities; their
    classes, N x 2: the guess, the runner-up)."""
    embeddings = np.load(os.path.join(out_dir, "embeddings.npy"), mmap_mode="r")
    return embeddings, np.load(os.path.join(out_dir, "top2.npy")), np.load(os.path.join(out_dir, "guess.npy"))


def select_queries(embeddings, top2, covered, count: int, clusters: int, *, niter: int, seed: int,
                   max_points_per_centroid: int | None, gpu: int | None = None):
    """(chosen rows ordered by margin, their margins, every row's cluster (-1: uncovered), k-means seconds)."""
    rows = np.flatnonzero(covered)
    check_counts(clusters, count, len(rows))
    x = embeddings if len(rows) == len(covered) else embeddings[rows]
    t0 = time.time()
    kmeans = cluster.spherical_kmeans(x, clusters, niter=niter, seed=seed,
                                      max_points_per_centroid=max_points_per_centroid, gpu=gpu)
    seconds = time.time() - t0
    chosen = cluster.margin_query(top2[rows], kmeans.assignment, count, clusters)
    assignment = np.full(len(covered), -1, np.int64)
    assignment[rows] = kmeans.assignment
    return rows[chosen], cluster.margins(top2[rows[chosen]]), assignment, seconds
