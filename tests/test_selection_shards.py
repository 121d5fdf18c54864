"""Balanced selection without merging the ranks' predictions: every rank keeps the top-P per class of its own
rows, rank 0 the top-P of the gathered candidates; the selection is the one a single process makes over
every row, ties included."""
import numpy as np
import pytest

from multiproc import run_ranks
from data.errors import InputError
from trainer.algorithms.balanced_selection import select_balanced_from_npy
from trainer.runtime.predict import TOP_K_FILES, rank_file, record_shards

NUM_CLASSES, K, P = 5, 3, 4
# a "previous world" of 3 wrote these blocks; 2 ranks read shards 0 and 2 (rank 0) and shard 1 (rank 1), so
# rank 0 holds images both below and above rank 1's
BLOCKS = [(0, 17), (17, 30), (30, 50)]


def tied_rows(n: int, seed: int = 0):
    """Top-K rows over 3 score levels: nearly every class's P-th place is a tie, across the blocks too."""
    rng = np.random.default_rng(seed)
    classes = np.stack([rng.permutation(NUM_CLASSES)[:K] for _ in range(n)]).astype(np.int32)
    scores = np.sort(rng.choice(np.array([0.2, 0.5, 0.8], np.float32), size=(n, K)), axis=1)[:, ::-1].copy()
    # crafted: class 0's best score is shared by image 20 (rank 1's shard) and image 35 (rank 0's later shard);
    # image 3 (rank 0) scores 0.95 in classes 1 and 2, image 40 scores 0.95 in class 3 and 0.9 in class 1
    classes[[20, 35]] = [[0, 1, 2], [0, 3, 4]]
    scores[[20, 35]] = [[0.9, 0.1, 0.1], [0.9, 0.1, 0.1]]
    classes[3], scores[3] = [2, 1, 0], [0.95, 0.95, 0.01]
    classes[40], scores[40] = [3, 1, 4], [0.95, 0.9, 0.01]
    return classes, scores


def write_shards(folder, classes, scores):
    """The layout trainer.runtime.predict.write_predictions leaves: per-rank .npy files and shards.json."""
    for rank, (first, end) in enumerate(BLOCKS):
        for name, array in zip(TOP_K_FILES, (classes, scores)):
            np.save(rank_file(str(folder / name), rank), array[first:end])
    record_shards(str(folder), BLOCKS[-1][1], K, BLOCKS)


def _select(rank, folder, p):
    from trainer.algorithms.balanced_selection import select_across_ranks
    from trainer.dist import init
    from trainer.runtime.predict import top_k_share
    rt = init()
    parts = top_k_share(folder, rt.rank, rt.world)
    selection = select_across_ranks(parts, NUM_CLASSES, p, chunk=5)
    shared = [(part.first_image, part.start, part.stop) for part in parts]
    if selection is None:
        return shared, None
    return shared, (selection.indices, selection.labels, selection.scores, selection.class_counts,
                    np.array([selection.num_duplicates, selection.num_dropped]))


def alone(tmp_path, classes, scores, p):
    """One process over every row."""
    np.save(tmp_path / "all_classes.npy", classes)
    np.save(tmp_path / "all_scores.npy", scores)
    return select_balanced_from_npy(tmp_path / "all_classes.npy", tmp_path / "all_scores.npy", NUM_CLASSES, p)


def assert_same(gathered, selection):
    indices, labels, scores, counts, dropped = (np.asarray(array) for array in gathered)   # run_ranks gives tensors
    np.testing.assert_array_equal(indices, selection.indices)
    np.testing.assert_array_equal(labels, selection.labels)
    assert scores.dtype == selection.scores.dtype and scores.tobytes() == selection.scores.tobytes()
    np.testing.assert_array_equal(counts, selection.class_counts)
    assert dropped.tolist() == [selection.num_duplicates, selection.num_dropped]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    classes, scores = tied_rows(BLOCKS[-1][1])
    write_shards(folder, classes, scores)
    return folder, classes, scores


@pytest.mark.parametrize("p", [1, P, 100])
def test_two_ranks_select_what_one_process_selects_over_every_row(shards, tmp_path, p):
    folder, classes, scores = shards
    (share0, first), (share1, second) = run_ranks(_select, 2, str(folder), p)
    assert share0 == [(0, 0, 17), (30, 0, 20)] and share1 == [(17, 0, 13)] and second is None
    expected = alone(tmp_path, classes, scores, p)
    assert_same(first, expected)
    if p == 1:   # the crafted ties, decided as one process decides them
        chosen = dict(zip(expected.indices.tolist(), expected.labels.tolist()))
        assert chosen[20] == 0 and 35 not in chosen   # class 0: equal scores, the lower image (rank 1's) wins
        assert chosen[3] == 1   # equal scores in classes 1 and 2: the lower class keeps it
        assert chosen[40] == 3   # its best class; class 1 goes to image 3 (0.95 > 0.9)
    if p == 100:   # every candidate fits: each image once, under its best class
        assert expected.indices.tolist() == list(range(50))


def test_one_whole_pair_of_files_is_split_in_blocks(shards, tmp_path):
    """A scorer's output (one whole pair of files, label propagation's) is read by each rank in its block."""
    _, classes, scores = shards
    for name, array in zip(TOP_K_FILES, (classes, scores)):
        np.save(tmp_path / name, array)
    (share0, first), (share1, _) = run_ranks(_select, 2, str(tmp_path), P)
    assert share0 == [(0, 0, 25)] and share1 == [(0, 25, 50)]
    assert_same(first, alone(tmp_path, classes, scores, P))


def _refuse(rank, folder):
    from trainer.algorithms.balanced_selection import select_across_ranks
    from trainer.dist import init
    from trainer.runtime.predict import top_k_share
    rt = init()
    with pytest.raises(InputError) as refused:
        select_across_ranks(top_k_share(folder, rt.rank, rt.world), NUM_CLASSES, P)
    return str(refused.value)


def test_a_bad_row_on_one_rank_stops_every_rank_with_its_line(shards, tmp_path):
    _, classes, scores = shards
    classes = classes.copy()
    classes[21, 1] = NUM_CLASSES   # in shard 1, row 4: rank 1's alone
    write_shards(tmp_path, classes, scores)
    said = run_ranks(_refuse, 2, str(tmp_path))
    bad = rank_file(str(tmp_path / "topk_class.npy"), 1)
    assert said == [f"{bad} row 4: class ids {classes[21].tolist()} outside [0, {NUM_CLASSES})"] * 2
