"""Label propagation over ranks: every rank searches the neighbours of its block of the images on its own
cores, rank 0 gathers them and solves; the scores are one process's over every image, to 1e-5. A rank that
searches under a launcher's OMP_NUM_THREADS=1 takes the cores its affinity allows."""
import dataclasses
import os

import numpy as np
import pytest

from multiproc import run_ranks
from trainer.algorithms import label_propagation

NUM_CLASSES, K = 3, 5


def write_pile(folder) -> np.ndarray:
    """A prediction folder's embeddings as write_predictions leaves them (unit float16 rows): three noisy blobs
    in 8 dimensions and one image unlike any, 55 unlabeled and 6 labeled (2 a class); returns the labels.
    61 images: 2 ranks search 30 and 31 of them."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(NUM_CLASSES), 20)
    x = np.concatenate([np.eye(8)[truth] + 0.1 * rng.standard_normal((60, 8)), -np.eye(8)[:3].sum(0, keepdims=True)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    labeled = np.array([0, 1, 20, 21, 40, 41])
    os.makedirs(folder / "labeled")
    np.save(folder / "embeddings.npy", np.delete(x, labeled, axis=0))
    np.save(folder / "labeled" / "embeddings.npy", x[labeled])
    return truth[labeled]


def embeddings(folder) -> list[np.ndarray]:
    return [np.load(os.path.join(folder, "embeddings.npy")), np.load(os.path.join(folder, "labeled", "embeddings.npy"))]


def propagated(folder, labels):
    parts = embeddings(folder)
    return label_propagation.propagate(parts, np.arange(len(parts[0]), 61), labels, NUM_CLASSES, K)


def scores(folder, labels, out) -> list[np.ndarray]:
    """The propagation scorer's top-K files written to folder/out (every class: the whole distribution)."""
    label_propagation.write_scores(str(folder), labels, NUM_CLASSES, "propagation", NUM_CLASSES, K, 0.99, 20, 3.0,
                                   None, str(folder / out))
    return written(folder / out)


def written(folder) -> list[np.ndarray]:
    return [np.load(folder / name) for name in ("topk_class.npy", "topk_prob.npy")]


def _on_each_rank(rank, folder, labels):
    """This rank's propagate result (None but on rank 0) and the rows it searched; both ranks write the
    scorer's files (rank 0 alone does)."""
    searched, search = [], label_propagation._neighbours

    def recorded(index, first, end, k):
        searched.append((first, end))
        return search(index, first, end, k)
    label_propagation._neighbours = recorded
    result = propagated(folder, labels)
    scores(folder, labels, "two_ranks")
    return searched, None if result is None else dataclasses.asdict(result)


def test_two_ranks_search_half_each_and_score_as_one_process(tmp_path):
    pytest.importorskip("faiss")
    labels = write_pile(tmp_path)
    (searched_0, first), (searched_1, second) = run_ranks(_on_each_rank, 2, tmp_path, labels)
    # propagate, then write_scores: each rank searched its own block of the 61 images, twice
    assert searched_0 == [(0, 30)] * 2 and searched_1 == [(30, 61)] * 2
    assert second is None
    alone = propagated(tmp_path, labels)
    assert np.flatnonzero(~alone.reached).tolist() == [54]   # the solve spreads to all but the outlier
    for field, value in dataclasses.asdict(alone).items():
        np.testing.assert_allclose(first[field], value, rtol=0, atol=1e-5, err_msg=field)
    (classes, probs), (alone_classes, alone_probs) = written(tmp_path / "two_ranks"), scores(tmp_path, labels, "alone")
    np.testing.assert_array_equal(classes, alone_classes)
    np.testing.assert_allclose(probs, alone_probs, rtol=0, atol=1e-5)


def _threads_under_a_launcher(rank, folder, labels):
    """faiss's threads as the launcher's OMP_NUM_THREADS=1 leaves them, while this rank searches, and after."""
    import faiss
    # torchrun's OMP_NUM_THREADS=1 for each of several ranks a node, as faiss's OpenMP has it when the variable
    # was set before faiss loaded; this spawned worker may have loaded faiss already, through this module's imports
    os.environ["OMP_NUM_THREADS"] = "1"
    faiss.omp_set_num_threads(1)
    during, search = [], label_propagation._neighbours

    def counted(*args):
        during.append(faiss.omp_get_max_threads())
        return search(*args)
    label_propagation._neighbours = counted
    before = faiss.omp_get_max_threads()
    propagated(folder, labels)
    return before, during, faiss.omp_get_max_threads()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: one thread is every core")
def test_a_rank_alone_on_its_machine_searches_on_every_core_despite_the_launchers_one_thread(tmp_path):
    pytest.importorskip("faiss")
    labels = write_pile(tmp_path)
    [(before, during, after)] = run_ranks(_threads_under_a_launcher, 1, tmp_path, labels)
    assert before == after == 1
    assert during == [len(os.sched_getaffinity(0))]
