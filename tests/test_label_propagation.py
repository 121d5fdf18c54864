import numpy as np
import pytest
import torch

from trainer.algorithms.balanced_selection import TopPerClass
from trainer.algorithms.label_propagation import _index, _neighbours, _normalised_graph, propagate, top_k


def dense_reference(x, labeled_index, labels, num_classes, k, alpha, gamma):
    """Iscen et al.'s propagation written out densely in float64: brute-force kNN, W_n, exact solve."""
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    n = len(x)
    a = np.zeros((n, n))
    for i in range(n):
        for j in np.argsort(-sims[i], kind="stable")[:k]:
            a[i, j] = max(sims[i, j], 0) ** gamma
    w = a + a.T
    degree = w.sum(axis=1)
    d = np.array([1 / np.sqrt(v) if v > 0 else 0 for v in degree])
    wn = d[:, None] * w * d[None, :]
    y = np.zeros((n, num_classes))
    y[labeled_index, labels] = 1
    z = np.clip(np.linalg.solve(np.eye(n) - alpha * wn, y), 0, None)
    probs = z / z.sum(axis=1, keepdims=True)
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0), axis=1)
    return probs, 1 - entropy / np.log(num_classes)


@pytest.mark.parametrize("d,k,alpha,gamma", [(8, 5, 0.99, 3.0), (3, 40, 0.99, 1.0), (8, 10, 0.5, 2.0)])
def test_matches_the_dense_closed_form(d, k, alpha, gamma):
    rng = np.random.default_rng(d + k)
    x = rng.standard_normal((60, d)).astype(np.float32) * rng.uniform(0.5, 2, (60, 1)).astype(np.float32)
    labeled_index, labels = np.array([3, 17, 25, 40, 51, 58]), np.array([0, 1, 2, 0, 1, 2])
    ref_probs, ref_certainty = dense_reference(x, labeled_index, labels, 3, k, alpha, gamma)
    out = propagate(torch.from_numpy(x), torch.from_numpy(labeled_index), labels, 3, k=k, alpha=alpha,
                    gamma=gamma, iterations=200, tol=1e-12)
    np.testing.assert_allclose(out.probabilities, ref_probs, atol=1e-5)
    np.testing.assert_allclose(out.certainty, ref_certainty, atol=1e-5)
    assert out.probabilities.dtype == np.float32 and out.probabilities.shape == (60, 3)
    assert out.reached.all()
    expected_labels = ref_probs.argmax(axis=1)
    expected_labels[labeled_index] = labels
    np.testing.assert_array_equal(out.labels, expected_labels)
    counts = np.bincount(expected_labels, minlength=3)
    np.testing.assert_allclose(out.class_weights, 60 / 3 / counts, rtol=1e-6)
    # Iscen's 20 CG steps already land close to the exact solution
    coarse = propagate(x, labeled_index, labels, 3, k=k, alpha=alpha, gamma=gamma)
    assert np.abs(coarse.probabilities - ref_probs).max() < 0.05


def strands(n_per_class=100, seed=0):
    """Two elongated, well-separated Gaussian blobs on the sphere near (0, 0, 1): long along the first
    coordinate, 60 narrow standard deviations apart along the second."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1], n_per_class)
    plane = np.stack([rng.normal(0, 0.3, 2 * n_per_class),
                      np.where(truth == 0, 0.3, -0.3) + rng.normal(0, 0.01, 2 * n_per_class)], axis=1)
    return np.concatenate([plane, np.ones((len(plane), 1))], axis=1).astype(np.float32), truth, plane


def test_spreads_along_each_blob_where_the_nearest_labelled_point_fails():
    x, truth, plane = strands()
    # one label per blob, at opposite ends: many of a blob's images are nearer the other blob's label
    labeled_index = np.array([np.argmax(np.where(truth == 0, plane[:, 0], -np.inf)),
                              np.argmin(np.where(truth == 1, plane[:, 0], np.inf))])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    nearest_labelled = np.argmax(unit @ unit[labeled_index].T, axis=1)
    others = np.setdiff1d(np.arange(len(x)), labeled_index)
    assert (nearest_labelled[others] == truth[others]).mean() < 0.8

    out = propagate(x, labeled_index, truth[labeled_index], 2, k=10)
    assert (out.labels[others] == truth[others]).mean() >= 0.95
    assert out.reached.all()


def blobs_with_outlier(n_per_class=60, num_classes=3, seed=0):
    """Blobs around the first coordinate axes, then one image pointing away from all of them."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(num_classes), n_per_class)
    x = np.eye(8)[truth] + 0.1 * rng.standard_normal((len(truth), 8))
    outlier = -np.eye(8)[:num_classes].sum(axis=0)
    return np.concatenate([x, outlier[None]]).astype(np.float32), truth


def test_top_k_feeds_balanced_selection():
    x, truth = blobs_with_outlier()
    labeled_index = np.array([0, 1, 60, 61, 120, 121])
    out = propagate(x, labeled_index, truth[labeled_index], 3, k=8)
    classes, scores = top_k(out.probabilities, 2, out.reached)
    assert classes.dtype == np.int64 and scores.dtype == np.float32 and classes.shape == scores.shape == (181, 2)
    assert (scores[:, 0] >= scores[:, 1]).all() and (classes[:-1, 0] == truth).all()
    np.testing.assert_array_equal(scores[-1], [0, 0])   # the outlier is not reached

    selection = TopPerClass(3, 20).update(classes, scores).result()
    assert selection.class_counts.tolist() == [20, 20, 20]
    np.testing.assert_array_equal(selection.labels, truth[selection.indices])
    assert 180 not in selection.indices and selection.scores.min() > 0.5


def test_top_k_ties_take_the_lower_class_and_bad_k_raises():
    classes, scores = top_k(np.array([[0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]]), 2)
    assert classes.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(scores, [[0.4, 0.4], [1 / 3, 1 / 3]])
    with pytest.raises(ValueError, match=r"k=4 classes per image from 3: need 1 <= k <= 3"):
        top_k(np.ones((2, 3)) / 3, 4)


def test_images_no_label_reaches_are_flagged():
    x, truth = blobs_with_outlier()
    labeled_index = np.array([0, 60])   # the third blob has no label and is its own component
    out = propagate(x, labeled_index, truth[labeled_index], 3, k=8)
    unreached = np.flatnonzero(~out.reached)
    assert unreached.tolist() == list(range(120, 181))
    np.testing.assert_allclose(out.probabilities[unreached], 1 / 3)
    np.testing.assert_array_equal(out.certainty[unreached], 0)
    assert (out.labels[unreached] == -1).all() and (out.labels[:120] == truth[:120]).all()
    assert out.certainty[:120].min() > 0.5
    np.testing.assert_allclose(out.class_weights, [120 / 3 / 60, 120 / 3 / 60, 0])
    # one CG step multiplies by W_n once: the solution is still a multiple of the seeds
    assert np.flatnonzero(propagate(x, labeled_index, truth[labeled_index], 3, k=8, iterations=1).reached
                          ).tolist() == [0, 60]


def test_graph_is_symmetric_without_self_loops_even_for_duplicates():
    x = np.repeat(np.random.default_rng(1).standard_normal((4, 5)), 10, axis=0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = _normalised_graph(*_neighbours(_index([x], None), 0, len(x), 3), 3.0).to_dense().numpy()
    np.testing.assert_array_equal(np.diag(w), 0)
    np.testing.assert_allclose(w, w.T)
    assert ((w > 0).sum(axis=1) >= 3).all()


@pytest.mark.parametrize("change,message", [
    (dict(labels=np.array([0, 3])), r"labels row 1 is 3, expected a class id in \[0, 3\)"),
    (dict(labeled_index=np.array([0, 181])), r"labeled_index row 1 is 181, expected an embeddings row in \[0, 181\)"),
    (dict(labeled_index=np.array([-1, 5])), r"labeled_index row 0 is -1"),
    (dict(labeled_index=np.array([5, 5])), r"labeled_index row 1 repeats image 5"),
    (dict(labels=np.array([0])), r"1 labels for 2 labeled_index entries"),
    (dict(labels=np.array([0.0, 1.0])), r"labels must be a 1-D integer array"),
    (dict(k=181), r"k=181 neighbours .* from 181 embeddings: need 1 <= k <= 180"),
    (dict(k=0), r"k=0 neighbours"),
    (dict(alpha=1.0), r"alpha must be in \(0, 1\), got 1.0: .* singular"),
    (dict(alpha=0.0), r"alpha must be in \(0, 1\), got 0.0: 0 spreads no label beyond the labelled images"),
    (dict(num_classes=1), r"num_classes must be >= 2"),
])
def test_bad_inputs_name_the_argument(change, message):
    x, _ = blobs_with_outlier()
    args = dict(embeddings=x, labeled_index=np.array([0, 60]), labels=np.array([0, 1]), num_classes=3, k=8)
    with pytest.raises(ValueError, match=message):
        propagate(**(args | change))


def test_parts_are_one_pile_whose_bad_rows_are_named_by_their_row_in_it():
    x, truth = blobs_with_outlier()
    labeled_index = np.array([0, 60, 120])
    whole = propagate(x, labeled_index, truth[labeled_index], 3, k=8)
    parts = propagate([x[:100], x[100:]], labeled_index, truth[labeled_index], 3, k=8)
    np.testing.assert_array_equal(parts.probabilities, whole.probabilities)
    rest = x[100:].copy()
    rest[3] = 0
    with pytest.raises(ValueError, match=r"embeddings row 103 has norm 0.0"):
        propagate([x[:100], rest], labeled_index, truth[labeled_index], 3, k=8)
    with pytest.raises(ValueError, match=r"embeddings must be 2-D \(rows, dim\) of one dim, got shapes \(100, 8\), "
                                         r"\(81, 4\)"):
        propagate([x[:100], x[100:, :4]], labeled_index, truth[labeled_index], 3, k=8)
