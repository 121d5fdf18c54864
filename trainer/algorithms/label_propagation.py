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
from trainer import dist
from trainer.algorithms.knn import as_numpy, cosine_search, import_faiss, unit_rows
from trainer.runtime.predict import EMBEDDINGS, whole_top_k


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


def _normalised_graph(x: np.ndarray, k: int, gamma: float, gpu: int | None) -> torch.Tensor:
    """W_n = D^-1/2 (A + A^T) D^-1/2 as an (N, N) float32 CSR tensor, from unit rows x."""
    n = len(x)
    sims, ids = cosine_search(x, x, k + 1, gpu=gpu, normalise=False)
    # drop each row's own hit; a row whose self is not among its k + 1 hits (exact duplicates) drops its last
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    sims, ids = sims[~own].reshape(n, k), ids[~own].reshape(n, k)
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
              gpu: int | None = None) -> Propagation:
    """Spreads labels[i] of images labeled_index[i] over the kNN graph of embeddings (N, d), see the module
    docstring. Labelled images keep their propagated row in `probabilities` (the closed form's, which other
    labels may outvote) but their given label in `labels`. gpu: the faiss GPU of the graph search, None
    for the CPU (see trainer.algorithms.knn.faiss_gpu); the solve itself stays on the CPU."""
    x = unit_rows(embeddings, "embeddings")
    n = len(x)
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

    graph = _normalised_graph(x, k, gamma, gpu)
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
def all_cores():
    """In a process group, faiss's search and torch's solve on every core this process may use, while it
    lasts: torchrun gives each of N > 1 ranks one thread (OMP_NUM_THREADS=1), while rank 0 searches and
    solves alone (faiss-cpu's exact search: N^2 d multiply-adds; docs/cluster.md). Alone, a process keeps
    the threads it has."""
    if dist.world_size() == 1:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    faiss = import_faiss()
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)
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
    unlabeled image above another is refused (uninformative). Rank 0's alone in a process group: it
    takes every core while the other ranks wait (all_cores)."""
    unlabeled = np.load(os.path.join(pred_dir, EMBEDDINGS))
    embeddings = np.concatenate([unlabeled, np.load(os.path.join(pred_dir, "labeled", EMBEDDINGS))])
    with all_cores():
        result = propagate(embeddings, np.arange(len(unlabeled), len(embeddings)), labels, num_classes, k, alpha,
                           iterations, gamma, gpu=gpu)
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
