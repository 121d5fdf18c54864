"""Label propagation over a kNN graph of embeddings (Iscen et al., CVPR 2019, "Label Propagation for Deep
Semi-supervised Learning").

The graph links every image to its k most cosine-similar others (itself excluded); an edge weighs
max(similarity, 0)^gamma, and the graph is made symmetric, W = A + A^T, and normalised,
W_n = D^-1/2 W D^-1/2 with D the degrees. Labels spread by solving (I - alpha W_n) Z = Y, Y holding a
one-hot row per labelled image: Z = sum_t (alpha W_n)^t Y, every path from a labelled image discounted by
alpha per hop. Like the paper, the solve is conjugate gradient stopped after `iterations` steps (or at
relative residual `tol`), all classes at once: it converges far faster than iterating Z <- alpha W_n Z + Y
(error ~0.99^t at alpha = 0.99). Each CG step multiplies by W_n once, so an image `iterations` or more
hops from every labelled image receives nothing; so does one whose component holds no labelled image.

Row-normalised, Z gives each image a class distribution; `top_k` turns it into the top-K arrays that
trainer.algorithms.balanced_selection consumes. The graph is searched with trainer.algorithms.knn (faiss, GPU `gpu` or the
CPU); the solve runs on the CPU with a torch sparse CSR matrix, in float32: converged, it matches the exact
solution to ~1e-6 even at alpha = 0.999, and at C = 1000 classes float64 would be 3x slower.

In a process group the search, N^2 d multiply-adds, is shared: every rank indexes all N images on its own
device and searches the neighbours of its block of them; rank 0 gathers the N x k neighbours (12 bytes
each) and solves alone. The solve is not split over ranks: each CG step multiplies the whole (N, C) matrix
by the graph, so a rank holding a block of rows would need the other rows' values at every step, an
exchange as large as the matrix; the graph and the CG's five (N, C) float32 matrices are rank 0's memory
(docs/cluster.md).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from data import atomic
from data.errors import InputError
from data.sampler import eval_block
from trainer import dist
from trainer.algorithms.knn import as_numpy, import_faiss, inner_product_index, unit_rows
from trainer.runtime.predict import EMBEDDINGS, whole_top_k

SEARCH_BLOCK = 65536   # rows normalised and added, or searched, at a time: bounds the temporaries


@dataclass(frozen=True)
class Propagation:
    """Propagated labels of N images over C classes (numpy arrays)."""

    probabilities: np.ndarray  # (N, C) float32: Z clipped at 0, rows summing to 1; uniform where not reached
    certainty: np.ndarray      # (N,) float32: 1 - entropy / log C, in [0, 1]; 0 where not reached
    reached: np.ndarray        # (N,) bool: Z's row got positive mass (else the row is uniform)
    labels: np.ndarray         # (N,) int64: the given label of labelled images, else the argmax; -1 if not reached
    class_weights: np.ndarray  # (C,) float32: (reached images / C) / reached images labelled c; 0 for no image


def _check_index(values, name: str, size: int, what: str) -> np.ndarray:
    values = as_numpy(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{name} must be a 1-D integer array, got shape {values.shape} dtype {values.dtype}")
    bad = (values < 0) | (values >= size)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name} row {row} is {values[row]}, expected {what} in [0, {size})")
    return values.astype(np.int64)


def _index(parts: list[np.ndarray], gpu: int | None):
    """An exact inner-product index (on GPU `gpu`, None: the CPU) of the unit rows of `parts`, one after
    another, normalised and added a block at a time: beside the index, no copy of every row."""
    index = inner_product_index(parts[0].shape[1], gpu)
    offset = 0
    for part in parts:
        for start in range(0, len(part), SEARCH_BLOCK):
            index.add(unit_rows(part[start:start + SEARCH_BLOCK], "embeddings", offset + start))
        offset += len(part)
    return index


def _neighbours(index, first: int, end: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar other rows of each of the index's rows first..end: (similarities float32,
    ids int64), (end - first, k) each."""
    sims, ids = np.empty((end - first, k), np.float32), np.empty((end - first, k), np.int64)
    for start in range(first, end, SEARCH_BLOCK):
        stop = min(start + SEARCH_BLOCK, end)
        found_sims, found_ids = index.search(index.reconstruct_n(start, stop - start), k + 1)
        # drop each row's own hit; a row whose self is not among its k + 1 hits (exact duplicates) drops its last
        own = found_ids == np.arange(start, stop)[:, None]
        own[~own.any(axis=1), -1] = True
        sims[start - first:stop - first] = found_sims[~own].reshape(-1, k)
        ids[start - first:stop - first] = found_ids[~own].reshape(-1, k)
    return sims, ids


def _normalised_graph(sims: np.ndarray, ids: np.ndarray, gamma: float) -> torch.Tensor:
    """W_n = D^-1/2 (A + A^T) D^-1/2 as an (N, N) float32 CSR tensor, from each image's k neighbours
    (similarities and ids, (N, k) each)."""
    n, k = ids.shape
    rows, cols = np.repeat(np.arange(n), k), ids.ravel()
    weights = np.maximum(sims.ravel().astype(np.float64), 0) ** gamma
    degree = np.bincount(rows, weights, n) + np.bincount(cols, weights, n)
    scale = np.divide(1, np.sqrt(degree), out=np.zeros(n), where=degree > 0)   # isolated images: no edges
    weights = (weights * scale[rows] * scale[cols]).astype(np.float32)
    index = torch.from_numpy(np.stack([np.concatenate([rows, cols]), np.concatenate([cols, rows])]))
    graph = torch.sparse_coo_tensor(index, torch.from_numpy(np.concatenate([weights, weights])), (n, n),
                                    check_invariants=False)   # ids come from faiss: in range
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        # CSR, not COO: its product with (N, C) blocks is 10x faster on the CPU at small C
        return graph.coalesce().to_sparse_csr()   # coalescing sums the pairs found in both directions


def _conjugate_gradient(matvec, b: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """Solves matvec(x) = b for every column of b (a symmetric positive definite operator), each column
    with its own step sizes and frozen once its residual is below tol * |b column|."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r * r).sum(0)
    stop = tol ** 2 * rs
    for _ in range(iterations):
        active = rs > stop   # also false for a class no labelled image carries (b column = 0)
        if not active.any():
            break
        ap = matvec(p)
        pap = (p * ap).sum(0)
        step = torch.where(active & (pap > 0), rs / pap, 0)
        x += step * p
        r -= step * ap
        rs_new = (r * r).sum(0)
        p = r + torch.where(active, rs_new / rs, 0) * p
        rs = rs_new
    return x


def propagate(embeddings, labeled_index, labels, num_classes: int, k: int = 20, alpha: float = 0.99,
              iterations: int = 20, gamma: float = 3.0, tol: float = 1e-6, *,
              gpu: int | None = None) -> Propagation | None:
    """Spreads labels[i] of images labeled_index[i] over the kNN graph of embeddings (N, d), see the module
    docstring. Labelled images keep their propagated row in `probabilities` (the closed form's, which other
    labels may outvote) but their given label in `labels`. embeddings: an array, or a list of arrays whose
    rows follow one another, read a block at a time (memory-mapped files stay on disk). gpu: this
    process's faiss GPU for the search, None for the CPU (see trainer.algorithms.knn.faiss_gpu); the solve
    stays on the CPU.

    In a process group every rank calls it with the same arguments: each searches its block of the images
    (on its share of the machine's cores where it searches on the CPU, dist.cores_per_rank), rank 0 solves
    on every core it may use while the others wait and returns the Propagation; the other ranks get None.
    A process alone keeps the threads it was given."""
    parts = [as_numpy(part) for part in (embeddings if isinstance(embeddings, (list, tuple)) else [embeddings])]
    for part in parts:
        if part.ndim != 2 or part.shape[1] != parts[0].shape[1] or part.shape[1] == 0:
            raise InputError(f"embeddings must be 2-D (rows, dim) of one dim, got shapes "
                             f"{', '.join(str(p.shape) for p in parts)}")
    n = sum(len(part) for part in parts)
    if num_classes < 2:
        raise InputError(f"num_classes must be >= 2 to propagate between classes, got {num_classes}")
    labeled_index = _check_index(labeled_index, "labeled_index", n, "an embeddings row")
    labels = _check_index(labels, "labels", num_classes, "a class id")
    if len(labels) != len(labeled_index):
        raise InputError(f"{len(labels)} labels for {len(labeled_index)} labeled_index entries")
    if not len(labeled_index):
        raise InputError("labeled_index is empty: there is no label to propagate")
    seen, first = np.unique(labeled_index, return_index=True)
    if len(seen) < len(labeled_index):
        row = int(np.setdiff1d(np.arange(len(labeled_index)), first)[0])
        raise InputError(f"labeled_index row {row} repeats image {labeled_index[row]}")
    if not 1 <= k < n:
        raise InputError(f"k={k} neighbours per image (itself excluded) from {n} embeddings: need 1 <= k <= {n - 1}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}: 0 spreads no label beyond the labelled images, "
                         "1 leaves (I - alpha W_n) singular")
    if gamma <= 0:
        raise InputError(f"gamma must be > 0, got {gamma}")
    if iterations < 1:
        raise InputError(f"iterations must be >= 1, got {iterations}")

    alone = not dist.grouped()
    with _threads(None if alone else dist.cores_per_rank()):
        first, end = eval_block(n, dist.rank(), dist.world_size())
        # the index (N x d floats, on the GPU or here) lives while it searches, not through the solve
        found = dist.gathered_on_rank0(lambda: _neighbours(_index(parts, gpu), first, end, k))
    if found is None:
        return None
    sims, ids = (np.concatenate(column) for column in zip(*found))
    with _threads(None if alone else dist.own_cores()):
        return _solve(_normalised_graph(sims, ids, gamma), labeled_index, labels, num_classes, alpha, iterations,
                      tol)


def _solve(graph: torch.Tensor, labeled_index: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float,
           iterations: int, tol: float) -> Propagation:
    n = graph.shape[0]
    seeds = torch.zeros(n, num_classes, dtype=torch.float32)
    seeds[torch.from_numpy(labeled_index), torch.from_numpy(labels)] = 1
    z = _conjugate_gradient(lambda p: p - alpha * (graph @ p), seeds, iterations, tol).clamp_(min=0)
    mass = z.sum(1, keepdim=True)
    reached = mass[:, 0] > 0
    probs = torch.where(reached[:, None], z / torch.where(reached[:, None], mass, 1), 1 / num_classes)
    certainty = torch.where(reached, 1 + torch.special.xlogy(probs, probs).sum(1) / math.log(num_classes), 0)
    predicted = torch.where(reached, probs.argmax(1), -1)
    predicted[torch.from_numpy(labeled_index)] = torch.from_numpy(labels)
    counts = torch.bincount(predicted[predicted >= 0], minlength=num_classes).double()
    class_weights = torch.where(counts > 0, reached.sum() / num_classes / counts, 0)
    return Propagation(probabilities=probs.float().numpy(), certainty=certainty.clamp(0, 1).float().numpy(),
                       reached=reached.numpy(), labels=predicted.numpy(),
                       class_weights=class_weights.float().numpy())


def top_k(probabilities, k: int, reached=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most probable classes and their probabilities, highest first (ties: lower class id):
    (classes (N, k) int64, scores (N, k) float32), the layout of trainer.runtime.predict's top-K files that
    trainer.algorithms.balanced_selection consumes. Rows where `reached` (N,) bool is False score 0, so a uniform
    row never outranks a propagated one."""
    probabilities = np.asarray(as_numpy(probabilities), np.float32)
    if probabilities.ndim != 2:
        raise InputError(f"probabilities must be 2-D (images, classes), got shape {probabilities.shape}")
    if not 1 <= k <= probabilities.shape[1]:
        raise InputError(f"k={k} classes per image from {probabilities.shape[1]}: need 1 <= k <= "
                         f"{probabilities.shape[1]}")
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probabilities, classes, axis=1)
    if reached is not None:
        scores[~np.asarray(as_numpy(reached), bool)] = 0
    return classes.astype(np.int64), scores


def uninformative(result: Propagation, unlabeled: int, k: int, iterations: int):
    """Raises when the propagation tells the first `unlabeled` images apart by nothing: none reached (every
    score 0), or every one reached given the same distribution. The balanced selection would then take the
    first files in order, as if they had been ranked."""
    reached = result.reached[:unlabeled]
    if not reached.any():
        raise InputError(f"label propagation reached none of the {unlabeled} unlabeled images from the labeled ones "
                         f"(propagation.k={k}, propagation.iterations={iterations}): every score would be 0 and the "
                         "selection the first files in order; expected a kNN graph that links them (raise "
                         "propagation.k or propagation.iterations)")
    spread = result.probabilities[:unlabeled][reached]
    if len(spread) > 1 and np.ptp(spread, axis=0).max() <= 1e-6:   # float32 solves agree to ~1e-6
        raise InputError(f"label propagation gave the {len(spread)} unlabeled images it reached one and the same "
                         f"class distribution ({', '.join(f'{p:.3g}' for p in spread[0])}): every score would be "
                         "equal and the selection the first files in order; expected labeled images of two or more "
                         "classes among their neighbours")


@contextlib.contextmanager
def _threads(count: int | None):
    """faiss's and torch's threads set to `count` while it lasts, then back to what they were; None leaves
    them. torchrun's OMP_NUM_THREADS=1 reaches both, and each keeps its own OpenMP runtime (faiss-cpu's
    wheel bundles one), so each is set on its own; faiss's setting holds for the calling thread only, the
    one that searches."""
    if count is None:
        yield
        return
    faiss = import_faiss()
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def write_scores(pred_dir: str, labels, num_classes: int, scorer: str, top_k_classes: int, k: int, alpha: float,
                 iterations: int, gamma: float, gpu: int | None, out_dir: str):
    """A pseudo-label scorer's top-K files (trainer.runtime.predict's layout) in out_dir, from a prediction folder:
    its embeddings.npy (the unlabeled images) and labeled/embeddings.npy (the labeled ones, whose
    `labels` propagate). scorer "propagation": the propagated distribution; "mean": its mean with the
    classifier's (its top-K, the folder's per-rank top-K files, zero elsewhere). A propagation that ranks no
    unlabeled image above another is refused (uninformative), on every rank. In a process group every rank
    calls it: each searches its share on its own device (`gpu`: this rank's), rank 0 solves and writes
    (propagate)."""
    unlabeled, labeled = (np.load(path, mmap_mode="r") for path in (os.path.join(pred_dir, EMBEDDINGS),
                                                                    os.path.join(pred_dir, "labeled", EMBEDDINGS)))
    result = propagate([unlabeled, labeled], np.arange(len(unlabeled), len(unlabeled) + len(labeled)), labels,
                       num_classes, k, alpha, iterations, gamma, gpu=gpu)

    def written():   # rank 0's, which holds the result
        uninformative(result, len(unlabeled), k, iterations)
        probs = result.probabilities[:len(unlabeled)]
        if scorer == "mean":
            classifier = np.zeros_like(probs)
            top_classes, top_probs = whole_top_k(pred_dir)
            np.put_along_axis(classifier, top_classes.astype(np.int64), top_probs, axis=1)
            probs = (probs + classifier) / 2
        classes, scores = top_k(probs, top_k_classes, result.reached[:len(unlabeled)])
        os.makedirs(out_dir, exist_ok=True)
        for name, array in (("topk_class.npy", classes.astype(np.int32)), ("topk_prob.npy", scores)):
            atomic.save_npy(os.path.join(out_dir, name), array)

    dist.rank0_decides(written)
