import numpy as np
import pytest
import torch

from trainer.algorithms.knn import cosine_search, knn_accuracy, knn_classify, unit_rows


def brute_force_knn(train, labels, query, num_classes, k, temperature):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = query.astype(np.float64) @ train.T.astype(np.float64)
    votes = np.zeros((len(query), num_classes))
    for q in range(len(query)):
        for j in np.argsort(-sims[q], kind="stable")[:k]:
            votes[q, labels[j]] += np.exp(sims[q, j] / temperature)
    probs = votes / votes.sum(axis=1, keepdims=True)
    return probs.argmax(axis=1), probs


def random_data(seed=0, n=300, m=60, d=16, num_classes=5):
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.5, 3, size=(n, 1)).astype(np.float32)
    query = rng.standard_normal((m, d)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    return train, labels, query


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (20, 0.07), (50, 0.5)])
def test_matches_brute_force_weighted_vote(k, temperature):
    train, labels, query = random_data()
    pred, probs = knn_classify(train, labels, query, 5, k=k, temperature=temperature)
    ref_pred, ref_probs = brute_force_knn(train, labels, query, 5, k, temperature)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pred, ref_pred)
    assert pred.dtype == np.int64 and probs.shape == (60, 5)


def test_torch_inputs_match_numpy():
    train, labels, query = random_data(seed=1)
    pred, probs = knn_classify(train, labels, query, 5)
    t_pred, t_probs = knn_classify(torch.from_numpy(train).requires_grad_(), torch.from_numpy(labels),
                                   torch.from_numpy(query), 5)
    np.testing.assert_array_equal(pred, t_pred)
    np.testing.assert_allclose(probs, t_probs, rtol=1e-6)


def test_accuracy_on_separable_and_random_labels():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((4, 8)).astype(np.float32)
    truth = rng.integers(0, 4, size=400)
    x = centres[truth] + 0.05 * rng.standard_normal((400, 8)).astype(np.float32)
    assert knn_accuracy(x[:300], truth[:300], x[300:], truth[300:], 4, k=10) == 1.0
    train, labels, query = random_data(seed=3)
    query_labels = rng.integers(0, 5, size=len(query))
    pred, _ = knn_classify(train, labels, query, 5)
    assert knn_accuracy(train, labels, query, query_labels, 5) == pytest.approx((pred == query_labels).mean())


def test_cosine_search_matches_numpy():
    train, _, query = random_data(seed=4)
    sims, ids = cosine_search(train, query, 5)
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_query = query / np.linalg.norm(query, axis=1, keepdims=True)
    ref = unit_query @ unit_train.T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ids, axis=1), rtol=1e-5)


def test_unit_rows_copies_only_when_needed():
    x = np.random.default_rng(5).standard_normal((10, 4)).astype(np.float32)
    unit = unit_rows(x)
    assert not np.shares_memory(unit, x)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-6)
    assert unit_rows(unit) is unit
    x[7] = np.nan
    with pytest.raises(ValueError, match="x row 7 has norm nan"):
        unit_rows(x)


def test_bad_input():
    train, labels, query = random_data(seed=6, n=30)
    with pytest.raises(ValueError, match="k=31 neighbours requested from 30"):
        knn_classify(train, labels, query, 5, k=31)
    with pytest.raises(ValueError, match="train_labels row 3 is 5"):
        knn_classify(train, np.where(np.arange(30) == 3, 5, labels), query, 5)
    with pytest.raises(ValueError, match="dimension 8, base has 16"):
        knn_classify(train, labels, query[:, :8], 5)
    with pytest.raises(ValueError, match="29 train_labels for 30"):
        knn_classify(train, labels[:29], query, 5)
