import faiss
import numpy as np
import pytest

from trainer.algorithms.cluster import greedy_kmeanspp, margin_query, margins, spherical_kmeans, split_budget


def greedy_split(sizes, budget):
    """Independent reference: hand out one sample at a time to the cluster with the fewest so far."""
    quota = [0] * len(sizes)
    for _ in range(budget):
        open_clusters = [c for c in range(len(sizes)) if quota[c] < sizes[c]]
        quota[min(open_clusters, key=lambda c: (quota[c], c))] += 1
    return quota


def test_split_budget_hand_cases():
    assert split_budget([2, 5, 5], 8).tolist() == [2, 3, 3]
    assert split_budget([2, 5, 5], 9).tolist() == [2, 4, 3]  # the spare one goes to the lower cluster id
    assert split_budget([2, 5, 5], 12).tolist() == [2, 5, 5]
    assert split_budget([0, 7, 1], 4).tolist() == [0, 3, 1]
    assert split_budget([2, 5, 5], 0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="budget=13"):
        split_budget([2, 5, 5], 13)


def test_split_budget_matches_greedy_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 12, size=rng.integers(1, 8))
        budget = int(rng.integers(0, sizes.sum() + 1))
        assert split_budget(sizes, budget).tolist() == greedy_split(sizes.tolist(), budget)


def hand_built_probs():
    """12 samples in 3 clusters with exactly representable margins (top-2 = 0.5 ± m/2, third column 0)."""
    margin = np.array([0.75, 0.5,                        # cluster 0: samples 0-1
                       0.5, 0.125, 0.75, 0.25, 0.0,      # cluster 1: samples 2-6
                       0.25, 0.125, 0.25, 0.5, 0.25])    # cluster 2: samples 7-11
    assignment = np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    probs = np.stack([0.5 + margin / 2, np.zeros_like(margin), 0.5 - margin / 2], axis=1).astype(np.float32)
    probs[::2] = probs[::2, ::-1]  # the top two sit in different columns from row to row
    return probs, assignment, margin


def test_margins_from_full_or_top2_probabilities():
    probs, _, margin = hand_built_probs()
    np.testing.assert_array_equal(margins(probs), margin)
    top2 = -np.sort(-probs, axis=1)[:, :2]
    np.testing.assert_array_equal(margins(top2), margin)


def test_margin_query_hand_built():
    probs, assignment, _ = hand_built_probs()
    # budget 9 over sizes [2, 5, 5] -> quotas [2, 4, 3]; cluster 2 has a 3-way tie at 0.25 for 2 places
    chosen = margin_query(probs, assignment, 9, 3)
    assert chosen.tolist() == [6, 3, 8, 5, 7, 9, 1, 2, 0]
    assert margin_query(probs, assignment, 3, 3).tolist() == [6, 8, 1]
    assert margin_query(probs, assignment, 0, 3).tolist() == []
    # a fourth, empty cluster gives its share to the others
    assert sorted(margin_query(probs, assignment, 9, 4).tolist()) == sorted(chosen.tolist())


def test_margin_query_bad_input():
    probs, assignment, _ = hand_built_probs()
    with pytest.raises(ValueError, match="budget=13"):
        margin_query(probs, assignment, 13, 3)
    with pytest.raises(ValueError, match="assignment row 4 is 3"):
        margin_query(probs, np.where(np.arange(12) == 4, 3, assignment), 2, 3)
    with pytest.raises(ValueError, match=">= 2 classes"):
        margin_query(probs[:, :1], assignment, 2, 3)


def separated_blobs(per_cluster=100, k=6, d=32, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per_cluster)
    x = centres[truth] + noise * rng.standard_normal((len(truth), d)).astype(np.float32)
    return x, truth


def assert_recovers(assignment, truth, k):
    # a bijection between found and true clusters: every found cluster is pure and all k are used
    pairs = set(zip(assignment.tolist(), truth.tolist()))
    assert len(pairs) == k
    assert len({a for a, _ in pairs}) == len({t for _, t in pairs}) == k


def test_greedy_seeding_puts_one_seed_in_every_blob():
    x, truth = separated_blobs()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    seeds = greedy_kmeanspp(unit, 6, np.random.default_rng(0))
    assert sorted(truth[np.argmax(seeds @ unit.T, axis=1)].tolist()) == list(range(6))
    # 6 uniform draws would almost always repeat a blob (probability of distinct blobs 6!/6^6 = 1.5%)


def test_spherical_kmeans_recovers_clusters_and_objective():
    x, truth = separated_blobs()
    result = spherical_kmeans(x, 6, niter=10)
    assert_recovers(result.assignment, truth, 6)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1, atol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = unit.astype(np.float64) @ result.centroids.T.astype(np.float64)
    np.testing.assert_array_equal(result.assignment, cosine.argmax(axis=1))
    assert result.objective == pytest.approx(cosine.max(axis=1).mean(), abs=1e-6)
    assert 0.9 < result.objective <= 1


def test_spherical_kmeans_normalises_its_input():
    x, truth = separated_blobs(seed=1)
    scale = np.random.default_rng(2).uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)
    plain, scaled = spherical_kmeans(x, 6, niter=5), spherical_kmeans(x * scale, 6, niter=5)
    np.testing.assert_array_equal(plain.assignment, scaled.assignment)
    np.testing.assert_allclose(plain.centroids, scaled.centroids, atol=1e-4)


def test_spherical_kmeans_subsampled_training_still_assigns_every_row():
    x, truth = separated_blobs(per_cluster=200, seed=3)
    result = spherical_kmeans(x, 6, niter=10, max_points_per_centroid=40)  # trains on 240 of 1200 rows
    assert result.assignment.shape == (1200,)
    assert_recovers(result.assignment, truth, 6)


def test_spherical_kmeans_bad_input():
    x, _ = separated_blobs(per_cluster=2)
    with pytest.raises(ValueError, match="k=13 clusters for 12 points"):
        spherical_kmeans(x, 13)
    x[5] = 0
    with pytest.raises(ValueError, match="x row 5 has norm 0"):
        spherical_kmeans(x, 2)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_a_gpu_faiss_does_not_see_is_an_error():
    x, _ = separated_blobs(per_cluster=5)
    with pytest.raises(ValueError, match="faiss sees 0 GPU"):
        spherical_kmeans(x, 2, gpu=0)
