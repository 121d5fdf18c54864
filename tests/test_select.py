import numpy as np
import pytest

from trainer.algorithms.balanced_selection import TopPerClass, confidence_adapted, select_balanced_from_npy

NUM_CLASSES = 12


def brute_force(topk_class, topk_prob, num_classes, p):
    """Explicit reference: every candidate, per-class sort, then one class per image."""
    per_class = {c: [] for c in range(num_classes)}
    for image, (classes, scores) in enumerate(zip(topk_class.tolist(), topk_prob.tolist())):
        for c, s in zip(classes, scores):
            per_class[c].append((-s, image))
    chosen = {}  # image -> list of (class, score)
    for c, candidates in per_class.items():
        for neg_score, image in sorted(candidates)[:p]:
            chosen.setdefault(image, []).append((c, -neg_score))
    indices, labels, scores = [], [], []
    for image in sorted(chosen):
        c, s = min(chosen[image], key=lambda cs: (-cs[1], cs[0]))
        indices.append(image)
        labels.append(c)
        scores.append(s)
    duplicates = sum(len(v) > 1 for v in chosen.values())
    return indices, labels, scores, duplicates


def random_topk(n, k, num_classes, seed, levels=6):
    """Top-K rows with many tied scores (few score levels) and shared top classes (duplicates)."""
    rng = np.random.default_rng(seed)
    pool = min(num_classes, k + 2)  # classes drawn from a small pool collide across images
    classes = np.stack([rng.permutation(pool)[:k] for _ in range(n)]).astype(np.int32)
    classes[n // 2:] = np.stack([rng.permutation(num_classes)[:k] for _ in range(n - n // 2)])
    scores = (rng.integers(0, levels, size=(n, k)) / levels).astype(np.float32)
    return classes, scores


def select(folder, topk_class, topk_prob, num_classes, p, **kwargs):
    """select_balanced_from_npy over the arrays, written to folder/c.npy and folder/p.npy."""
    np.save(folder / "c.npy", topk_class)
    np.save(folder / "p.npy", topk_prob)
    return select_balanced_from_npy(folder / "c.npy", folder / "p.npy", num_classes, p, **kwargs)


def assert_matches(selection, reference):
    indices, labels, scores, duplicates = reference
    assert selection.indices.tolist() == indices
    assert selection.labels.tolist() == labels
    np.testing.assert_array_equal(selection.scores, np.array(scores, np.float32))
    assert selection.num_duplicates == duplicates
    assert selection.class_counts.tolist() == np.bincount(labels, minlength=NUM_CLASSES).tolist()


@pytest.mark.parametrize("p", [1, 3, 10, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_ties_and_duplicates(tmp_path, p, seed):
    classes, scores = random_topk(300, 4, NUM_CLASSES, seed)
    reference = brute_force(classes, scores, NUM_CLASSES, p)
    if p <= 10:
        assert reference[3] > 0, "the case should contain duplicate images"
    selection = select(tmp_path, classes, scores, NUM_CLASSES, p)
    assert_matches(selection, reference)
    if p == 1000:  # more than any class's candidates: every image is selected once
        assert selection.indices.tolist() == list(range(300))
    assert selection.num_dropped == sum(min(p, (classes == c).sum()) for c in range(NUM_CLASSES)) - len(
        selection.indices)


@pytest.mark.parametrize("chunk", [1, 7, 33, 64, 10_000])
def test_chunked_equals_whole(tmp_path, chunk):
    classes, scores = random_topk(500, 5, NUM_CLASSES, seed=3)
    whole = select(tmp_path, classes, scores, NUM_CLASSES, 9, chunk=len(classes))
    assert_matches(whole, brute_force(classes, scores, NUM_CLASSES, 9))
    assert_matches(select(tmp_path, classes, scores, NUM_CLASSES, 9, chunk=chunk),
                   brute_force(classes, scores, NUM_CLASSES, 9))


# beyond what the packed sort key holds with the class (2^28 at 12 classes): sorted within each class's segment
# below 2^32, by np.lexsort above
@pytest.mark.parametrize("offset", [1 << 30, 1 << 40])
def test_huge_indices_take_the_general_path_with_the_same_result(offset):
    classes, scores = random_topk(300, 4, NUM_CLASSES, seed=6)
    tracker = TopPerClass(NUM_CLASSES, 5)
    for start in range(0, 300, 64):
        tracker.update(classes[start:start + 64], scores[start:start + 64], offset + start)
    far = tracker.result()
    near_indices, near_labels, _, near_duplicates = brute_force(classes, scores, NUM_CLASSES, 5)
    assert (far.indices - offset).tolist() == near_indices
    assert far.labels.tolist() == near_labels
    assert far.num_duplicates == near_duplicates > 0


def test_negative_and_signed_zero_scores_order_like_floats(tmp_path):
    classes = np.array([[0], [0], [0], [0], [0]], np.int32)
    scores = np.array([[-0.0], [0.0], [-1.5], [2.0], [-np.inf]], np.float32)
    selection = select(tmp_path, classes, scores, 1, 3)
    assert selection.indices.tolist() == [0, 1, 3]  # 2.0, then the two zeros by index


def test_bad_parameters_raise(tmp_path):
    classes, scores = random_topk(10, 4, NUM_CLASSES, seed=8)
    with pytest.raises(ValueError, match="p .* must be >= 1"):
        select(tmp_path, classes, scores, NUM_CLASSES, 0)
    with pytest.raises(ValueError, match="p .* must be >= 1"):
        TopPerClass(NUM_CLASSES, -3)
    with pytest.raises(ValueError, match="K=4 .* exceeds num_classes=3"):
        select(tmp_path, classes % 3, scores, 3, 2)


def test_bad_rows_name_the_row(tmp_path):
    classes, scores = random_topk(10, 4, NUM_CLASSES, seed=9)
    out_of_range = classes.copy()
    out_of_range[6, 2] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"c\.npy row 6: class ids .* outside"):
        select(tmp_path, out_of_range, scores, NUM_CLASSES, 2, chunk=4)   # row counts from the file's start
    nan = scores.copy()
    nan[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"p\.npy row 4: contains NaN"):
        select(tmp_path, classes, nan, NUM_CLASSES, 2, chunk=3)
    repeated = classes.copy()
    repeated[3, 1] = repeated[3, 0]
    with pytest.raises(ValueError, match=r"c\.npy row 3: repeats a class"):
        select(tmp_path, repeated, scores, NUM_CLASSES, 2)
    with pytest.raises(ValueError, match=r"c\.npy \(10, 4\) and .*p\.npy \(10, 3\) must have the same 2-D shape"):
        select(tmp_path, classes, scores[:, :3], NUM_CLASSES, 2)

    np.save(tmp_path / "c.npy", classes)
    np.save(tmp_path / "p.npy", scores)
    np.save(tmp_path / "f.npy", classes.astype(np.float32))
    with pytest.raises(ValueError, match=r"f\.npy / .*p\.npy: topk_class must hold integer class ids"):
        select_balanced_from_npy(tmp_path / "f.npy", tmp_path / "p.npy", NUM_CLASSES, 2)
    np.save(tmp_path / "short.npy", scores[:7])
    with pytest.raises(ValueError, match=r"c\.npy \(10, 4\) and .*short\.npy \(7, 4\) must have the same 2-D shape"):
        select_balanced_from_npy(tmp_path / "c.npy", tmp_path / "short.npy", NUM_CLASSES, 2)


def test_confidence_adapted_quota_follows_each_class_mean_score():
    # class 0: scores 0.9, 0.9, 0.9, 0.9 (mean 0.9) keeps all 4; class 1: 0.9, 0.6, 0.3, 0.0 (mean 0.45)
    # keeps round(4 x 0.45 / 0.9) = 2, its best two; class 2 has nothing and keeps nothing
    topk_class = np.array([[0], [0], [0], [0], [1], [1], [1], [1]])
    topk_prob = np.array([[0.9], [0.9], [0.9], [0.9], [0.3], [0.9], [0.0], [0.6]], np.float32)
    selection = TopPerClass(3, 4).update(topk_class, topk_prob).result()
    adapted = confidence_adapted(selection, 3)
    assert adapted.indices.tolist() == [0, 1, 2, 3, 5, 7]
    assert adapted.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert adapted.class_counts.tolist() == [4, 2, 0]
    assert adapted.num_dropped == selection.num_dropped + 2
