"""Active-learning query selection: the candidate pool (unlabeled images not labeled yet), the number of
queries a budget buys, the candidates' unit SSL embeddings and the model's top-2 (each rank's rows streamed
to its own files), and the queries: spherical k-means clusters of the embeddings, the smallest margins
p1 - p2 of each, chosen by every rank over its own rows and merged as candidates on rank 0.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import Split, read_split, without
from data.sampler import eval_block
from trainer import dist
from trainer.algorithms import cluster
from trainer.algorithms.balanced_selection import npy_chunks
from trainer.algorithms.knn import unit_rows
from trainer.runtime.config import ConfigError
from trainer.dist import Runtime
from trainer.runtime.predict import Column, rank_file, stream_rows, write_npy_header


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


EMBEDDINGS, TOP2, GUESS = "embeddings.npy", "top2.npy", "guess.npy"
ASSIGNMENT = "assignment.npy"
CHUNK_ROWS = 8192   # rows each rank reads at a time: 64 MB of 2048-d float32 embeddings


class EmbeddedShard(NamedTuple):
    """One rank's rows of embed_and_classify's files: file row r is candidate first + r. `stand_ins`: the
    file rows (ascending) whose image the loader could not read, which carry another row's outputs and
    are never clustered or queried."""
    folder: str
    rank: int
    first: int
    rows: int
    stand_ins: np.ndarray

    def path(self, name: str) -> str:
        return rank_file(os.path.join(self.folder, name), self.rank)


@torch.no_grad()
def embed_and_classify(ssl, model, loader, rt: Runtime, out_dir: str, num_rows: int, precision: str) -> EmbeddedShard:
    """out_dir/{embeddings,top2,guess}.rank-<r>.npy: unit SSL embeddings, the model's top-2 probabilities and
    their classes (its guess, then the runner-up, which the annotation page offers first) of rank r's block
    of rows (data.sampler.eval_block), streamed to its own files and never merged; returns this rank's."""
    ssl.eval()
    model.eval()

    def embedding_top2_guess(views):
        probs, classes = torch.softmax(model(views[0]).float(), 1).topk(2, dim=1)
        return torch.cat([F.normalize(ssl(views[0]).float(), dim=1), probs, classes.float()], 1)

    columns = [Column(os.path.join(out_dir, name), width, dtype, per_rank=True) for name, width, dtype in
               ((EMBEDDINGS, ssl.out_dim, np.float32), (TOP2, 2, np.float32), (GUESS, 2, np.int64))]
    stand_ins = stream_rows(embedding_top2_guess, loader, rt, columns, num_rows, precision)
    first, end = eval_block(num_rows, rt.rank, rt.world)
    return EmbeddedShard(out_dir, rt.rank, first, end - first, stand_ins)


@dataclasses.dataclass(frozen=True)
class Queries:
    """The chosen candidates, most uncertain first (margin, then row), and what queries.csv says of each."""
    rows: np.ndarray           # (Q,) candidate rows
    margin: np.ndarray         # (Q,) p1 - p2, float64
    cluster: np.ndarray        # (Q,) their clusters
    top2: np.ndarray           # (Q, 2) the model's two largest probabilities
    guesses: np.ndarray        # (Q, 2) their classes: the guess, the runner-up
    cluster_sizes: np.ndarray  # (clusters,) the candidates of each cluster
    uncovered: int             # candidates whose image could not be read, never queried


def select_queries(shard: EmbeddedShard, count: int, clusters: int, *, niter: int, seed: int,
                   max_points_per_centroid: int | None, gpu: int | None = None,
                   chunk: int = CHUNK_ROWS) -> tuple[Queries | None, dict[str, float]]:
    """`count` queries over every rank's shard, each rank calling with its own (its faiss GPU `gpu`, None:
    the CPU): (the Queries on rank 0, None on the others; this rank's seconds).

    What cluster.spherical_kmeans and cluster.margin_query give over every covered row in one process, ties
    included, without any rank holding every row: rank 0 gathers the rows the k-means fit reads (greedy
    seeding's sample and the k * max_points_per_centroid rows faiss would train on: every row when None)
    and fits; then each rank streams its own rows, `chunk` at a time, twice: their clusters
    (cluster.assign, a function of the row alone) to assignment.rank-<r>.npy (-1: a stand-in) and the
    counts per cluster, which give every cluster its share of the budget (cluster.split_budget); then its
    margins, keeping the smallest of each cluster up to that share (cluster.SmallestMargins). Rank 0
    merges those candidates, at most world x count of them, through dist.gathered_on_rank0.
    """
    shares = dist.all_gather_object((shard.rows, shard.rows - len(shard.stand_ins)))
    covered = sum(produced for _, produced in shares)
    offset = sum(produced for _, produced in shares[:shard.rank])   # the covered rows of the ranks before
    check_counts(clusters, count, covered)
    cluster.check_fit(covered, clusters, niter, max_points_per_centroid)
    t0 = time.time()
    rng = np.random.default_rng(seed)
    seeding = cluster.kmeanspp_sample(covered, clusters, rng)
    training = cluster.training_rows(covered, clusters, max_points_per_centroid, seed)
    training = np.arange(covered) if training is None else training
    sample = dist.gathered_on_rank0(lambda: [_own_rows(shard, offset, wanted) for wanted in (seeding, training)])

    def fit():
        seeds = cluster.greedy_seeds(unit_rows(_stitch(part[0] for part in sample)), clusters, rng)
        return cluster.fit_centroids(unit_rows(_stitch(part[1] for part in sample)), seeds, niter=niter,
                                     seed=seed, gpu=gpu)

    centroids = dist.rank0_decides(fit)
    t1 = time.time()
    sizes = dist.gathered_on_rank0(lambda: _assign_own_rows(shard, centroids, gpu, chunk))
    cluster_sizes = None if sizes is None else np.sum(sizes, axis=0)
    quota = dist.rank0_decides(lambda: cluster.split_budget(cluster_sizes, count))
    t2 = time.time()
    candidates = dist.gathered_on_rank0(lambda: _own_candidates(shard, quota, chunk))
    queries = None
    if candidates is not None:
        merged = cluster.SmallestMargins(quota)
        for kept in filter(None, candidates):
            merged.add(*kept)
        chosen, margin, rows, top2, guesses = merged.kept()
        order = np.lexsort((rows, margin))
        queries = Queries(rows[order], margin[order], chosen[order], top2[order], guesses[order], cluster_sizes,
                          sum(size for size, _ in shares) - covered)
    return queries, {"kmeans_seconds": t1 - t0, "assignment_seconds": t2 - t1, "choice_seconds": time.time() - t2}


def _own_rows(shard: EmbeddedShard, offset: int, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `wanted`, embeddings) of the rows of `wanted`, numbers among every rank's covered rows
    in rank order, that this shard holds, its covered rows being offset, offset + 1, ..."""
    positions = np.flatnonzero((wanted >= offset) & (wanted < offset + shard.rows - len(shard.stand_ins)))
    ordinal = wanted[positions] - offset
    # the j-th covered row of the file is row j + the stand-ins before it; stand-in i has stand_ins[i] - i
    # covered rows before it
    file_rows = ordinal + np.searchsorted(shard.stand_ins - np.arange(len(shard.stand_ins)), ordinal, side="right")
    order = np.argsort(file_rows)
    in_file_order = _read_rows(shard.path(EMBEDDINGS), file_rows[order])
    rows = np.empty_like(in_file_order)
    rows[order] = in_file_order
    return positions, rows


def _read_rows(path: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ascending) of a .npy file, each run of consecutive rows read at once: a memory map's pages
    would stay resident, up to the whole file for a sample scattered over it."""
    header = np.load(path, mmap_mode="r")   # its shape, dtype and data offset; it reads no row
    row_size = int(np.prod(header.shape[1:], dtype=np.int64))
    out = np.empty((len(rows),) + header.shape[1:], header.dtype)
    run_starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    with open(path, "rb") as f:
        for start, end in zip(run_starts.tolist(), np.append(run_starts[1:], len(rows)).tolist()):
            f.seek(header.offset + int(rows[start]) * row_size * header.dtype.itemsize)
            out[start:end] = np.fromfile(f, header.dtype, (end - start) * row_size).reshape(out[start:end].shape)
    return out


def _stitch(parts) -> np.ndarray:
    """The rows every rank's _own_rows gave, in the order of the `wanted` they answered."""
    positions, rows = zip(*parts)
    out = np.empty((sum(map(len, positions)), rows[0].shape[1]), rows[0].dtype)
    for where, values in zip(positions, rows):
        out[where] = values
    return out


def _produced(shard: EmbeddedShard, start: int, size: int) -> np.ndarray:
    """Which of file rows start..start + size hold their own image's outputs (are not stand-ins)."""
    produced = np.ones(size, bool)
    produced[shard.stand_ins[(shard.stand_ins >= start) & (shard.stand_ins < start + size)] - start] = False
    return produced


def _assign_own_rows(shard: EmbeddedShard, centroids: np.ndarray, gpu: int | None, chunk: int) -> np.ndarray:
    """Every row's cluster to the shard's assignment file (-1: a stand-in), `chunk` rows at a time; returns
    the rows of each cluster."""
    sizes = np.zeros(len(centroids), np.int64)
    with open(shard.path(ASSIGNMENT), "wb") as out:
        write_npy_header(out, (shard.rows,), np.int64)
        for start, x in zip(range(0, shard.rows, chunk), npy_chunks(shard.path(EMBEDDINGS), chunk)):
            assignment = np.full(len(x), -1, np.int64)
            produced = _produced(shard, start, len(x))
            if produced.any():
                rows = f"{shard.path(EMBEDDINGS)} (rows {start}.. without stand-ins)"
                assignment[produced] = cluster.assign(unit_rows(x[produced], rows), centroids, gpu=gpu)[0]
            sizes += np.bincount(assignment[produced], minlength=len(sizes))
            out.write(assignment.tobytes())
    return sizes


def _own_candidates(shard: EmbeddedShard, quota: np.ndarray, chunk: int):
    """The shard's rows of smallest margin in each cluster, up to its quota (cluster.SmallestMargins.kept)."""
    kept = cluster.SmallestMargins(quota)
    files = (npy_chunks(shard.path(name), chunk) for name in (ASSIGNMENT, TOP2, GUESS))
    for start, (assignment, top2, guesses) in zip(range(0, shard.rows, chunk), zip(*files)):
        mine = np.flatnonzero(assignment >= 0)
        kept.add(assignment[mine], cluster.margins(top2[mine]), shard.first + start + mine, top2[mine], guesses[mine])
    return kept.kept()
