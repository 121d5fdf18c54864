"""Active learning without the merge: k-means fitted on rank 0 from the rows faiss would sample, every rank
assigning and ranking its own rows a chunk at a time, rank 0 merging the candidates. The queries are those
of today's one-process path (faiss.Kmeans subsampling on its own, faiss's assignment, margin_query),
computed here from faiss directly, whatever the ranks and the chunks, ties included."""
import os

import faiss
import numpy as np
import pytest

from multiproc import run_ranks
from data.sampler import eval_block
from trainer.algorithms import cluster
from trainer.algorithms.active_learning import ASSIGNMENT, EMBEDDINGS, GUESS, TOP2, EmbeddedShard, select_queries
from trainer.algorithms.knn import cosine_search, unit_rows
from trainer.runtime.predict import rank_file

NITER, SEED = 10, 3


def clustered(n: int, d: int, centres: int, seed: int = 0) -> np.ndarray:
    """float32 unit rows scattered around random centres, as F.normalize leaves embeddings."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, d))
    x = middle[rng.integers(centres, size=n)] / np.sqrt(d) + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tied_top2(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(top-2 probabilities, their classes): exact margins of three levels only, so that most clusters' last
    place is a tie, across the ranks' blocks too."""
    rng = np.random.default_rng(seed)
    first = rng.choice([0.5, 0.625, 0.75], size=n)
    top2 = np.stack([first, first - rng.choice([0.0, 0.125, 0.25], size=n)], 1).astype(np.float32)
    guesses = np.stack([rng.permutation(10)[:2] for _ in range(n)]).astype(np.int64)
    return top2, guesses


def write_shards(folder, x, top2, guesses, stand_ins, world: int) -> None:
    """embed_and_classify's files as `world` ranks leave them; a stand-in row carries the next row's outputs,
    as the loader gives it."""
    source = np.arange(len(x))
    for row in sorted(stand_ins, reverse=True):
        source[row] = source[(row + 1) % len(x)]
    for rank in range(world):
        first, end = eval_block(len(x), rank, world)
        for name, array in ((EMBEDDINGS, x), (TOP2, top2), (GUESS, guesses)):
            np.save(rank_file(os.path.join(folder, name), rank), array[source[first:end]])


def own_shard(folder, rows: int, stand_ins, rank: int = 0, world: int = 1) -> EmbeddedShard:
    first, end = eval_block(rows, rank, world)
    own = [row - first for row in stand_ins if first <= row < end]
    return EmbeddedShard(str(folder), rank, first, end - first, np.array(own, np.int64))


def whole_assignment(folder, world: int) -> np.ndarray:
    return np.concatenate([np.load(rank_file(os.path.join(folder, ASSIGNMENT), rank)) for rank in range(world)])


def today(x, top2, stand_ins, count: int, k: int, max_points_per_centroid):
    """The one-process path before the shards, from faiss itself: (chosen rows, most uncertain first; every
    row's cluster, -1 for a stand-in)."""
    rows = np.setdiff1d(np.arange(len(x)), stand_ins)
    covered = unit_rows(x[rows])
    seeds = cluster.greedy_kmeanspp(covered, k, np.random.default_rng(SEED))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=SEED, spherical=True,
                          max_points_per_centroid=max_points_per_centroid or -(-len(rows) // k))
    kmeans.train(covered, init_centroids=seeds)   # faiss subsamples by itself
    _, ids = cosine_search(unit_rows(kmeans.centroids), covered, 1, normalise=False)
    assignment = np.full(len(x), -1, np.int64)
    assignment[rows] = ids[:, 0]
    margin = top2[:, 0].astype(np.float64) - top2[:, 1]
    quota = cluster.split_budget(np.bincount(ids[:, 0], minlength=k), count)
    chosen = []
    for c in range(k):
        members = sorted(np.flatnonzero(assignment == c), key=lambda row: (margin[row], row))
        chosen += members[:quota[c]]
    return np.array(sorted(chosen, key=lambda row: (margin[row], row))), assignment


def _select(rank, folder, rows, stand_ins, count, k, runs):
    """select_queries on this rank's shard once per (max_points_per_centroid, chunk) of `runs`."""
    from trainer.dist import init
    rt = init("cpu")
    out = []
    for max_points_per_centroid, chunk in runs:
        queries, _ = select_queries(own_shard(folder, rows, stand_ins, rt.rank, rt.world), count, k, niter=NITER,
                                    seed=SEED, max_points_per_centroid=max_points_per_centroid, chunk=chunk)
        out.append(whole_assignment(folder, rt.world) if queries is None else
                   [queries.rows, queries.margin, queries.cluster, queries.top2, queries.guesses,
                    queries.cluster_sizes, np.array([queries.uncovered])])
    return out


def check(result, x, top2, guesses, stand_ins, count, k, max_points_per_centroid):
    rows, margin, clusters, chosen_top2, chosen_guesses, sizes, uncovered = (np.asarray(a) for a in result)
    expected, assignment = today(x, top2, stand_ins, count, k, max_points_per_centroid)
    np.testing.assert_array_equal(rows, expected)
    assert not set(rows.tolist()) & set(stand_ins)
    np.testing.assert_array_equal(margin, top2[rows, 0].astype(np.float64) - top2[rows, 1])
    np.testing.assert_array_equal(clusters, assignment[rows])
    np.testing.assert_array_equal(chosen_top2, top2[rows])
    np.testing.assert_array_equal(chosen_guesses, guesses[rows])
    np.testing.assert_array_equal(sizes, np.bincount(assignment[assignment >= 0], minlength=k))
    assert uncovered.tolist() == [len(stand_ins)]
    return assignment


ROWS, D, K, COUNT = 60, 8, 4, 13
STAND_INS = [3, 31, 32, 59]   # rank 0's row 3, rank 1's first rows 1 and 2 and its last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    x = clustered(ROWS, D, K)
    top2, guesses = tied_top2(ROWS)
    folders = {}
    for world in (1, 2):
        folders[world] = tmp_path_factory.mktemp(f"world{world}")
        write_shards(folders[world], x, top2, guesses, STAND_INS, world)
    return folders, x, top2, guesses


@pytest.mark.parametrize("max_points_per_centroid", [None, 5])   # all 56 covered rows; a sample of 20
def test_one_process_in_chunks_smaller_than_a_shard_gives_todays_queries(tiny, max_points_per_centroid):
    folders, x, top2, guesses = tiny
    for chunk in (4, 1000):
        queries, seconds = select_queries(own_shard(folders[1], ROWS, STAND_INS), COUNT, K, niter=NITER, seed=SEED,
                                          max_points_per_centroid=max_points_per_centroid, chunk=chunk)
        assignment = check([queries.rows, queries.margin, queries.cluster, queries.top2, queries.guesses,
                            queries.cluster_sizes, [queries.uncovered]], x, top2, guesses, STAND_INS, COUNT, K,
                           max_points_per_centroid)
        np.testing.assert_array_equal(whole_assignment(folders[1], 1), assignment)
        assert set(seconds) == {"kmeans_seconds", "assignment_seconds", "choice_seconds"}
    # the crafted ties: every cluster's last place is shared by rows the quota leaves out
    margin = top2[:, 0].astype(np.float64) - top2[:, 1]
    left_out = np.setdiff1d(np.flatnonzero(assignment >= 0), queries.rows)
    last = {c: queries.margin[queries.cluster == c].max() for c in range(K) if (queries.cluster == c).any()}
    assert any(margin[row] == last.get(assignment[row]) for row in left_out)


def test_two_ranks_give_the_queries_of_one_process(tiny):
    folders, x, top2, guesses = tiny
    runs = [(None, 4), (5, 4), (5, 1000)]
    first, second = run_ranks(_select, 2, str(folders[2]), ROWS, STAND_INS, COUNT, K, runs)
    for result, other, (max_points_per_centroid, _) in zip(first, second, runs):
        assignment = check(result, x, top2, guesses, STAND_INS, COUNT, K, max_points_per_centroid)
        np.testing.assert_array_equal(np.asarray(other), assignment)   # rank 1 read both ranks' files back


def test_the_demo_sized_pile_gives_todays_queries_on_two_ranks(tmp_path):
    """The demo's shapes: 54,700 candidates, 128-d embeddings, 46 clusters, 138 queries, k-means on 46 x 256
    of them, each rank's block read in chunks of 8192."""
    rows, k, count = 54_700, 46, 138
    x = clustered(rows, 128, 60, seed=1)
    top2, guesses = tied_top2(rows, seed=1)
    write_shards(tmp_path, x, top2, guesses, [], 2)
    result, _ = run_ranks(_select, 2, str(tmp_path), rows, [], count, k, [(256, 8192)])
    check(result[0], x, top2, guesses, [], count, k, 256)


def test_the_sample_is_the_rows_faiss_draws():
    for n, size, seed in [(100, 30, 0), (54_700, 46 * 256, 0), (5000, 4999, 7)]:
        permutation = np.empty(n, np.int32)
        faiss.rand_perm(faiss.swig_ptr(permutation), n, seed)
        np.testing.assert_array_equal(cluster.faiss_permutation_start(n, size, seed), permutation[:size])
    assert cluster.training_rows(100, 4, 25, 0) is None and cluster.training_rows(100, 4, None, 0) is None
    assert len(cluster.training_rows(101, 4, 25, 0)) == 100


def test_assign_is_the_float64_argmax_whatever_rows_share_the_search():
    """Rows a hair from the bisector of two centroids: faiss's float32 search orders some of them wrongly,
    and how depends on the batch; assign gives the float64 argmax, in any chunks."""
    rng = np.random.default_rng(0)
    centroids = unit_rows(rng.standard_normal((5, 64)).astype(np.float32))
    nudge = rng.choice([-1, 1], size=(4000, 1)) * rng.uniform(0, 3e-7, size=(4000, 1))
    x = unit_rows((centroids[0] + centroids[1] + nudge * (centroids[0] - centroids[1])).astype(np.float32))
    pairs = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]], np.float32)
    x[:3] = unit_rows(pairs @ np.eye(4, 64, dtype=np.float32))
    tie_centroids = np.eye(4, 64, dtype=np.float32)[[2, 0, 1, 3]]   # rows 0-2 tie exactly between two of them
    for base in (centroids, tie_centroids):
        exact = (x.astype(np.float64) @ base.T.astype(np.float64)).argmax(axis=1)
        assigned, similarity = cluster.assign(x, base)
        np.testing.assert_array_equal(assigned, exact)
        for chunk in (7, 1000):
            parts = [cluster.assign(x[start:start + chunk], base)[0] for start in range(0, len(x), chunk)]
            np.testing.assert_array_equal(np.concatenate(parts), exact)
        np.testing.assert_allclose(similarity, (x @ base.T).max(axis=1), atol=1e-6)
        if base is centroids:   # float32 alone errs on these rows
            assert (cosine_search(centroids, x, 1, normalise=False)[1][:, 0] != exact).any()
    assert assigned[:3].tolist() == [1, 0, 1]   # equal similarities: the lower centroid


def test_smallest_margins_streamed_in_any_chunks_is_margin_query():
    rng = np.random.default_rng(0)
    assignment = rng.integers(0, 7, size=500)
    top2, _ = tied_top2(500)
    margin = cluster.margins(top2)
    for budget in (0, 7, 40, 500):
        expected = cluster.margin_query(top2, assignment, budget, 7)
        quota = cluster.split_budget(np.bincount(assignment, minlength=7), budget)
        rows = np.arange(500)
        merged = cluster.SmallestMargins(quota)
        for part in np.array_split(rng.permutation(500), 3):   # three "ranks" of scattered rows
            own = cluster.SmallestMargins(quota)
            for chunk in np.array_split(part, 9):
                own.add(assignment[chunk], margin[chunk], rows[chunk], top2[chunk])
            if own.kept() is not None:
                merged.add(*own.kept())
        kept = merged.kept()
        chosen = np.array([], int) if kept is None else kept[2][np.lexsort((kept[2], kept[1]))]
        np.testing.assert_array_equal(chosen, expected)
        if kept is not None:
            np.testing.assert_array_equal(kept[3], top2[kept[2]])
